"""The prompt router of APTP: prompt embedding -> architecture predictor -> one of K architecture codes.

A frozen sentence encoder embeds each prompt; a linear predictor maps the embedding to logits over the
architecture vector (see ``aptp.layout``); a Gumbel-sigmoid turns logits into gate values, the depth
part through an ordered prior so that inner blocks are dropped before outer ones. While training, a
batch is assigned to the codebook by optimal transport (Sinkhorn, balanced over all processes); at
inference a prompt goes to the code of highest cosine similarity, with no noise, so its expert never
depends on the batch it came in.
"""

from __future__ import annotations

import functools
import math
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from diffcompress.errors import UserError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from .layout import ArchLayout

DEFAULT_ENCODER = "sentence-transformers/all-mpnet-base-v2"
TEMPERATURE = 0.4  # Gumbel-sigmoid temperature
OFFSET = 3.0  # logit offset: gates start open (sigmoid(3 / 0.4) ~ 0.9994)
SINKHORN_TEMPERATURE = 0.05
SINKHORN_ITERS = 3
TIE_TOLERANCE = 1e-9  # equal codes differ only by float64 rounding (~1e-15); distinct binary codes lie far apart


# ----------------------------------------------------------------------------------------------------
# Prompt encoder


def _hub_reachable(timeout: float = 5.0) -> bool:
    """A quick TCP probe, so an offline machine fails at once instead of after the hub client's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout).close()
        return True
    except OSError:
        return False


def _first_line(e: BaseException) -> str:
    return next(iter(str(e).splitlines()), "")


def _from_hub(repo_id: str, device: str) -> SentenceTransformer:
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(repo_id, device=device, local_files_only=True)
    except OSError:  # not in the hub cache
        if not _hub_reachable():
            raise UserError(
                f"prompt encoder {repo_id!r} is neither a local folder nor in the hub cache, and the hub cannot be "
                f"reached. On a machine with network run `hf download {repo_id} --local-dir "
                f"encoders/{repo_id.split('/')[-1]}`, copy that folder here and pass its path"
            ) from None
    return SentenceTransformer(repo_id, device=device)


def load_sentence_encoder(name_or_path: str, device: str | torch.device = "cpu") -> SentenceTransformer:
    """A frozen sentence-transformers model from a local folder, the hub cache, or the hub (online only).

    Any ``Normalize`` module is removed: APTP uses the pooled embedding as is (all-mpnet-base-v2: mean pooling).
    """
    from sentence_transformers import SentenceTransformer

    local = Path(name_or_path).expanduser()
    try:
        if local.exists():
            model = SentenceTransformer(str(local), device=str(device), local_files_only=True)
        else:
            model = _from_hub(name_or_path, str(device))
    except UserError:
        raise
    except Exception as e:  # a folder that is not a model, a corrupt download, an unknown hub id
        raise UserError(
            f"prompt encoder {name_or_path!r}: could not load a sentence-transformers model "
            f"({type(e).__name__}: {_first_line(e)}); expected a sentence-transformers or transformers model folder"
        ) from None
    # by class name: the Normalize class moved between sentence-transformers releases
    for i in reversed(range(len(model))):
        if type(model[i]).__name__ == "Normalize":
            del model[i]
    return model.eval().requires_grad_(False)


class PromptEncoder:
    """Captions -> [N, dim] float32 sentence embeddings (frozen; computed without autograd)."""

    def __init__(self, name_or_path: str = DEFAULT_ENCODER, device: str | torch.device = "cpu"):
        self.model = load_sentence_encoder(name_or_path, device)
        self.name = name_or_path
        # renamed get_embedding_dimension in sentence-transformers 6; the old name warns there
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim: int = dimension()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def embed(self, captions: Sequence[str], batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """Embed ``captions`` in batches of ``batch_size``, in order, on the encoder's device.

        One call over a whole caption file lets later stages cache embeddings instead of re-encoding per step.
        """
        if len(captions) == 0:
            return torch.zeros(0, self.dim, device=self.device)
        with torch.no_grad():
            emb = self.model.encode(
                list(captions), batch_size=batch_size, show_progress_bar=progress, convert_to_tensor=True
            )
        # encode() runs in inference mode; a normal tensor can feed the trainable predictor
        return emb.float().clone()


# ----------------------------------------------------------------------------------------------------
# Gates: Gumbel-sigmoid with an ordered depth prior


def depth_order(layout: ArchLayout) -> tuple[int, ...]:
    """Order in which the depth prior assigns its values, most kept first: outermost (highest resolution)
    blocks first, inner low-resolution blocks last, so they are the first to be dropped.

    A block's level is its down block's index, or for an up block the mirrored index; at each level the up
    blocks come first (from the output inwards), then the down blocks (from the input inwards). For SD2.1
    this is the original's ``[13, 12, 0, 1, 11, 10, 2, 3, 9, 8, 4, 5, 7, 6]``.
    """
    parsed = []
    for name in layout.depth_blocks:
        m = re.match(r"(down|up)_blocks\.(\d+)\.", name)
        if m is None:
            raise ValueError(f"depth block {name!r} is not in a down/up block: pass an explicit depth order")
        parsed.append((m.group(1), int(m.group(2))))
    n_up = max((i for side, i in parsed if side == "up"), default=-1) + 1

    def key(j: int) -> tuple[int, int, int]:
        side, i = parsed[j]
        return (n_up - 1 - i, 0, -j) if side == "up" else (i, 1, j)

    return tuple(sorted(range(len(parsed)), key=key))


def logistic_noise(shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Difference of two Gumbel samples (= logistic noise): the noise of a Gumbel-sigmoid."""
    u = torch.rand(tuple(shape), device=device).clamp(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


def gumbel_gates(
    logits: torch.Tensor,
    width_size: int,
    order: Sequence[int],
    noise: torch.Tensor | None = None,
    temperature: float = TEMPERATURE,
    offset: float = OFFSET,
) -> torch.Tensor:
    """Gate values in (0, 1) for architecture logits [..., width_size + D]; ``noise`` None means g = 0.

    Width: ``sigmoid((l + g + offset) / T)``. Depth: p = softmax(depth logits), x = flip(cumsum(p)) is
    non-increasing, and ``sigmoid((logit(x_j) + g_j + offset) / T)`` is the gate of block ``order[j]``;
    without noise a block is thus only kept if every block before it in ``order`` is.
    """
    g = torch.zeros_like(logits) if noise is None else noise.to(logits)
    width = torch.sigmoid((logits[..., :width_size] + g[..., :width_size] + offset) / temperature)
    x = torch.flip(torch.cumsum(torch.softmax(logits[..., width_size:], dim=-1), dim=-1), dims=(-1,))
    ordered = torch.sigmoid((torch.logit(x, eps=1e-6) + g[..., width_size:] + offset) / temperature)
    inverse = torch.argsort(torch.as_tensor(order, device=logits.device))
    return torch.cat([width, ordered[..., inverse]], dim=-1)


@functools.lru_cache(maxsize=8)
def _width_factors(layout: ArchLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Per width entry: sqrt(1 / sub-gate size) and the index of its depth gate (D = none)."""
    scale = torch.empty(layout.width_size, dtype=torch.float64)
    depth = torch.full((layout.width_size,), layout.depth_size, dtype=torch.long)
    for sg in layout.subgates:
        scale[sg.start : sg.start + sg.size] = math.sqrt(1.0 / sg.size)
        if sg.depth_index is not None:
            depth[sg.start : sg.start + sg.size] = sg.depth_index
    return scale, depth


def normalize_arch(mask: torch.Tensor, layout: ArchLayout) -> torch.Tensor:
    """The vector architectures are compared by: binarised (straight-through), each width entry times its
    block's depth value and sqrt(1 / sub-gate size), depth entries as they are, L2-normalised.

    With the sqrt scaling a fully open sub-gate contributes 1 to the squared norm, as does a kept block, so
    every sub-gate and depth gate weighs the same whatever its size.
    """
    from .layout import binarize  # aptp.layout loads diffusers; Sinkhorn-only users need not

    hard = binarize(mask, layout)
    scale, depth_idx = _width_factors(layout)
    W = layout.width_size
    depth = torch.cat([hard[..., W:], torch.ones_like(hard[..., :1])], dim=-1)
    width = hard[..., :W] * depth[..., depth_idx.to(mask.device)] * scale.to(mask)
    return F.normalize(torch.cat([width, hard[..., W:]], dim=-1), dim=-1)


# ----------------------------------------------------------------------------------------------------
# Optimal transport: Sinkhorn over all processes, then a balanced hard assignment


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(x: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(x, op=op)
    return x


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, iters: int = SINKHORN_ITERS) -> torch.Tensor:
    """Transport plan [B, K] for similarities ``scores`` [B, K] (already divided by the temperature).

    Rows of the plan sum to 1 (each prompt spreads over the codes); ``iters`` rounds alternately give each
    code a 1/K share and each prompt a 1/B share of the mass, B being the batch over all processes. Code
    sums are all-reduced, so the balance is global; prompt sums are local, as each prompt lives on one rank.
    """
    s = scores.detach().float()
    q = (s - _all_reduce(s.max(), dist.ReduceOp.MAX)).exp().t()  # [K, B]
    K = q.shape[0]
    B = _all_reduce(torch.tensor(float(q.shape[1]), device=q.device))
    q /= _all_reduce(q.sum())
    for _ in range(iters):
        q /= _all_reduce(q.sum(dim=1, keepdim=True)) * K
        q /= q.sum(dim=0, keepdim=True) * B
    return (q * B).t()


def _gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows of ``x`` concatenated in rank order (ranks may hold different counts), and where this
    rank's rows start."""
    if not _distributed():
        return x, 0
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    counts = [int(c) for c in sizes]
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]), sum(counts[: dist.get_rank()])


@torch.no_grad()
def balanced_assignment(plan: torch.Tensor) -> torch.Tensor:
    """Code index per prompt [B] from a transport plan [B, K]: each prompt takes its argmax code unless that
    code is full. Capacities are B/K over all processes (B mod K codes may take one more), so counts are
    exactly balanced (3 Sinkhorn rounds only balance the soft plan; its plain argmax is far from balanced).

    Pairs are taken by decreasing plan value (ties by index), so confident prompts keep their first choice.
    Every rank computes the same global assignment from the gathered plan and returns its own part.
    """
    full, start = _gather_rows(plan.detach().float())
    B, K = full.shape
    base, extra = divmod(B, K)
    values = full.flatten().cpu()
    pairs = torch.argsort(-values, stable=True).tolist()
    assign = [-1] * B
    count = [0] * K
    for p in pairs:
        b, k = divmod(p, K)
        if assign[b] >= 0 or count[k] > base or (count[k] == base and extra == 0):
            continue
        if count[k] == base:
            extra -= 1
        assign[b] = k
        count[k] += 1
    return torch.tensor(assign[start : start + plan.shape[0]], device=plan.device)


# ----------------------------------------------------------------------------------------------------
# The router


@dataclass
class Routing:
    mask: torch.Tensor  # [B, layout.size] gate values for the UNet
    arch: torch.Tensor  # [B, layout.size] normalised predictor architectures (for the contrastive loss)
    expert: torch.Tensor | None  # [B] code per prompt; None while the predictor is pre-trained


def _block_orthogonal_(weight: torch.Tensor, layout: ArchLayout) -> None:
    """Orthogonal init per sub-gate (and for the depth logits): within a block the rows are orthonormal."""
    blocks = [(sg.start, sg.start + sg.size) for sg in layout.subgates] + [(layout.width_size, layout.size)]
    with torch.no_grad():
        for a, b in blocks:
            if b > a:
                nn.init.orthogonal_(weight[a:b])


class Router(nn.Module):
    """Architecture predictor and codebook. Parameters: ``predictor`` (Linear d -> layout.size) and
    ``codebook`` [K, layout.size]; ``state_dict``/``load_state_dict`` save and restore both."""

    def __init__(
        self,
        layout: ArchLayout,
        prompt_dim: int,
        num_experts: int = 8,
        *,
        optimal_transport: bool = True,
        order: Sequence[int] | None = None,
        temperature: float = TEMPERATURE,
        offset: float = OFFSET,
        sinkhorn_temperature: float = SINKHORN_TEMPERATURE,
        sinkhorn_iters: int = SINKHORN_ITERS,
    ):
        super().__init__()
        self.layout = layout
        self.order = tuple(order) if order is not None else depth_order(layout)
        if sorted(self.order) != list(range(layout.depth_size)):
            raise ValueError(f"depth order {self.order} is not a permutation of the {layout.depth_size} depth gates")
        self.optimal_transport = optimal_transport  # False: the "APTP without optimal transport" baseline
        self.temperature, self.offset = temperature, offset
        self.sinkhorn_temperature, self.sinkhorn_iters = sinkhorn_temperature, sinkhorn_iters
        self.predictor = nn.Linear(prompt_dim, layout.size)
        _block_orthogonal_(self.predictor.weight, layout)
        nn.init.zeros_(self.predictor.bias)
        self.codebook = nn.Parameter(nn.init.orthogonal_(torch.empty(num_experts, layout.size)))

    @property
    def num_experts(self) -> int:
        return self.codebook.shape[0]

    def gates(self, logits: torch.Tensor, noisy: bool) -> torch.Tensor:
        noise = logistic_noise(logits.shape, logits.device) if noisy else None
        return gumbel_gates(logits, self.layout.width_size, self.order, noise, self.temperature, self.offset)

    def normalize(self, mask: torch.Tensor) -> torch.Tensor:
        return normalize_arch(mask, self.layout)

    def predict(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Architecture logits [B, layout.size] for prompt embeddings [B, d]."""
        return self.predictor(embeddings)

    def forward(self, embeddings: torch.Tensor, pretrain: bool = False) -> Routing:
        """Gate values for a training batch (with Gumbel noise in train mode).

        ``pretrain``: each prompt gets its own predicted architecture. Otherwise prompts are assigned to
        codes by Sinkhorn over the whole (multi-process) batch and get their code's gates; the assignment
        carries no gradient, so the UNet losses reach only the selected codes and the predictor learns
        from the contrastive loss on ``arch``.
        """
        own = self.gates(self.predict(embeddings), self.training)
        arch = self.normalize(own)
        if pretrain:
            return Routing(mask=own, arch=arch, expert=None)
        codes = self.gates(self.codebook, self.training)
        with torch.no_grad(), torch.autocast(arch.device.type, enabled=False):  # cosines need float32
            scores = arch.float() @ self.normalize(codes.float()).t() / self.sinkhorn_temperature
            if self.optimal_transport:
                expert = balanced_assignment(sinkhorn(scores, self.sinkhorn_iters))
            else:
                expert = scores.argmax(dim=1)
        return Routing(mask=codes[expert], arch=arch, expert=expert)

    @torch.no_grad()
    def route(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Expert id per prompt [B] at inference: cosine argmax over the codes, no noise.

        Cosines are taken in float64 and near-ties (identical codes) go to the lowest index, so a prompt's expert
        does not depend on the batch size or its position in the batch (BLAS may sum in another order).
        """
        with torch.autocast(embeddings.device.type, enabled=False):  # the same experts under any precision
            arch = self.normalize(self.gates(self.predict(embeddings.float()), noisy=False).double())
            codes = self.normalize(self.gates(self.codebook.float(), noisy=False).double())
            cos = arch @ codes.t()
        return (cos >= cos.max(dim=1, keepdim=True).values - TIE_TOLERANCE).int().argmax(dim=1)

    @torch.no_grad()
    def expert_mask(self, k: int) -> torch.Tensor:
        """Hard 0/1 mask [layout.size] of expert ``k`` (no noise; each sub-gate keeps at least one entry)."""
        from .layout import binarize

        return binarize(self.gates(self.codebook[k], noisy=False), self.layout)
