"""Recover a pruned DiT with Masked Knowledge Distillation from its dense teacher (TinyFusion).

    torchrun --nproc_per_node=8 train_masked_kd.py --model DiT-D14/2 --load-weight pruned/D14.pt \
        --teacher DiT-XL/2 --load-teacher DiT-XL-2-256x256.pt --data-path features --max-steps 100000

loss = alpha * (MSE(eps_s, eps_t) + VB-KD) + (1 - alpha) * (MSE(eps_s, noise) + VB) + beta * feature loss.
VB-KD is DiT's VB term with the teacher's p(x_{t-1} | x_t) in place of the true posterior, as in the
authors' code: for t > 0 the KL between the teacher's and the student's Gaussians for x_{t-1}, at t = 0
the decoder NLL of x_0 under the student's Gaussian (the same value as VB there); the student mean is
detached (it trains the variance channels). The feature loss compares paired block outputs after
zeroing, per sample and separately for student and teacher, the positions at least ``--mask-std``
standard deviations from the mean: DiT has a few huge activations that make plain feature KD diverge.

beta decays linearly from ``--beta-feat`` toward 0 over training. ``--beta-schedule epoch`` (default, the
authors'): constant within an epoch, beta_e = beta_feat * (1 - e / E) for epoch e of E (E = --epochs, or
the epochs that --max-steps spans). ``--beta-schedule step``: beta = beta_feat * (1 - step / max_steps),
updated every step.

The authors' ``--vae``, ``--strict`` and ``--strong-aug`` are accepted. Training reads extracted latents,
so ``--vae`` (ema | mse | none | a local VAE folder) names the VAE the features must come from and is
checked against their manifest (default: whatever they were encoded with). Weights load strictly here
whether or not ``--strict`` is given. ``--strong-aug`` has nothing more to add on latents: the flip view
is already drawn with probability 0.5 at every step (a note is printed).
"""

from __future__ import annotations

import argparse
import math

import torch

from diffcompress.checkpoint import load_dit_weights, read_metadata
from diffcompress.cli import ArgumentParser, non_negative_float, positive_int, run, unit_float
from diffcompress.data import check_features_vae, open_features
from diffcompress.distributed import cleanup, seed_everything, setup_distributed
from diffcompress.downloads import resolve_checkpoint
from diffcompress.trainer import TrainResult, add_training_args, compile_blocks, total_steps, train
from diffusion import create_diffusion
from models_with_layer_pruning import DiT, DiT_models, create_model

Pairs = list[tuple[int, int]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(DiT_models), default="DiT-D14/2", help="the student")
    p.add_argument(
        "--depth", type=positive_int, default=None, help="override the student's depth (a model pruned from it)"
    )
    p.add_argument("--load-weight", default=None, help="the student's initial (pruned) weights")
    p.add_argument("--teacher", choices=list(DiT_models), default="DiT-XL/2")
    p.add_argument("--load-teacher", required=True, help="the teacher's weights (any checkpoint format)")
    p.add_argument("--data-path", required=True, help="extracted features (either layout of extract_features.py)")
    p.add_argument(
        "--image-size", type=positive_int, default=None, help="checked against the features (latents = size / 8)"
    )
    p.add_argument("--num-classes", type=positive_int, default=1000)
    p.add_argument("--alpha-kd", type=unit_float, default=0.9, help="weight of the distillation terms")
    p.add_argument(
        "--beta-feat", type=non_negative_float, default=1e-2, help="initial weight of the feature loss (-> 0)"
    )
    p.add_argument("--beta-schedule", choices=["epoch", "step"], default="epoch",
                   help="decay beta once per epoch (the authors') or at every step")  # fmt: skip
    p.add_argument("--mask-std", type=non_negative_float, default=2.0, help="mask |h - mean| >= k std (0: no masking)")
    p.add_argument("--layer-pairs", default=None, help="student:teacher pairs, e.g. '0:1,1:3' (default: see docs)")
    p.add_argument("--vae", default=None,
                   help="ema | mse | none | a local VAE folder: the VAE the features were encoded with, checked "
                        "against their manifest (default: not checked)")  # fmt: skip
    p.add_argument("--strict", action="store_true", help="load weights strictly (always so here; accepted)")
    p.add_argument("--strong-aug", action="store_true", help="accepted; on latents the flip view is always drawn")
    add_training_args(p, epochs=1400)  # DiT's and train.py's default
    p.set_defaults(prefix="masked-kd")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------- layer pairs


def parse_pairs(text: str, student_depth: int, teacher_depth: int) -> Pairs:
    try:
        pairs = [(int(a), int(b)) for a, b in (part.split(":") for part in text.replace(" ", "").split(",") if part)]
    except ValueError:
        raise ValueError(f"--layer-pairs {text!r}: expected 'student:teacher' pairs like '0:1,1:3'") from None
    bad = [(s, t) for s, t in pairs if not (0 <= s < student_depth and 0 <= t < teacher_depth)]
    if not pairs or bad:
        raise ValueError(
            f"--layer-pairs {text!r}: pairs {bad} out of range (student 0..{student_depth - 1}, "
            f"teacher 0..{teacher_depth - 1})"
        )
    return pairs


def default_pairs(metadata: dict | None, student_depth: int, teacher_depth: int) -> Pairs:
    """Each group's last kept student block with the teacher block that ends the group (i -> 2i+1 for
    1:2 groups); without group metadata, student block i with teacher block round((i+1) T / S) - 1."""
    if metadata and metadata.get("groups") and metadata.get("kept_indices"):
        kept, pairs, start = metadata["kept_indices"], [], 0
        if sum(m for _, m in metadata["groups"]) == teacher_depth and len(kept) == student_depth:
            for _, m in metadata["groups"]:
                inside = [s for s, k in enumerate(kept) if start <= k < start + m]
                if inside:
                    pairs.append((inside[-1], start + m - 1))
                start += m
            return pairs
    return [(i, round((i + 1) * teacher_depth / student_depth) - 1) for i in range(student_depth)]


# ---------------------------------------------------------------------------------------- the loss


def mask_massive(h: torch.Tensor, k: float) -> torch.Tensor:
    """Zero the positions of ``h`` [B, ...] at least k per-sample standard deviations from the sample mean."""
    if k <= 0:
        return h
    dims = tuple(range(1, h.dim()))
    mean, std = h.mean(dim=dims, keepdim=True), h.std(dim=dims, keepdim=True)
    return h * ((h - mean).abs() < k * std)


def masked_feature_loss(student: torch.Tensor, teacher: torch.Tensor, k: float) -> torch.Tensor:
    """MSE between the masked student and the masked teacher features (each masked by its own statistics)."""
    return (mask_massive(student.float(), k) - mask_massive(teacher.float(), k)).square().mean()


def feature_weight(beta0: float, step: int, max_steps: int, steps_per_epoch: int | None, schedule: str) -> float:
    """beta at ``step``: linear decay from beta0, per epoch (steps_per_epoch steps each; None: the whole
    run is one epoch) or per step."""
    if schedule == "step":
        return beta0 * max(0.0, 1.0 - step / max_steps)
    spe = steps_per_epoch or max_steps
    epochs = max(1, math.ceil(max_steps / spe))
    return beta0 * max(0.0, 1.0 - (step // spe) / epochs)


class MaskedKD:
    """The objective for the shared training loop; holds the frozen teacher and the feature hooks.

    ``steps_per_epoch``: the loop's steps per epoch (dataset size // global batch), for the per-epoch beta.
    """

    def __init__(
        self, student: DiT, teacher: DiT, pairs: Pairs, args: argparse.Namespace, max_steps: int,
        steps_per_epoch: int | None = None,
    ):  # fmt: skip
        self.teacher = teacher.eval().requires_grad_(False)
        self.diffusion = create_diffusion("")
        self.pairs, self.max_steps, self.steps_per_epoch = pairs, max_steps, steps_per_epoch
        self.alpha, self.beta0, self.mask_std = args.alpha_kd, args.beta_feat, args.mask_std
        self.beta_schedule = getattr(args, "beta_schedule", "epoch")
        self.features: dict[tuple[str, int], torch.Tensor] = {}
        for s, t in pairs:
            student.blocks[s].register_forward_hook(self._keep("student", s))
            teacher.blocks[t].register_forward_hook(self._keep("teacher", t))

    def _keep(self, who: str, index: int):
        def hook(module, inputs, output):
            self.features[(who, index)] = output

        return hook

    def __call__(self, model, x, y, step) -> dict[str, torch.Tensor]:
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=x.device)
        return self.losses(model, x, y, t, torch.randn_like(x), step)

    def losses(self, model, x, y, t, noise, step) -> dict[str, torch.Tensor]:
        """The batch-mean terms at timesteps ``t`` with ``noise`` (``__call__`` draws both)."""
        diffusion = self.diffusion
        x_t = diffusion.q_sample(x, t, noise)
        out_s, drops = model(x_t, t, y, return_drop_ids=True)
        with torch.no_grad():  # the teacher sees exactly the student's label drops
            out_t = self.teacher(x_t, t, y, force_drop_ids=drops)
        terms = diffusion.distillation_losses_from_output(out_s.float(), out_t.float(), x, x_t, t, noise)
        feat = torch.stack([
            masked_feature_loss(self.features[("student", s)], self.features[("teacher", t_)], self.mask_std)
            for s, t_ in self.pairs
        ]).mean()  # fmt: skip
        self.features.clear()
        beta = feature_weight(self.beta0, step, self.max_steps, self.steps_per_epoch, self.beta_schedule)
        kd_mse, vb_kd = terms["kd_mse"].mean(), terms["vb_kd"].mean()
        loss = self.alpha * (kd_mse + vb_kd) + (1 - self.alpha) * terms["loss"].mean() + beta * feat
        return {"loss": loss, "kd_mse": kd_mse, "vb_kd": vb_kd, "mse": terms["mse"].mean(),
                "vb": terms["vb"].mean(), "feat": feat, "beta": torch.tensor(beta, device=x.device)}  # fmt: skip


# ---------------------------------------------------------------------------------------- the authors' flags


# ---------------------------------------------------------------------------------------- script


def main(args: argparse.Namespace) -> TrainResult:
    info = setup_distributed(args.device)
    args.load_weight = resolve_checkpoint(args.load_weight, "--load-weight")  # a released name or run prefix
    args.load_teacher = resolve_checkpoint(args.load_teacher, "--load-teacher")
    seed_everything(args.global_seed, info.rank, info.world_size)
    dataset = open_features(args.data_path, args.image_size, args.num_classes)
    check_features_vae(args.vae, dataset)
    if args.strong_aug and info.is_main:
        print("--strong-aug: the features are latents; each step already draws the original or flipped view")
    channels, latent, _ = dataset.latent_shape
    shape = dict(input_size=latent, num_classes=args.num_classes, in_channels=channels)
    student = create_model(args.model, **shape, **({"depth": args.depth} if args.depth else {}))
    if args.load_weight:
        load_dit_weights(student, args.load_weight, flag="--load-weight")
    teacher = create_model(args.teacher, **shape)
    load_dit_weights(teacher, args.load_teacher, flag="--load-teacher", model_flag="--teacher")
    teacher.to(info.device)
    if args.compile:  # the loop compiles the student; the teacher's forward is a large share of the step
        compile_blocks(teacher)
    if args.layer_pairs:
        pairs = parse_pairs(args.layer_pairs, student.depth, teacher.depth)
    else:
        meta = read_metadata(args.load_weight) if args.load_weight else None
        pairs = default_pairs(meta, student.depth, teacher.depth)
    if info.is_main:
        print(f"feature pairs (student:teacher): {','.join(f'{s}:{t}' for s, t in pairs)}")
    steps_per_epoch = len(dataset) // args.global_batch_size  # as the loop's sampler
    objective = MaskedKD(student, teacher, pairs, args, total_steps(args, len(dataset)), steps_per_epoch)
    try:
        return train(args, info, student, objective, dataset)
    finally:
        cleanup()


if __name__ == "__main__":
    run(lambda: main(parse_args()))
