"""The one training loop: fine-tuning, Masked KD and learnable pruning differ only in the objective.

What it guarantees, at any scale (one CPU process up to many GPU nodes under torchrun):
- the global batch is split exactly over ranks; every step draws a contiguous chunk of a seeded
  per-epoch permutation, so the data order depends only on (seed, step), not on the world size;
- randomness inside a step (timesteps, noise, label drops, the latent view) is seeded from
  (seed, rank, step), so a resumed run repeats exactly what an uninterrupted one would have done;
- checkpoints ``{model, ema, opt, sched, train_steps, args}`` are written atomically, every
  ``--ckpt-every`` steps, at the end, and when SIGTERM/SIGUSR1 (preemption) arrives;
- non-finite losses skip the step and are counted; too many stop the run with a clear message.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from .checkpoint import load_file, save_checkpoint
from .distributed import DistInfo, autocast, get_logger, per_rank_batch, resolve_precision
from .ema import create_ema, update_ema
from .errors import UserError

# An objective maps (model, latents, labels, step) to a dict of scalar tensors with at least "loss".
Objective = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, int], dict[str, torch.Tensor]]


class TrainingError(UserError):
    """The run cannot go on (diverged, bad resume); the message says why and what to do."""


def diffusion_objective(diffusion) -> Objective:
    """The DiT loss: MSE on the noise plus the variational bound (learned variance), batch-averaged."""

    def objective(model, x, y, step):
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device)
        return {k: v.mean() for k, v in diffusion.training_losses(model, x, t, dict(y=y)).items()}

    return objective


def add_training_args(
    parser: argparse.ArgumentParser,
    *,
    lr: float = 2e-4,
    lr_min: float = 1e-4,
    ema_decay: float = 0.9999,
    global_batch_size: int = 256,
    schedule: str = "cosine",
) -> None:
    """The flags every training script shares (defaults: the paper's fine-tuning recipe)."""
    g = parser.add_argument_group("training")
    g.add_argument("--results-dir", default="results")
    g.add_argument("--prefix", default="train", help="experiment folder: <results-dir>/<prefix>-<model>")
    g.add_argument("--epochs", type=int, default=None, help="train this many epochs (or use --max-steps)")
    g.add_argument("--max-steps", type=int, default=None, help="train this many steps (overrides --epochs)")
    g.add_argument("--global-batch-size", type=int, default=global_batch_size)
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--lr-min", type=float, default=lr_min, help="floor of the cosine schedule")
    g.add_argument("--lr-schedule", choices=["cosine", "constant"], default=schedule)
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 disables)")
    g.add_argument("--ema-decay", type=float, default=ema_decay)
    g.add_argument("--global-seed", type=int, default=0)
    g.add_argument("--num-workers", type=int, default=4)
    g.add_argument("--log-every", type=int, default=100)
    g.add_argument("--ckpt-every", type=int, default=10_000)
    g.add_argument("--keep-last", type=int, default=0, help="keep only the newest K checkpoints (0 keeps all)")
    g.add_argument("--resume", default=None, help="a checkpoint to continue from, or 'auto' for the newest one")
    g.add_argument("--max-nan-steps", type=int, default=100, help="stop after this many non-finite losses")
    g.add_argument("--precision", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    g.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    g.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (WANDB_MODE=offline works)")


# ---------------------------------------------------------------------------------------------- data


class StepSampler(Sampler[int]):
    """Indices for this rank: step s of epoch e takes rows [s*G, (s+1)*G) of a permutation seeded by
    (seed, e), G the global batch, and rank r the r-th slice of that chunk. Starts mid-epoch on resume."""

    def __init__(self, size: int, global_batch: int, rank: int, world: int, seed: int):
        self.size, self.global_batch, self.rank, self.world, self.seed = size, global_batch, rank, world, seed
        self.per_rank = global_batch // world
        self.steps_per_epoch = size // global_batch
        self.epoch, self.start_step = 0, 0

    def set_position(self, epoch: int, step_in_epoch: int) -> None:
        self.epoch, self.start_step = epoch, step_in_epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=g)[: self.steps_per_epoch * self.global_batch]
        chunks = order.view(self.steps_per_epoch, self.world, self.per_rank)[self.start_step :, self.rank]
        return iter(chunks.flatten().tolist())

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.per_rank


def step_seed(seed: int, rank: int, step: int) -> int:
    """A well-mixed seed for one rank's step: resuming at any step reproduces its random draws."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


def choose_view(x: torch.Tensor) -> torch.Tensor:
    """Features stored as [B, V, C, H, W] (V=2: original and h-flipped): take one view per sample."""
    if x.dim() == 4:
        return x
    pick = torch.randint(0, x.shape[1], (x.shape[0],), device=x.device)
    return x[torch.arange(x.shape[0], device=x.device), pick]


# -------------------------------------------------------------------------------------------- schedule


def lr_factor(step: int, args: argparse.Namespace, max_steps: int) -> float:
    """Multiplier of each group's base lr: linear warm-up, then cosine from 1 down to lr_min/lr (or constant)."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    if args.lr_schedule == "constant":
        return 1.0
    floor = args.lr_min / args.lr
    progress = min(1.0, (step - args.warmup_steps) / max(1, max_steps - args.warmup_steps))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# -------------------------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    train_steps: int
    checkpoint: Path | None
    experiment_dir: Path
    preempted: bool = False
    skipped_steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    ema: torch.nn.Module | None = None


class _Preemption:
    """Turns SIGTERM/SIGUSR1 into a flag checked between steps (a checkpoint, then a clean exit)."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def total_steps(args: argparse.Namespace, dataset_size: int) -> int:
    """--max-steps, or --epochs of full global batches."""
    if args.max_steps is not None:
        return args.max_steps
    if args.epochs is not None:
        return args.epochs * (dataset_size // args.global_batch_size)
    raise TrainingError("give --max-steps or --epochs")


def experiment_dir(args: argparse.Namespace) -> Path:
    return Path(args.results_dir) / f"{args.prefix}-{args.model.replace('/', '-')}"


def find_latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    found = sorted(checkpoint_dir.glob("[0-9]*.pt"))
    return found[-1] if found else None


def train(
    args: argparse.Namespace,
    info: DistInfo,
    model: torch.nn.Module,
    objective: Objective,
    dataset: Dataset,
    param_groups: Iterable[dict[str, Any]] | None = None,
    on_log: Callable[[int, dict[str, float], torch.nn.Module, torch.nn.Module], None] | None = None,
    extra_state: Callable[[], dict[str, Any]] | None = None,
    restore_extra: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``model`` on ``dataset`` (items: features, label) by minimising ``objective``.

    ``param_groups``: optimiser groups (default: every parameter that requires grad), each may carry
    an ``lr`` (the schedule scales every group alike). ``on_log(step, metrics, model, ema)`` runs on
    every rank at each log interval. ``extra_state()`` adds entries to each checkpoint, and
    ``restore_extra(checkpoint)`` gets them back on resume.
    """
    device = info.device
    precision = resolve_precision(args.precision, device)
    per_rank = per_rank_batch(args.global_batch_size, info.world_size)
    exp_dir = experiment_dir(args)
    ckpt_dir = exp_dir / "checkpoints"
    logger = get_logger("train", exp_dir if info.is_main else None, info.rank)

    if len(dataset) < args.global_batch_size:
        raise TrainingError(
            f"the dataset has {len(dataset)} samples, fewer than --global-batch-size {args.global_batch_size}"
        )
    sampler = StepSampler(len(dataset), args.global_batch_size, info.rank, info.world_size, args.global_seed)
    max_steps = total_steps(args, len(dataset))

    model.to(device)
    if args.grad_checkpointing:
        model.enable_gradient_checkpointing()
    ema = create_ema(model)
    groups = list(param_groups) if param_groups is not None else [
        {"params": [p for p in model.parameters() if p.requires_grad]}
    ]  # fmt: skip
    for g in groups:
        g.setdefault("lr", args.lr)
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args, max_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    trained = [p for g in opt.param_groups for p in g["params"]]
    max_norm = args.grad_clip if args.grad_clip > 0 else float("inf")

    train_steps = 0
    resume_path = args.resume
    if resume_path == "auto":
        resume_path = find_latest_checkpoint(ckpt_dir)
        if resume_path is None:
            logger.info(f"--resume auto: no checkpoint in {ckpt_dir}, starting from scratch")
    if resume_path:
        state = load_file(resume_path)
        missing = {"model", "ema", "opt", "sched", "train_steps"} - set(state)
        if missing:
            raise TrainingError(f"--resume {resume_path}: not a training checkpoint (no {', '.join(sorted(missing))})")
        saved = state.get("args", {})
        if saved.get("global_batch_size") not in (None, args.global_batch_size):
            raise TrainingError(
                f"--resume {resume_path}: it was trained with --global-batch-size {saved['global_batch_size']}, "
                f"not {args.global_batch_size}; the data order would not continue exactly"
            )
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        train_steps = int(state["train_steps"])
        if restore_extra is not None:
            restore_extra(state)
        logger.info(f"resumed from {resume_path} at step {train_steps}")
        del state

    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if info.distributed else model
    model.train()
    loader = DataLoader(
        dataset, batch_size=per_rank, sampler=sampler, num_workers=args.num_workers,
        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=False,
    )  # fmt: skip
    if info.is_main:
        exp_dir.mkdir(parents=True, exist_ok=True)
        (exp_dir / "args.json").write_text(json.dumps(vars(args), indent=2, default=str) + "\n")
    metrics_file = open(exp_dir / "metrics.jsonl", "a") if info.is_main else None
    wandb_run = _init_wandb(args, exp_dir) if info.is_main and args.wandb else None

    def save(step: int) -> Path:
        path = ckpt_dir / f"{step:07d}.pt"
        if info.is_main:
            state = {
                "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict(), "train_steps": step, "args": vars(args),
                **(extra_state() if extra_state else {}),
            }  # fmt: skip
            save_checkpoint(state, path)
            if args.keep_last > 0:
                for old in sorted(ckpt_dir.glob("[0-9]*.pt"))[: -args.keep_last]:
                    old.unlink()
            logger.info(f"saved checkpoint {path}")
        if info.distributed:
            dist.barrier()
        return path

    preemption = _Preemption()
    running: dict[str, torch.Tensor] = {}
    skipped = nan_total = 0
    history: list[dict[str, float]] = []
    last_ckpt: Path | None = None
    saved_step = -1
    log_start, log_step0 = time.perf_counter(), train_steps
    bar = tqdm(total=max_steps, initial=train_steps, desc="train", disable=not info.is_main, dynamic_ncols=True)
    preempted = False
    try:
        while train_steps < max_steps and not preempted:
            epoch, in_epoch = divmod(train_steps, sampler.steps_per_epoch)
            sampler.set_position(epoch, in_epoch)
            for x, y in loader:
                torch.manual_seed(step_seed(args.global_seed, info.rank, train_steps))
                x = choose_view(x.to(device, non_blocking=True))
                y = y.to(device, non_blocking=True)
                with autocast(device, precision):
                    terms = objective(ddp_model, x, y, train_steps)
                loss = terms["loss"]
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                norm = torch.nn.utils.clip_grad_norm_(trained, max_norm)
                # grads are all-reduced, so every rank sees the same norm and takes the same decision
                if torch.isfinite(norm):
                    scaler.step(opt)
                    update_ema(ema, model, args.ema_decay)
                else:
                    skipped += 1
                    nan_total += 1
                    if nan_total > args.max_nan_steps:
                        raise TrainingError(
                            f"{nan_total} steps had a non-finite loss or gradient (bound --max-nan-steps "
                            f"{args.max_nan_steps}); lower --lr, use --precision fp32/bf16, or resume from an "
                            f"earlier checkpoint"
                        )
                scaler.update()
                sched.step()
                train_steps += 1
                bar.update(1)
                for k, v in terms.items():
                    v = v.detach().float()
                    running[k] = running[k] + v if k in running else v

                if train_steps % args.log_every == 0 or train_steps == max_steps:
                    n = train_steps - log_step0
                    elapsed = time.perf_counter() - log_start
                    record = {k: _mean_over_ranks(v / n, info) for k, v in running.items()}
                    record.update(step=train_steps, steps_per_sec=n / elapsed, lr=sched.get_last_lr()[0],
                                  skipped=skipped)  # fmt: skip
                    if info.is_main:
                        terms_text = " ".join(f"{k}={v:.4f}" for k, v in record.items() if k in running)
                        logger.info(
                            f"(step={train_steps:07d}) {terms_text} steps/s={record['steps_per_sec']:.2f} "
                            f"lr={record['lr']:.2e}" + (f" skipped={skipped}" if skipped else "")
                        )
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                        if wandb_run is not None:
                            wandb_run.log(record, step=train_steps)
                    if on_log is not None:
                        on_log(train_steps, record, model, ema)
                    history.append(record)
                    running, skipped = {}, 0
                    log_start, log_step0 = time.perf_counter(), train_steps

                if train_steps % args.ckpt_every == 0 or train_steps == max_steps:
                    last_ckpt, saved_step = save(train_steps), train_steps
                if _any_rank(preemption.requested, info):
                    logger.info(f"preemption signal: checkpointing at step {train_steps} and exiting")
                    if saved_step != train_steps:
                        last_ckpt, saved_step = save(train_steps), train_steps
                    preempted = True
                    break
                if train_steps >= max_steps:
                    break
        if saved_step != train_steps:  # e.g. resumed at max_steps already
            last_ckpt = save(train_steps)
    finally:
        bar.close()
        preemption.restore()
        if metrics_file is not None:
            metrics_file.close()
        if wandb_run is not None:
            wandb_run.finish()
    model.eval()
    if info.is_main:
        state = "preempted" if preempted else "done"
        logger.info(f"{state} at step {train_steps}; experiment folder {exp_dir}, last checkpoint {last_ckpt}")
    return TrainResult(train_steps, last_ckpt, exp_dir, preempted, nan_total, history, ema)


def _mean_over_ranks(x: torch.Tensor, info: DistInfo) -> float:
    if info.distributed:
        x = x.clone()
        dist.all_reduce(x)
        x /= info.world_size
    return x.item()


def _any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if any rank has the flag (a signal may reach only some processes)."""
    if not info.distributed:
        return flag
    t = torch.tensor([int(flag)], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _init_wandb(args: argparse.Namespace, exp_dir: Path):
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb needs the wandb package: pip install wandb") from None
    return wandb.init(project="diffcompress", name=exp_dir.name, dir=str(exp_dir), config=vars(args))
