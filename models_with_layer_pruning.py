"""The one Diffusion Transformer of the project: plain, prunable (N:M Gumbel layer groups) and pruned.

State-dict keys and shapes are those of the official DiT checkpoints (DiT-XL-2-256x256.pt) and of the
released TinyDiT checkpoints, so they load unchanged. A prunable model (``groups`` given) adds one
parameter per group, ``gate_logits.{g}``, holding a logit per keep-pattern of that group.

LoRA (``add_lora``) replaces Linear layers in place by ``LoRALinear``, whose state-dict layout is
torchtune's, as the authors' pruning runs save it: ``<layer>.weight``, ``<layer>.bias``,
``<layer>.lora_a.weight`` [rank, in], ``<layer>.lora_b.weight`` [out, rank]. ``from_authors_state_dict``
renames the authors' gate parameters ``gumbel_gates.{g}`` [1, K] to ours, so their checkpoints load.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Groups = list[list[int]]


# --------------------------------------------------------------------------------------------------
# Embedding layers
# --------------------------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """Image [N, C, H, W] -> tokens [N, (H/p)*(W/p), D] with a strided convolution."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: a 256-d cos/sin frequency embedding, then a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors. Row ``num_classes`` is the null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def drop_ids(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None) -> torch.Tensor:
        """Which labels become the null class: forced ids win; otherwise random in training only."""
        if force_drop_ids is not None:
            return force_drop_ids.to(device=labels.device).bool()
        if train and self.dropout_prob > 0:
            return torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        return torch.zeros_like(labels, dtype=torch.bool)

    def forward(self, labels: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        if self.dropout_prob > 0:
            labels = torch.where(drop, self.num_classes, labels)
        elif drop.any():
            raise ValueError("this model has no null class (class_dropout_prob=0); labels cannot be dropped")
        return self.embedding_table(labels)


# --------------------------------------------------------------------------------------------------
# Transformer blocks
# --------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Attention + MLP, both modulated by adaLN-Zero from the conditioning vector."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# --------------------------------------------------------------------------------------------------
# N:M layer groups
# --------------------------------------------------------------------------------------------------


def keep_patterns(n: int, m: int) -> torch.Tensor:
    """All C(m, n) binary keep-patterns of a group, one per row, in lexicographic order of kept positions."""
    rows = [[1.0 if j in kept else 0.0 for j in range(m)] for kept in itertools.combinations(range(m), n)]
    return torch.tensor(rows)


def parse_groups(spec: str | Sequence[Sequence[int]], depth: int | None = None) -> Groups:
    """Parse a group pattern: ``"[[2,4],[3,4]]"`` (JSON), ``"2:4,3:4"``, or ``"1:2"`` repeated to fill ``depth``."""
    if isinstance(spec, str):
        text = spec.strip()
        try:
            if text.startswith("["):
                groups = json.loads(text)
            else:
                groups = [[int(a), int(b)] for a, b in (part.split(":") for part in re.split(r"[,\s]+", text) if part)]
        except (ValueError, json.JSONDecodeError) as e:
            raise ValueError(
                f"cannot parse groups {spec!r}: expected e.g. '[[1,2],[2,4]]' or '2:4,2:4' ({e})"
            ) from None
    else:
        groups = [list(g) for g in spec]
    if not groups or not all(
        isinstance(g, list) and len(g) == 2 and all(isinstance(v, int) for v in g) for g in groups
    ):
        raise ValueError(f"groups must be a non-empty list of [N, M] integer pairs, got {spec!r}")
    for n, m in groups:
        if not 0 < n <= m:
            raise ValueError(f"group [{n}, {m}] must keep between 1 and M layers (0 < N <= M)")
    if depth is not None and len(groups) == 1 and groups[0][1] < depth:
        n, m = groups[0]
        if depth % m:
            raise ValueError(f"group {n}:{m} does not tile a depth of {depth}")
        groups = [[n, m]] * (depth // m)
    if depth is not None and sum(m for _, m in groups) != depth:
        raise ValueError(f"groups {groups} cover {sum(m for _, m in groups)} layers, the model has {depth}")
    return groups


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class DiT(nn.Module):
    """Diffusion Transformer (Peebles & Xie) with optional learnable N:M depth pruning.

    With ``groups`` (a list of [N, M] that tiles ``depth``), the model learns for every group which N of
    its M consecutive blocks to keep. In training each sample draws a hard keep-pattern by a
    straight-through Gumbel-softmax over the group's patterns; a dropped block passes its input through
    unchanged. In eval mode the current decision (argmax of the logits) is applied and dropped blocks
    are skipped. ``layer_mask`` overrides both.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        groups: Groups | str | None = None,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by patch size {patch_size}")
        self.config = dict(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
            num_classes=num_classes, learn_sigma=learn_sigma,
        )  # fmt: skip
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.depth = depth
        self.gradient_checkpointing = False

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

        self.groups: Groups | None = None if groups is None else parse_groups(groups, depth)
        if self.groups is not None:
            self.gate_logits = nn.ParameterList(
                [nn.Parameter(torch.full((math.comb(m, n),), 0.02)) for n, m in self.groups]
            )
            for g, (n, m) in enumerate(self.groups):
                self.register_buffer(f"_patterns_{g}", keep_patterns(n, m), persistent=False)
            self.tau = 1.0  # Gumbel-softmax temperature; the pruning loop anneals it
            self.scaling = 1.0  # multiplies the logits before the Gumbel-softmax
        self.initialize_weights()

    # ---------------------------------------------------------------- init
    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        grid = int(self.x_embedder.num_patches**0.5)
        self.pos_embed.data.copy_(torch.from_numpy(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)).float())
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (*self.final_layer.adaLN_modulation[-1].parameters(), *self.final_layer.linear.parameters()):
            nn.init.zeros_(p)

    # ---------------------------------------------------------------- pruning gates
    @property
    def prunable(self) -> bool:
        return self.groups is not None

    def patterns(self, g: int) -> torch.Tensor:
        return getattr(self, f"_patterns_{g}")

    def set_gumbel(self, tau: float, scaling: float) -> None:
        self.tau, self.scaling = float(tau), float(scaling)

    def sample_layer_mask(self, batch: int) -> torch.Tensor:
        """Per-sample hard masks [batch, depth] by straight-through Gumbel-softmax (gradients reach the logits)."""
        masks = []
        for g, logits in enumerate(self.gate_logits):
            logits = (logits.float() * self.scaling).expand(batch, -1)
            onehot = F.gumbel_softmax(logits, tau=self.tau, hard=True, dim=-1)
            masks.append(onehot @ self.patterns(g))
        return torch.cat(masks, dim=1)

    def decision_layer_mask(self) -> torch.Tensor:
        """The current decision as a [depth] 0/1 mask: argmax pattern of every group."""
        return torch.cat([self.patterns(g)[lg.argmax()] for g, lg in enumerate(self.gate_logits)])

    def decisions(self) -> list[list[int]]:
        """Kept positions within each group (0..M-1) under the current decision."""
        self._require_prunable()
        return [self.patterns(g)[lg.argmax()].nonzero().flatten().tolist() for g, lg in enumerate(self.gate_logits)]

    def confidences(self) -> list[float]:
        """Probability of the decided pattern in each group (softmax of scaled logits): 1 = certain."""
        self._require_prunable()
        return [F.softmax(lg.detach().float() * self.scaling, dim=0).max().item() for lg in self.gate_logits]

    def kept_indices(self) -> list[int]:
        """Global indices of the blocks kept by the current decision."""
        self._require_prunable()
        return self.decision_layer_mask().nonzero().flatten().tolist()

    def _require_prunable(self) -> None:
        if not self.prunable:
            raise RuntimeError("this DiT has no pruning groups; build it with groups=[[N, M], ...]")

    def pruned(self, kept_indices: Sequence[int] | None = None) -> DiT:
        """A plain, shallow DiT holding copies of the kept blocks (default: the current decision), renumbered."""
        kept = list(self.kept_indices() if kept_indices is None else kept_indices)
        check_kept_indices(kept, self.depth)
        shallow = DiT(**{**self.config, "depth": len(kept)}).to(self.pos_embed.device)
        shallow.load_state_dict(pruned_state_dict(self.state_dict(), kept))
        return shallow

    # ---------------------------------------------------------------- forward
    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [N, T, p*p*C] -> images [N, C, H, W]."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        force_drop_ids: torch.Tensor | None = None,
        return_drop_ids: bool = False,
        layer_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Predict noise (and variance) for latents ``x`` at timesteps ``t`` with labels ``y``.

        force_drop_ids: bool/0-1 per sample, replaces the random label drop (a teacher sees the
            student's drops); return_drop_ids: also return the drop ids used.
        layer_mask: [depth] or [N, depth] 0/1 (or straight-through) keep mask; default for a prunable
            model: Gumbel samples in training, the decision in eval.
        """
        drop = self.y_embedder.drop_ids(y, self.training, force_drop_ids)
        c = self.t_embedder(t) + self.y_embedder(y, drop)
        h = self.x_embedder(x) + self.pos_embed
        if layer_mask is None and self.prunable:
            layer_mask = self.sample_layer_mask(x.shape[0]) if self.training else self.decision_layer_mask()
        if layer_mask is not None and layer_mask.dim() == 1:
            layer_mask = layer_mask.expand(x.shape[0], -1)
        for i, block in enumerate(self.blocks):
            if layer_mask is None:
                h = self._run_block(block, h, c)
                continue
            m = layer_mask[:, i]
            if not m.requires_grad:  # a fixed mask: skip blocks dropped for all, run kept ones plainly
                if not m.any():
                    continue
                if m.all():
                    h = self._run_block(block, h, c)
                    continue
            m = m.to(h.dtype)[:, None, None]
            h = self._run_block(block, h, c) * m + h * (1 - m)
        out = self.unpatchify(self.final_layer(h, c))
        return (out, drop) if return_drop_ids else out

    def _run_block(self, block: DiTBlock, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, c, use_reentrant=False)
        return block(h, c)

    def forward_with_cfg(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float, cfg_channels: int | None = 3
    ) -> torch.Tensor:
        """Classifier-free guidance over a batch whose second half holds the null labels.

        Guidance applies to the first ``cfg_channels`` output channels only (3 by default, as the
        official DiT samples, so its published FIDs reproduce); pass None to guide every noise channel.
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        k = self.in_channels if cfg_channels is None else cfg_channels
        eps, rest = out[:, :k], out[:, k:]
        cond, uncond = eps.chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)

    # ---------------------------------------------------------------- utilities
    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def num_params(self, include_gates: bool = False) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if include_gates or not n.startswith("gate_logits"))


# --------------------------------------------------------------------------------------------------
# LoRA (torchtune's LoRALinear layout) and the authors' pruning-run state dicts
# --------------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """A Linear layer plus a low-rank update: ``x W^T + b + (alpha / rank) * B(A(x))``.

    The layout and maths of torchtune's ``LoRALinear`` (the authors' choice): the base ``weight`` and
    ``bias`` stay where the Linear had them, ``lora_a`` (Kaiming-uniform) and ``lora_b`` (zero, so a new
    adapter changes nothing) are bias-free Linears, no dropout.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.out_features, self.in_features = weight.shape
        self.rank, self.alpha = int(rank), float(alpha)
        self.weight = weight
        self.bias = bias
        kw = dict(bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_a = nn.Linear(self.in_features, self.rank, **kw)
        self.lora_b = nn.Linear(self.rank, self.out_features, **kw)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float) -> LoRALinear:
        """Wrap ``linear``, sharing its weight and bias tensors (nothing is copied)."""
        return cls(linear.weight, linear.bias, rank, alpha)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / rank) * B @ A, computed in fp32 and returned in the weight's dtype."""
        delta = self.lora_b.weight.float() @ self.lora_a.weight.float()
        return (self.weight.float() + self.scale * delta).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.scale * self.lora_b(self.lora_a(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16) -> list[str]:
    """Replace every nn.Linear of ``model`` (embedders, blocks, final layer) by a LoRALinear in place, as
    the authors do; return the wrapped layers' names. Layers that already carry an adapter are kept."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and ".lora_" not in f".{n}"]
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, LoRALinear.from_linear(getattr(parent, attr), rank, alpha))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (A and B of every LoRALinear)."""
    return [p for m in lora_layers(model).values() for p in (m.lora_a.weight, m.lora_b.weight)]


def plain_weights(model: nn.Module, merge: bool = False) -> dict[str, torch.Tensor]:
    """The model's state dict under DiT's own keys: LoRA adapters dropped, or folded into the weights."""
    state = {k: v for k, v in model.state_dict().items() if ".lora_a." not in k and ".lora_b." not in k}
    if merge:
        for name, layer in lora_layers(model).items():
            state[f"{name}.weight"] = layer.merged_weight().detach()
    return state


_AUTHORS_GATE = re.compile(r"gumbel_gates\.(\d+)$")
_PEFT_LORA = re.compile(r"\.lora_([AB])\.default\.weight$")


def from_authors_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A prunable-DiT state dict under our keys, from the authors' pruning runs (or ours).

    Their gates ``gumbel_gates.{g}`` [1, K] (one logit per keep-pattern, patterns in the same
    lexicographic order as ``keep_patterns``) become ``gate_logits.{g}`` [K]. Their torchtune LoRA keys
    (``<layer>.lora_a.weight`` / ``lora_b.weight`` beside ``<layer>.weight``) are already ours. Keys of
    our earlier peft-based runs (``<layer>.base_layer.weight``, ``<layer>.lora_A.default.weight``) are
    mapped too. Everything else passes unchanged.
    """
    out = {}
    for key, value in state_dict.items():
        if match := _AUTHORS_GATE.match(key):
            key, value = f"gate_logits.{match.group(1)}", value.reshape(-1)
        elif match := _PEFT_LORA.search(key):
            key = key[: match.start()] + f".lora_{match.group(1).lower()}.weight"
        key = key.replace(".base_layer.", ".")
        out[key] = value
    return out


def check_kept_indices(kept: Sequence[int], depth: int) -> None:
    """Raise ValueError for an empty list, out-of-range or repeated block indices."""
    if not kept:
        raise ValueError("kept indices are empty: at least one block must be kept")
    bad = [i for i in kept if not isinstance(i, int) or not 0 <= i < depth]
    if bad:
        raise ValueError(f"kept indices {bad} are out of range for a model of depth {depth} (valid: 0..{depth - 1})")
    if len(set(kept)) != len(kept):
        dup = sorted({i for i in kept if list(kept).count(i) > 1})
        raise ValueError(f"kept indices contain duplicates: {dup}")


def pruned_state_dict(state_dict: dict[str, torch.Tensor], kept: Sequence[int]) -> dict[str, torch.Tensor]:
    """Keep the listed blocks (renumbered 0..k-1, in the given order) and every non-block tensor; drop gates
    and LoRA adapters (merge them first with ``plain_weights(model, merge=True)`` to keep the update)."""
    new_index = {old: new for new, old in enumerate(kept)}
    out = {}
    for key, value in state_dict.items():
        if key.startswith("gate_logits") or ".lora_a." in key or ".lora_b." in key:
            continue
        match = re.match(r"blocks\.(\d+)\.(.*)", key)
        if match is None:
            out[key] = value
        elif int(match.group(1)) in new_index:
            out[f"blocks.{new_index[int(match.group(1))]}.{match.group(2)}"] = value
    return out


# --------------------------------------------------------------------------------------------------
# Fixed 2-D sin-cos position embedding (MAE convention: the grid's first coordinate is w)
# --------------------------------------------------------------------------------------------------


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    coords = np.arange(grid_size, dtype=np.float32)
    grid_w, grid_h = np.meshgrid(coords, coords)  # first output varies along w
    emb_a = _1d_sincos(embed_dim // 2, grid_w.reshape(-1))
    emb_b = _1d_sincos(embed_dim // 2, grid_h.reshape(-1))
    return np.concatenate([emb_a, emb_b], axis=1)


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.outer(pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

# Ti (DeiT-Tiny widths) is not in the paper: a small model for CPU demos and tests.
_WIDTHS = {"Ti": (12, 192, 3), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
_SHALLOW_XL = (19, 14, 7)
# Learnable-pruning variants: (source depth, groups) at XL width, patch 2.
_LEARNABLE = {
    "DiT-XL-1-2": (28, [[1, 2]] * 14),  # -> 14 layers
    "DiT-XL-2-4": (28, [[2, 4]] * 7),  # -> 14
    "DiT-XL-7-14": (28, [[7, 14]] * 2),  # -> 14
    "DiT-XL-1-4": (28, [[1, 4]] * 7),  # -> 7
    "DiT-D14-1-2": (14, [[1, 2]] * 7),  # -> 7
    "DiT-D14-2-4": (14, [[2, 4]] * 3 + [[1, 2]]),  # -> 7 (14 is not a multiple of 4: the last pair is 1:2)
}


def _factory(depth: int, hidden: int, heads: int, patch: int, groups: Groups | None = None):
    def build(**kwargs) -> DiT:
        kw = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, groups=groups)
        kw.update(kwargs)
        return DiT(**kw)

    build.arch = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, groups=groups)
    return build


DiT_models = {}
for _name, (_d, _h, _nh) in _WIDTHS.items():
    for _p in (2, 4, 8):
        DiT_models[f"DiT-{_name}/{_p}"] = _factory(_d, _h, _nh, _p)
for _d in _SHALLOW_XL:
    DiT_models[f"DiT-D{_d}/2"] = _factory(_d, 1152, 16, 2)
for _name, (_d, _g) in _LEARNABLE.items():
    DiT_models[_name] = _factory(_d, 1152, 16, 2, _g)
DiT_models["DiT-Digits/2"] = _factory(12, 128, 4, 2)  # the digits demo: 8x8 pixels, 16 tokens, 3.65M params


def create_model(name: str, groups: Groups | str | None = None, **kwargs) -> DiT:
    """Build a registered DiT by name; ``groups`` overrides the name's groups (a custom N:M pattern)."""
    if name not in DiT_models:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(DiT_models)}")
    if groups is not None:
        kwargs["groups"] = groups
    return DiT_models[name](**kwargs)
