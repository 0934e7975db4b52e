"""The losses of APTP's pruning stage (and the DDPM/distillation terms of fine-tuning).

UNet terms: min-SNR-weighted DDPM loss, output distillation from the dense UNet, block distillation.
Router terms: resource (hit the MAC budget on average), contrastive (similar prompts get similar
architectures), std and max (spread the per-prompt resource ratios). ``rho`` is the per-sample ratio of
prunable MACs kept (``aptp.macs``), ``target`` the prunable budget p'.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    """Weights of the pruning stage (fine-tuning configs give their own ddpm/distill/block weights)."""

    ddpm: float = 1.0
    distill: float = 0.2
    block: float = 0.2
    resource: float = 2.0
    contrastive: float = 100.0
    std: float = 0.1
    max: float = 0.1

    def total(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of the named losses (names are the fields of this class)."""
        unknown = set(losses) - set(self.__dataclass_fields__)
        if unknown:
            raise KeyError(f"no weight for losses {sorted(unknown)}")
        return sum(getattr(self, name) * value for name, value in losses.items())


def min_snr_weights(
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    gamma: float = 5.0,
    prediction_type: str = "v_prediction",
) -> torch.Tensor:
    """Per-sample Min-SNR-gamma weights (Hang et al. 2023) as the authors' trainer computes them, with
    snr = a / (1 - a), a = alphas_cumprod[t]: epsilon ``min(snr, gamma) / snr``; v-prediction
    ``min(snr + 1, gamma) / (snr + 1)`` (1 wherever snr + 1 <= gamma: 83% of SD2.1's timesteps at gamma 5).
    """
    a = alphas_cumprod.to(timesteps.device, torch.float64)[timesteps]
    snr = a / (1 - a)
    if prediction_type == "v_prediction":
        return ((snr + 1).clamp(max=gamma) / (snr + 1)).float()
    if prediction_type == "epsilon":
        return (snr.clamp(max=gamma) / snr).float()
    raise ValueError(f"min-SNR weighting: unknown prediction_type {prediction_type!r} (epsilon or v_prediction)")


def ddpm_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    gamma: float = 5.0,
    prediction_type: str = "v_prediction",
) -> torch.Tensor:
    """Batch mean of min-SNR weight x per-sample MSE between the prediction and its target (v for SD2.1)."""
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return (min_snr_weights(timesteps, alphas_cumprod, gamma, prediction_type) * per_sample).mean()


def distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between the pruned UNet's output and the dense UNet's (the teacher gets no gradient)."""
    return F.mse_loss(student.float(), teacher.detach().float())


def block_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of the MSE between matching block outputs (SD2.1: 4 down, mid, 4 up)."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"block distillation needs matching non-empty lists, got {len(student)} and {len(teacher)}")
    return torch.stack([distill_loss(s, t) for s, t in zip(student, teacher)]).mean()


def resource_loss(rho: torch.Tensor, target: float) -> torch.Tensor:
    """``|log(mean_b rho_b / p')|``: zero when the batch keeps exactly the budget, symmetric in ratio."""
    return torch.log(rho.float().mean() / target).abs()


def std_loss(rho: torch.Tensor) -> torch.Tensor:
    """``-std(rho)``, the unbiased std as the authors (a batch of one gives 0, not NaN): rewards diverse experts."""
    if rho.numel() < 2:
        return rho.float().sum() * 0
    return -rho.float().std()


def max_loss(rho: torch.Tensor) -> torch.Tensor:
    """``1 - max(rho)``: keeps at least one prompt of the batch near the dense model."""
    return 1 - rho.float().max()


def contrastive_loss(arch: torch.Tensor, prompt_emb: torch.Tensor, temperature: float = 0.03) -> torch.Tensor:
    """Make the similarity structure of architectures follow that of prompts.

    With e, z the L2-normalised rows of ``arch`` [B, n] (the predictor's architecture vectors) and
    ``prompt_emb`` [B, d]: P = rowsoftmax(e e^T / temperature), Z = rowsoftmax(z z^T / temperature), and the
    loss is the binary cross-entropy of P against the target Z, -[Z log P + (1 - Z) log(1 - P)], averaged
    over all B x B entries (diagonal included). Z carries no gradient; the loss is smallest when P = Z.
    """
    e = F.normalize(arch.float(), dim=-1)
    z = F.normalize(prompt_emb.float(), dim=-1)
    with torch.autocast(e.device.type, enabled=False):  # BCE is not autocast-safe; keep it in float32
        p = torch.softmax(e @ e.t() / temperature, dim=-1)
        target = torch.softmax(z @ z.t() / temperature, dim=-1).detach()
        return F.binary_cross_entropy(p, target)
