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
import contextlib
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

from .checkpoint import load_file, remove_partial_writes, save_checkpoint
from .cli import non_negative_float, non_negative_int, positive_float, positive_int, unit_float
from .distributed import DistInfo, autocast, get_logger, per_rank_batch, resolve_precision, set_tf32
from .ema import create_ema, update_ema
from .errors import UserError
from .progress import progress_bar

RESULTS_DIR = "outputs"  # the authors' default: outputs/<prefix>-<model>/checkpoints/0500000.pt
LEGACY_RESULTS_DIR = "results"  # this repository's default before it took the authors'

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
    epochs: int | None = None,
) -> None:
    """The flags every training script shares (defaults: the paper's fine-tuning recipe).

    The run is ``--max-steps`` steps, else ``--epochs`` epochs of full global batches. An epoch-based run
    moves its cosine once per epoch (the authors' CosineAnnealingLR(T_max=epochs) stepped per epoch); a
    step-based one at every step."""
    g = parser.add_argument_group("training")
    g.add_argument("--results-dir", default=RESULTS_DIR, help=f"experiment folders go here (default {RESULTS_DIR})")
    g.add_argument("--prefix", default="train", help="experiment folder: <results-dir>/<prefix>-<model>")
    default_text = f" (default {epochs})" if epochs else ""
    g.add_argument("--epochs", type=positive_int, default=epochs,
                   help=f"train this many epochs; the cosine lr moves once per epoch{default_text}")  # fmt: skip
    g.add_argument("--max-steps", type=positive_int, default=None,
                   help="train this many steps instead (overrides --epochs; the cosine moves every step)")  # fmt: skip
    g.add_argument("--global-batch-size", type=positive_int, default=global_batch_size)
    g.add_argument("--lr", type=positive_float, default=lr)
    g.add_argument("--lr-min", type=non_negative_float, default=lr_min, help="floor of the cosine schedule")
    g.add_argument("--lr-schedule", choices=["cosine", "constant"], default=schedule)
    g.add_argument("--warmup-steps", type=non_negative_int, default=0)
    g.add_argument("--weight-decay", type=non_negative_float, default=0.0)
    g.add_argument("--grad-clip", type=non_negative_float, default=1.0, help="max gradient norm (0 disables)")
    g.add_argument("--ema-decay", type=unit_float, default=ema_decay)
    g.add_argument("--global-seed", type=non_negative_int, default=0)
    g.add_argument("--num-workers", type=non_negative_int, default=4)
    g.add_argument("--log-every", type=positive_int, default=100)
    g.add_argument("--ckpt-every", type=positive_int, default=10_000)
    g.add_argument(
        "--keep-last", type=non_negative_int, default=0, help="keep only the newest K checkpoints (0 keeps all)"
    )
    g.add_argument("--resume", default=None, help="a checkpoint to continue from, or 'auto' for the newest one")
    g.add_argument("--max-nan-steps", type=non_negative_int, default=100, help="stop after this many non-finite losses")
    g.add_argument("--max-nan-share", type=unit_float, default=0.5,
                   help="fail a run that skipped more than this share of its steps as non-finite (a run that skipped "
                   "all of them always fails)")  # fmt: skip
    g.add_argument("--precision", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16")
    g.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 matmuls on CUDA (DiT's default; --no-tf32: full fp32 where fp32 runs)")  # fmt: skip
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    g.add_argument("--grad-accum-steps", type=positive_int, default=1,
                   help="split each rank's batch into this many micro-batches (same update, less memory)")  # fmt: skip
    g.add_argument("--compile", action="store_true", help="torch.compile every transformer block (slow first steps)")
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

    def step_indices(self, step: int) -> list[int]:
        """The dataset indices this rank trains on at global step ``step`` (to name a bad sample)."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.size, generator=g)[: self.steps_per_epoch * self.global_batch]
        return order.view(self.steps_per_epoch, self.world, self.per_rank)[in_epoch, self.rank].tolist()


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


def lr_factor(step: int, args: argparse.Namespace, max_steps: int, steps_per_epoch: int | None = None) -> float:
    """Multiplier of each group's base lr: linear warm-up, then cosine from 1 down to lr_min/lr (or constant).

    An epoch-based run (``--epochs`` without ``--max-steps``, and ``steps_per_epoch`` given) holds the lr
    within an epoch: epoch e of E gets the cosine at e / E, as the authors' per-epoch scheduler step."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    if args.lr_schedule == "constant":
        return 1.0
    floor = args.lr_min / args.lr
    if epoch_based(args) and steps_per_epoch:
        progress = min(1.0, (step // steps_per_epoch) / args.epochs)
    else:
        progress = min(1.0, (step - args.warmup_steps) / max(1, max_steps - args.warmup_steps))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def epoch_based(args: argparse.Namespace) -> bool:
    """The run's length is --epochs (the authors' flag), not --max-steps."""
    return args.max_steps is None and args.epochs is not None


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


def _refuse_legacy_folder(args: argparse.Namespace, exp_dir: Path) -> None:
    """``--resume auto`` under the default ``outputs`` while the run's checkpoints are in the old default
    ``results``: stop with the flag that continues it, rather than start over."""
    if args.results_dir != RESULTS_DIR:
        return
    old = Path(LEGACY_RESULTS_DIR) / exp_dir.name / "checkpoints"
    if find_latest_checkpoint(old) is not None:
        raise TrainingError(
            f"--resume auto: no checkpoint in {exp_dir / 'checkpoints'}, but {old} holds this run's checkpoints (the "
            f"default --results-dir was {LEGACY_RESULTS_DIR}, now {RESULTS_DIR}): pass --results-dir "
            f"{LEGACY_RESULTS_DIR} to continue it"
        )


def find_latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    found = sorted(checkpoint_dir.glob("[0-9]*.pt"))
    return found[-1] if found else None


def make_optimizer(groups: list[dict[str, Any]], args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW over ``groups``, fused: one kernel for all tensors on CUDA and CPU, and it can skip a step
    on the device (``found_inf``), which is what keeps TrainStep free of host syncs."""
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, fused=True)


def compile_blocks(model: torch.nn.Module, **compile_kwargs: Any) -> None:
    """torch.compile each transformer block in place (regional compilation: the blocks share one graph,
    so it compiles once; the model's own control flow, e.g. pruning masks, stays eager; state-dict keys
    do not change)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TrainingError(f"--compile: {type(model).__name__} has no .blocks to compile")
    for block in blocks:
        block.compile(**compile_kwargs)


class TrainStep:
    """One optimiser step of the training loop, importable on its own (bench/training.py times this).

    The rank's batch is split into ``accum_steps`` equal micro-batches; their gradients add up (DDP
    all-reduces only after the last), so the update equals that of one pass over the whole batch. A
    non-finite gradient norm skips the update on the device (fused AdamW's ``found_inf``); the EMA still
    moves toward the unchanged weights. Nothing here waits for the device: the caller reads the
    returned ``skipped`` flag when it suits it.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        objective: Objective,
        opt: torch.optim.Optimizer,
        ema: torch.nn.Module | None,
        *,
        device: torch.device,
        precision: str,
        ema_decay: float,
        grad_clip: float = 0.0,
        accum_steps: int = 1,
        forward_model: torch.nn.Module | None = None,
    ):
        if accum_steps < 1:
            raise TrainingError(f"--grad-accum-steps must be at least 1, got {accum_steps}")
        self.model, self.forward_model = model, forward_model if forward_model is not None else model
        self.objective, self.opt, self.ema = objective, opt, ema
        self.device, self.precision, self.ema_decay, self.accum_steps = device, precision, ema_decay, accum_steps
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.trained = [p for g in opt.param_groups for p in g["params"]]
        self.max_norm = grad_clip if grad_clip > 0 else float("inf")

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Train on (x, y); return the objective's terms (detached fp32, mean over micro-batches) and a
        0-d float tensor, 1 if the update was skipped."""
        n = self.accum_steps
        if len(x) % n:
            raise TrainingError(f"a batch of {len(x)} per rank does not split into --grad-accum-steps {n}")
        self.opt.zero_grad(set_to_none=True)
        totals: dict[str, torch.Tensor] = {}
        for i, (xm, ym) in enumerate(zip(x.chunk(n), y.chunk(n))):
            no_sync = i < n - 1 and isinstance(self.forward_model, DDP)
            with self.forward_model.no_sync() if no_sync else contextlib.nullcontext():
                with autocast(self.device, self.precision):
                    terms = self.objective(self.forward_model, xm, ym, step)
                self.scaler.scale(terms["loss"] / n).backward()
            for k, v in terms.items():
                v = v.detach().float() / n
                totals[k] = totals[k] + v if k in totals else v
        self.scaler.unscale_(self.opt)
        norm = torch.nn.utils.clip_grad_norm_(self.trained, self.max_norm)
        # grads are all-reduced, so every rank sees the same norm and takes the same decision
        skipped = norm.isfinite().logical_not().float()
        self.opt.found_inf = skipped  # read by fused AdamW: no update, no state change when 1
        try:
            self.opt.step()
        finally:
            del self.opt.found_inf
        self.scaler.update()
        if self.ema is not None:
            update_ema(self.ema, self.model, self.ema_decay)
        return totals, skipped


class _SkipCounter:
    """Counts skipped steps without stalling the device: on CUDA a step's flag is read once the next
    step is queued (an event wait for the earlier step only), on CPU at once."""

    def __init__(self, device: torch.device, name_rows: Callable[[int, list[int]], list[str]] | None = None):
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor, Any]] = []
        self.total = self.since_log = 0
        self.name_rows = name_rows  # (step, rows of the rank's batch) -> the samples' names
        self.bad_inputs: list[str] = []  # samples with a non-finite input, in the steps skipped

    def add(self, step: int, flag: torch.Tensor, bad_rows: torch.Tensor) -> None:
        """``bad_rows``: per row of the rank's batch, whether its input is non-finite (read only if skipped)."""
        if self.cuda:
            event = torch.cuda.Event()
            host = flag.to("cpu", non_blocking=True), bad_rows.to("cpu", non_blocking=True)
            event.record()
            self.pending.append((step, *host, event))
        else:
            self.pending.append((step, flag, bad_rows, None))

    def collect(self, keep: int | None = None) -> None:
        """Read the flags, all but the newest ``keep`` (default: 1 on CUDA, 0 on CPU)."""
        keep = (1 if self.cuda else 0) if keep is None else keep
        while len(self.pending) > keep:
            step, flag, bad_rows, event = self.pending.pop(0)
            if event is not None:
                event.synchronize()
            bad = int(flag.item())
            self.total += bad
            self.since_log += bad
            if bad and bad_rows.any() and self.name_rows is not None:
                rows = bad_rows.nonzero().flatten().tolist()
                self.bad_inputs += [n for n in self.name_rows(step, rows) if n not in self.bad_inputs]

    def inputs_text(self) -> str:
        """'; non-finite input in <names>' when skipped steps had such samples, else ''."""
        if not self.bad_inputs:
            return ""
        more = len(self.bad_inputs) - 3
        return f"; non-finite input in {', '.join(self.bad_inputs[:3])}" + (f" (+{more} more)" if more > 0 else "")


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
    set_tf32(device, args.tf32)
    per_rank = per_rank_batch(args.global_batch_size, info.world_size)
    accum = getattr(args, "grad_accum_steps", 1)
    if accum < 1 or per_rank % accum:
        raise TrainingError(
            f"--grad-accum-steps {accum} must be a positive divisor of the per-rank batch {per_rank} "
            f"(--global-batch-size {args.global_batch_size} over {info.world_size} processes)"
        )
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
    opt = make_optimizer(groups, args)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args, max_steps, sampler.steps_per_epoch))

    if info.is_main and ckpt_dir.is_dir():  # writes killed mid-way: never a checkpoint, and they can be GBs
        for tmp in remove_partial_writes(ckpt_dir):
            logger.info(f"removed {tmp}, left by a checkpoint write that did not finish")
    train_steps = 0
    resume_path = args.resume
    if resume_path == "auto":
        resume_path = find_latest_checkpoint(ckpt_dir)
        if info.distributed:  # rank 0's pick for all: one node's stale view of a shared folder must not split the run
            choice = [resume_path]
            dist.broadcast_object_list(choice, src=0)
            resume_path = choice[0]
        if resume_path is None:
            _refuse_legacy_folder(args, exp_dir)
            logger.info(f"--resume auto: no checkpoint in {ckpt_dir}, starting from scratch")
    if resume_path:
        state = load_file(resume_path)
        missing = {"model", "ema", "opt", "sched", "train_steps"} - set(state)
        if missing:
            raise TrainingError(f"--resume {resume_path}: not a training checkpoint (no {', '.join(sorted(missing))})")
        saved = state.get("args") or {}
        saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved
        _check_same_model(resume_path, saved, args)
        if saved.get("global_batch_size") not in (None, args.global_batch_size):
            raise TrainingError(
                f"--resume {resume_path}: it was trained with --global-batch-size {saved['global_batch_size']}, "
                f"not {args.global_batch_size}; the data order would not continue exactly"
            )
        try:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
        except (RuntimeError, ValueError, KeyError) as e:  # another architecture or set of trained parameters
            lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
            first = lines[1 if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else 0][:300]
            raise TrainingError(
                f"--resume {resume_path}: the checkpoint does not fit this run (--model {args.model}): {first}"
            ) from None
        train_steps = int(state["train_steps"])
        if restore_extra is not None:
            restore_extra(state)
        logger.info(f"resumed from {resume_path} at step {train_steps}")
        del state

    if getattr(args, "compile", False):
        compile_blocks(model)
    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if info.distributed else model
    step_fn = TrainStep(model, objective, opt, ema, device=device, precision=precision, ema_decay=args.ema_decay,
                        grad_clip=args.grad_clip, accum_steps=accum, forward_model=ddp_model)  # fmt: skip
    model.train()
    loader = DataLoader(
        dataset, batch_size=per_rank, sampler=sampler, num_workers=args.num_workers,
        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=args.num_workers > 0,
    )  # fmt: skip  # persistent: an epoch-based run does not start its workers again every epoch
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
    skips = _SkipCounter(device, lambda step, rows: _sample_names(dataset, sampler.step_indices(step), rows))
    start_step = train_steps

    def check_skips() -> None:
        if skips.total > args.max_nan_steps:
            raise TrainingError(
                f"{skips.total} steps had a non-finite loss or gradient (bound --max-nan-steps "
                f"{args.max_nan_steps}){skips.inputs_text()}; lower --lr, use --precision fp32/bf16, or resume from "
                f"an earlier checkpoint"
            )

    def check_share() -> None:
        """At the end: a run that learned from (almost) none of its steps is a failure, not "done"."""
        ran, share = train_steps - start_step, getattr(args, "max_nan_share", 0.5)
        if ran and skips.total == ran:
            raise TrainingError(
                f"all {ran} steps of this run were skipped: their loss or gradient was not finite{skips.inputs_text()}"
                f"; nothing was learned (check the data, lower --lr, or use --precision fp32)"
            )
        if ran and skips.total > share * ran:
            raise TrainingError(
                f"{skips.total} of {ran} steps were skipped as non-finite, more than --max-nan-share {share:g}"
                f"{skips.inputs_text()}; check the data, lower --lr, or use --precision fp32"
            )

    history: list[dict[str, float]] = []
    last_ckpt: Path | None = None
    saved_step = -1
    log_start, log_step0 = time.perf_counter(), train_steps
    bar = progress_bar(total=max_steps, initial=train_steps, desc="train", disable=not info.is_main)
    preempted = False
    try:
        while train_steps < max_steps and not preempted:
            epoch, in_epoch = divmod(train_steps, sampler.steps_per_epoch)
            sampler.set_position(epoch, in_epoch)
            for x, y in loader:
                torch.manual_seed(step_seed(args.global_seed, info.rank, train_steps))
                x = choose_view(x.to(device, non_blocking=True))
                y = y.to(device, non_blocking=True)
                bad_rows = x.flatten(1).isfinite().all(1).logical_not()  # to name a bad sample if the step skips
                terms, skipped_flag = step_fn(x, y, train_steps)
                skips.add(train_steps, skipped_flag, bad_rows)
                skips.collect()
                check_skips()
                sched.step()
                train_steps += 1
                bar.update(1)
                for k, v in terms.items():  # on the device: read only at log time
                    running[k] = running[k] + v if k in running else v

                if train_steps % args.log_every == 0 or train_steps == max_steps:
                    skips.collect(keep=0)
                    check_skips()
                    skipped = skips.since_log
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
                    running, skips.since_log = {}, 0
                    log_start, log_step0 = time.perf_counter(), train_steps

                if train_steps == max_steps:
                    check_share()  # before the last checkpoint: a run that learned nothing writes no result
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
    return TrainResult(train_steps, last_ckpt, exp_dir, preempted, skips.total, history, ema)


def _sample_names(dataset: Dataset, indices: list[int], rows: list[int]) -> list[str]:
    """Names of the samples at ``rows`` of a batch drawn from ``indices``: the dataset's file when it can say."""
    describe = getattr(dataset, "describe", None)
    return [describe(indices[r]) if describe is not None else f"sample {indices[r]}" for r in rows]


def _check_same_model(path: Any, saved: dict[str, Any], args: argparse.Namespace) -> None:
    """A checkpoint continues only a run of the same model: say which file and both models, not a shape error."""
    for flag in ("model", "depth", "groups"):
        theirs, ours = saved.get(flag), getattr(args, flag, None)
        if theirs is not None and ours is not None and theirs != ours:
            where = f" (found by --resume auto in {Path(path).parent})" if args.resume == "auto" else ""
            raise TrainingError(
                f"--resume {path}{where}: the checkpoint is of --{flag} {theirs}, this run is --{flag} {ours}: pass "
                f"--{flag} {theirs} to continue it, or another --prefix / --results-dir to start a new run"
            )


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
