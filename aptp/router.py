"""The prompt router of APTP: prompt embedding -> architecture predictor -> one of K architecture codes.

A frozen sentence encoder embeds each prompt; a linear predictor maps the embedding to logits over the
architecture vector (see ``aptp.layout``); a Gumbel-sigmoid turns logits into gate values, the depth
part through an ordered prior so that inner blocks are dropped before outer ones. While training, a
batch is assigned to the codebook by optimal transport (Sinkhorn over all processes, then each prompt's argmax
of the plan, as the authors). At inference a prompt goes to ``argmax_k cos_k / temperature + log v_k``, where the
per-expert scalings v_k are the Sinkhorn column scalings computed once over the training captions at the end of
pruning (``calibrate``): the argmax of the training-time plan made per prompt, so its expert never depends on the
batch it came in, and every expert gets prompts. Plain cosine routing stays available (``rule="cosine"``).
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
CALIBRATION_ITERS = 1000  # Sinkhorn rounds over the whole training caption set (stops early once balanced)
ASSIGNMENTS = ("argmax", "capacity")  # training: the plan's argmax (authors) | exactly balanced capacities (ours)
ROUTING_RULES = ("calibrated", "cosine", "authors")
AUTHORS_BATCH = 2048  # the authors route captions in batches of 2048 rows (their noise depends on the row's place)
# The deterministic stand-in for the Gumbel noise when an expert's code is thresholded: the noise's mean (the
# default: the codes' MACs then track what training saw, README), its median (each gate in its more probable
# training-time state), none; or "sample": one noisy draw (the authors' embedding_gs).
EXPERT_THRESHOLDS = {"mean": 0.5772156649015329, "median": -math.log(math.log(2.0)), "none": 0.0, "sample": None}
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


def gumbel_noise(
    shape: Sequence[int], device: torch.device | str = "cpu", generator: torch.Generator | None = None
) -> torch.Tensor:
    """One Gumbel draw per entry, ``-log(-log(u + 1e-20) + 1e-20)`` with u ~ U[0, 1): the authors' Gumbel-sigmoid
    noise (mean +0.577, median +0.367; not the logistic difference of two draws)."""
    u = torch.rand(tuple(shape), device=device, generator=generator)
    return -torch.log(-torch.log(u + 1e-20) + 1e-20)


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
    non-increasing, and ``sigmoid((log(x_j + 1e-6) - log(1 - x_j + 1e-6) + g_j + offset) / T)`` (the authors'
    smoothed logit) is the gate of block ``order[j]``; without noise a block is thus only kept if every block before
    it in ``order`` is.
    """
    g = torch.zeros_like(logits) if noise is None else noise.to(logits)
    width = torch.sigmoid((logits[..., :width_size] + g[..., :width_size] + offset) / temperature)
    x = torch.flip(torch.cumsum(torch.softmax(logits[..., width_size:], dim=-1), dim=-1), dims=(-1,))
    ordered = torch.sigmoid(
        (torch.log(x + 1e-6) - torch.log(1 - x + 1e-6) + g[..., width_size:] + offset) / temperature
    )
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
    """The vector architectures are compared by, as the authors compute it: gates binarised (straight-through),
    except the width entries of a depth-gated block, which are its soft width gate times its soft depth gate; every
    width entry times sqrt(1 / sub-gate size); depth entries binarised; L2-normalised.

    With the sqrt scaling a fully open sub-gate contributes 1 to the squared norm, as does a kept block, so
    every sub-gate and depth gate weighs the same whatever its size.
    """
    from .layout import binarize  # aptp.layout loads diffusers; Sinkhorn-only users need not

    return _normalize(mask, binarize(mask, layout), layout)


def _normalize(mask: torch.Tensor, hard: torch.Tensor, layout: ArchLayout) -> torch.Tensor:
    scale, depth_idx = _width_factors(layout)
    W = layout.width_size
    depth_idx = depth_idx.to(mask.device)
    soft_depth = torch.cat([mask[..., W:], torch.ones_like(mask[..., :1])], dim=-1)[..., depth_idx]
    in_depth_gated = depth_idx < layout.depth_size
    width = torch.where(in_depth_gated, mask[..., :W] * soft_depth, hard[..., :W]) * scale.to(mask)
    return F.normalize(torch.cat([width, hard[..., W:]], dim=-1), dim=-1)


# ----------------------------------------------------------------------------------------------------
# The authors' inference routing (their filtering stage): fixed noise, their sampled codes, plain cosine


def authors_noise(batch: int, layout: ArchLayout) -> torch.Tensor:
    """The fixed Gumbel noise [batch, layout.size] of the authors' routing: for each width sub-gate and for the depth
    part, a fresh CPU generator seeded 0 draws u [batch, part size]; so a row's noise depends on its place in the
    batch, not on the prompt."""
    sizes = [sg.size for sg in layout.subgates] + [layout.depth_size]
    return torch.cat([gumbel_noise((batch, n), generator=torch.Generator().manual_seed(0)) for n in sizes], dim=-1)


def nonzero_width(gates: torch.Tensor, layout: ArchLayout) -> torch.Tensor:
    """The authors' non-zero rule: a width sub-gate with every entry below 0.5 gets +0.5 on its first entry."""
    out = gates.clone()
    for sg in layout.subgates:
        out[..., sg.start] += 0.5 * (gates[..., sg.start : sg.stop] < 0.5).all(dim=-1)
    return out


def authors_normalize(mask: torch.Tensor, layout: ArchLayout) -> torch.Tensor:
    """``normalize_arch`` as the authors' routing computes it: kept iff >= 0.5, an empty sub-gate stays empty."""
    return _normalize(mask, (mask >= 0.5).to(mask.dtype), layout)


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


def gather_keeping_grad(x: torch.Tensor) -> torch.Tensor:
    """Every process's rows of ``x`` (equal counts, as training batches are) in rank order; this process's own rows
    keep their gradient, the others are copies. The authors' contrastive loss runs over the gathered batch."""
    if not _distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def _sinkhorn_log_scalings(s: torch.Tensor, log_u: torch.Tensor, iters: int, tol: float) -> torch.Tensor:
    """Code log-scalings [K] of the Sinkhorn plan of scores ``s`` [N, K] (prompts get mass 1/N, codes 1/K), from
    ``log_u``; stops once the codes' shares are within ``tol`` of 1/K."""
    n, k = s.shape
    for _ in range(iters):
        log_w = -math.log(n) - torch.logsumexp(s + log_u[None, :], dim=1)
        shares = torch.logsumexp(s + log_u[None, :] + log_w[:, None], dim=0).exp() * k
        if (shares - 1).abs().max() < tol:
            break
        log_u = log_u - shares.log()
    return log_u


@torch.no_grad()
def calibrate(
    cos: torch.Tensor, temperature: float = SINKHORN_TEMPERATURE, iters: int = CALIBRATION_ITERS, tol: float = 1e-6,
    balance: float = 0.2, halvings: int = 12,
) -> torch.Tensor:  # fmt: skip
    """Per-expert log-scalings log v [K] that balance N prompts over K codes, for cosines [N, K] (float64 inside).

    Sinkhorn on exp(cos / temperature) (codes get mass 1/K, prompts 1/N): the plan is u_k exp(cos_nk / T) w_n, so
    a prompt's argmax expert under it is ``argmax_k cos_nk / T + log u_k`` whatever the other prompts. The soft plan
    is balanced, its argmax not always: when codes are nearly alike the per-prompt maxima crowd on few codes. So the
    transport is sharpened (T halved, warm-started, up to ``halvings`` times) until every code takes the argmax of
    (1 +- ``balance``) / K of the prompts; the scalings are returned in units of the training ``temperature``
    (log v = T' log u' / T), mean zero, the best balance met if none is within bounds (identical codes split
    nothing).
    """
    cos = cos.double()
    n, k = cos.shape
    t, log_u = temperature, cos.new_zeros(k)
    best, best_err = log_u, math.inf
    for _ in range(halvings + 1):
        log_u = _sinkhorn_log_scalings(cos / t, log_u, iters, tol)
        offsets = t * log_u  # in cosine units
        shares = torch.bincount((cos + offsets).argmax(dim=1), minlength=k).double() * k / max(n, 1)
        err = float((shares - 1).abs().max())
        if err < best_err:
            best, best_err = offsets / temperature, err
        if err <= balance:
            break
        t, log_u = t / 2, log_u * 2  # the same offsets at half the temperature
    return best - best.mean()


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
    ``codebook`` [K, layout.size]; ``state_dict``/``load_state_dict`` save and restore both.

    ``assignment``: how a training batch goes to the codes (``argmax`` of the Sinkhorn plan, the authors'; or
    ``capacity``, exactly B/K prompts per code). ``expert_threshold``: the noise an expert's code is thresholded
    with (``EXPERT_THRESHOLDS``). After pruning, ``log_v`` (``calibrate``) and ``routing`` decide inference routes;
    ``fixed_codes`` [K, layout.size], when set, are the experts' codes instead of the codebook's threshold.
    """

    def __init__(
        self,
        layout: ArchLayout,
        prompt_dim: int,
        num_experts: int = 8,
        *,
        optimal_transport: bool = True,
        assignment: str = "argmax",
        expert_threshold: str = "mean",
        order: Sequence[int] | None = None,
        temperature: float = TEMPERATURE,
        offset: float = OFFSET,
        sinkhorn_temperature: float = SINKHORN_TEMPERATURE,
        sinkhorn_iters: int = SINKHORN_ITERS,
    ):
        super().__init__()
        if assignment not in ASSIGNMENTS:
            raise ValueError(f"assignment {assignment!r}: expected one of {', '.join(ASSIGNMENTS)}")
        if expert_threshold not in EXPERT_THRESHOLDS:
            raise ValueError(f"expert_threshold {expert_threshold!r}: expected one of {', '.join(EXPERT_THRESHOLDS)}")
        self.layout = layout
        self.order = tuple(order) if order is not None else depth_order(layout)
        if sorted(self.order) != list(range(layout.depth_size)):
            raise ValueError(f"depth order {self.order} is not a permutation of the {layout.depth_size} depth gates")
        self.optimal_transport = optimal_transport  # False: the "APTP without optimal transport" baseline
        self.assignment, self.expert_threshold = assignment, expert_threshold
        self.temperature, self.offset = temperature, offset
        self.sinkhorn_temperature, self.sinkhorn_iters = sinkhorn_temperature, sinkhorn_iters
        self.predictor = nn.Linear(prompt_dim, layout.size)
        _block_orthogonal_(self.predictor.weight, layout)
        nn.init.zeros_(self.predictor.bias)
        self.codebook = nn.Parameter(nn.init.orthogonal_(torch.empty(num_experts, layout.size)))
        self.routing = "calibrated"
        self.register_buffer("log_v", None, persistent=False)  # [K] from calibrate(); router.json keeps it
        self.register_buffer("fixed_codes", None, persistent=False)  # [K, layout.size] 0/1
        self.register_buffer("soft_codes", None, persistent=False)  # [K, layout.size]: the authors' embedding_gs

    @property
    def num_experts(self) -> int:
        return self.codebook.shape[0]

    @property
    def threshold_noise(self) -> float:
        """The constant standing in for the Gumbel noise in deterministic gates (a sampled code: the mean)."""
        value = EXPERT_THRESHOLDS[self.expert_threshold]
        return EXPERT_THRESHOLDS["mean"] if value is None else value

    def gates(self, logits: torch.Tensor, noisy: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """Gate values: with a Gumbel draw per entry (``noisy``), else with the constant ``threshold_noise``."""
        if noisy:
            noise = gumbel_noise(logits.shape, logits.device, generator)
        else:
            noise = torch.full_like(logits, self.threshold_noise)
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
            if not self.optimal_transport:
                expert = scores.argmax(dim=1)
            elif self.assignment == "capacity":
                expert = balanced_assignment(sinkhorn(scores, self.sinkhorn_iters))
            else:
                expert = sinkhorn(scores, self.sinkhorn_iters).argmax(dim=1)
        return Routing(mask=codes[expert], arch=arch, expert=expert)

    @torch.no_grad()
    def expert_codes(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Hard 0/1 codes [K, layout.size] of the experts: ``fixed_codes`` if set, else the codebook thresholded
        under ``expert_threshold`` (``sample``: one Gumbel draw from ``generator``); each sub-gate keeps at least one
        entry."""
        from .layout import binarize

        if self.fixed_codes is not None:
            return self.fixed_codes.clone()
        logits = self.codebook.float()
        return binarize(self.gates(logits, noisy=self.expert_threshold == "sample", generator=generator), self.layout)

    @torch.no_grad()
    def expert_mask(self, k: int) -> torch.Tensor:
        """Hard 0/1 mask [layout.size] of expert ``k`` (see ``expert_codes``; a sampled code needs fixed_codes)."""
        if self.fixed_codes is None and self.expert_threshold == "sample":
            raise ValueError("a sampled expert code is drawn once (expert_codes) and kept in fixed_codes")
        return self.expert_codes()[k]

    @torch.no_grad()
    def cosines(self, embeddings: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """Cosine [N, K] (float64) between each prompt's deterministic architecture and each expert's code."""
        with torch.autocast(embeddings.device.type, enabled=False):  # the same experts under any precision
            codes = self.fixed_codes if self.fixed_codes is not None else self.gates(self.codebook.float(), False)
            codes = self.normalize(codes.double())
            out = []
            for i in range(0, len(embeddings), batch_size):
                e = embeddings[i : i + batch_size].float()
                out.append(self.normalize(self.gates(self.predict(e), noisy=False).double()) @ codes.t())
        return torch.cat(out) if out else embeddings.new_zeros((0, self.num_experts), dtype=torch.float64)

    @torch.no_grad()
    def authors_cosines(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosines [N, K] (float64) of the authors' routing: each prompt's gates under their fixed noise
        (``authors_noise``, rows taken in batches of ``AUTHORS_BATCH``) with the non-zero rule, against the experts'
        stored sampled codes (``soft_codes``, else the binary codes), both normalised by ``authors_normalize``."""
        with torch.autocast(embeddings.device.type, enabled=False):
            codes = self.soft_codes if self.soft_codes is not None else self.expert_codes()
            codes = authors_normalize(codes.double(), self.layout)
            out = [embeddings.new_zeros((0, self.num_experts), dtype=torch.float64)]
            for i in range(0, len(embeddings), AUTHORS_BATCH):
                logits = self.predict(embeddings[i : i + AUTHORS_BATCH].float()).double()
                noise = authors_noise(len(logits), self.layout).to(logits)
                gates = gumbel_gates(logits, self.layout.width_size, self.order, noise, self.temperature, self.offset)
                out.append(authors_normalize(nonzero_width(gates, self.layout), self.layout) @ codes.t())
        return torch.cat(out)

    def calibrate(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Set and return ``log_v`` from the prompt embeddings the router was trained on (``calibrate``)."""
        self.log_v = calibrate(self.cosines(embeddings), self.sinkhorn_temperature).to(self.codebook.device)
        return self.log_v

    @torch.no_grad()
    def route(self, embeddings: torch.Tensor, rule: str | None = None) -> torch.Tensor:
        """Expert id per prompt [B] at inference, by ``rule`` (default ``self.routing``): ``calibrated``,
        ``argmax_k cos_k / temperature + log v_k``; ``cosine``, the plain cosine argmax; ``authors``, their rule
        (``authors_cosines``: the expert of a prompt depends on its place in ``embeddings``, modulo 2048).

        Scores are taken in float64 and near-ties (identical codes) go to the lowest index, so a prompt's expert
        does not depend on the batch size or its position in the batch (BLAS may sum in another order).
        """
        rule = rule or self.routing
        if rule not in ROUTING_RULES:
            raise UserError(f"routing {rule!r}: expected one of {', '.join(ROUTING_RULES)}")
        if rule == "authors":
            return self.authors_cosines(embeddings).argmax(dim=1)  # the first maximum, as theirs
        score = self.cosines(embeddings)
        if rule == "calibrated" and self.num_experts > 1:  # one expert: nothing to balance
            if self.log_v is None:
                raise UserError(
                    "this router has no routing calibration (log v_k): run `python -m aptp.calibrate_routing "
                    "--pruning_dir <dir>` once, or route by plain cosine (routing: cosine)"
                )
            score = score / self.sinkhorn_temperature + self.log_v.to(score)
        return (score >= score.max(dim=1, keepdim=True).values - TIE_TOLERANCE).int().argmax(dim=1)
