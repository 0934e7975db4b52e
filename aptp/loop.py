"""The training loop shared by APTP's pruning (``aptp.prune``) and fine-tuning (``aptp.finetune``) stages.

    result = run_steps(accelerator, model, optimizer, loader, sampler, step=..., lr=..., training=cfg.training,
                       logging=cfg.logging, out=out, logger=logger, desc="prune",
                       loss_fn=lambda batch, step: {..., "loss": total}, checkpoint=lambda step: ...)

Each optimizer step accumulates ``training.gradient_accumulation_steps`` micro-batches; ``loss_fn(batch, step)``
returns the values to log, ``"loss"`` being the one back-propagated. The lr rises linearly over
``training.lr_warmup_steps`` and stays constant; gradients are clipped to ``training.max_grad_norm`` if it is set
(the authors do not clip) and a step with a non-finite norm is skipped
(at most ``training.max_nan_steps`` of them). Every ``logging.logging_steps`` the running means go to ``log.txt``,
``metrics.jsonl``, the progress output and the trackers; every ``logging.checkpointing_steps`` and at the end
``checkpoint(step)`` is called, and on SIGTERM/SIGUSR1 too before the loop stops early.
"""

from __future__ import annotations

import json
import logging as pylogging
import math
import pickle
import random
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from diffcompress.checkpoint import code_message, code_references
from diffcompress.errors import UserError
from diffcompress.progress import progress_bar
from diffcompress.trainer import StepSampler, _Preemption, step_seed

from .config import FinetuneTrainingConfig, LoggingConfig, TrainingConfig


@dataclass
class LoopResult:
    step: int  # the step reached
    preempted: bool  # stopped early by a signal (a checkpoint was written)
    nan_steps: int  # steps skipped for a non-finite gradient
    unreadable: int  # unreadable images met by any process (as of the last log)


# ------------------------------------------------------------------------------------------- resuming

STATE_TYPES = {"step": int}  # in every state.json; the counts below are checked where present
OPTIONAL_TYPES = {"world_size": int, "train_batch_size": int, "gradient_accumulation_steps": int}
# the modules a plain tensor/optimizer/RNG pickle refers to; any other global is code
_DATA_MODULES = ("torch", "collections", "numpy", "_codecs")


def read_state(folder: Path, name: str, types: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    """``folder/name`` (a checkpoint's state.json) as a dict whose keys in ``types`` (and ``STATE_TYPES``) hold values
    of those types; a file that is not JSON, or a missing or mistyped entry, is a one-line error naming the file."""
    path = folder / name
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable JSON checkpoint record ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: holds a JSON {type(state).__name__}, expected an object with the step and settings")
    present = {k: v for k, v in OPTIONAL_TYPES.items() if k in state}
    for key, kind in {**STATE_TYPES, **present, **types}.items():
        value = state.get(key)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if key not in state or isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            want = " or ".join(k.__name__ for k in kinds)
            raise UserError(f"{path}: {key} is {value!r}, expected {want} (the file was edited or is corrupt)")
        if kinds == (int,) and value < (1 if key in OPTIONAL_TYPES else 0):
            raise UserError(
                f"{path}: {key} is {value}, expected {'a positive count' if key in OPTIONAL_TYPES else '>= 0'}"
            )
        if float in kinds and not math.isfinite(value):
            raise UserError(f"{path}: {key} is {value}, expected a finite number")
    return state


def describe_load_error(path: Path, e: BaseException) -> str:
    """One line for a checkpoint file that would not load: code in a pickle is said as such, never as corruption."""
    code = code_references(path, e, _DATA_MODULES)
    if code:
        return code_message(str(path), code)
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    if path.is_file() and path.stat().st_size == 0:
        return f"{path}: is empty (0 bytes): the checkpoint was not written completely"
    return f"{path}: truncated or corrupt ({type(e).__name__}: {first[:160]})"


LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, ValueError, KeyError, TypeError, IndexError, EOFError, OSError,
               AttributeError, zipfile.BadZipFile)  # fmt: skip


def check_rng_states(folder: Path, accelerator: Accelerator, logger: pylogging.Logger) -> None:
    """This process's ``random_states_<i>.pkl``: loaded (as accelerate does, without code) and applied to throw-away
    generators, so a corrupt, tampered or code-bearing file is named here instead of being skipped silently inside
    ``load_state``. A missing one, or those of processes this run does not have, are said in a note."""
    rank, world = accelerator.process_index, accelerator.num_processes
    saved = sorted(folder.glob("random_states_*.pkl"))
    if accelerator.is_main_process:
        extra = [
            p.name for p in saved if p.stem.rsplit("_", 1)[-1].isdigit() and int(p.stem.rsplit("_", 1)[-1]) >= world
        ]
        if extra:
            logger.info(
                f"note: {folder} holds RNG states of {len(saved)} process(es), this run has {world}: "
                f"{', '.join(extra)} ignored (every step reseeds from (seed, process, step))"
            )
    path = folder / f"random_states_{rank}.pkl"
    if not path.is_file():
        print(
            f"note: [rank {rank}] {path} is missing: process {rank} starts from the seeded RNG (every step reseeds "
            f"from (seed, process, step), so the training draws are unchanged)",
            file=sys.stderr,
        )
        return
    from accelerate.utils import load

    try:
        states = load(path)
    except LOAD_ERRORS as e:
        raise UserError(describe_load_error(path, e)) from None
    need = ("random_state", "numpy_random_seed", "torch_manual_seed")
    if not isinstance(states, dict) or any(k not in states for k in need):
        got = ", ".join(map(str, states)) if isinstance(states, dict) else type(states).__name__
        raise UserError(f"{path}: not an accelerate RNG state (has {got or 'nothing'}, expected {', '.join(need)})")
    try:
        random.Random().setstate(states["random_state"])
        np.random.RandomState().set_state(states["numpy_random_seed"])
        torch.Generator().set_state(states["torch_manual_seed"])
    except (TypeError, ValueError, RuntimeError, IndexError, KeyError) as e:
        raise UserError(f"{path}: holds an invalid RNG state ({type(e).__name__}: {str(e)[:160]})") from None


def load_training_state(accelerator: Accelerator, folder: Path, logger: pylogging.Logger) -> None:
    """``accelerator.load_state(folder)`` whose failures are one line naming the file: the model, optimizer (and
    scheduler, scaler...) files it reads, with their pickles loaded without code, and the RNG states checked first."""
    check_rng_states(folder, accelerator, logger)
    import accelerate.checkpointing as checkpointing

    original, read = checkpointing.load, []

    def named_load(f, *args, **kwargs):
        read.append(Path(f))
        try:
            return original(f, *args, **kwargs)
        except LOAD_ERRORS as e:
            raise UserError(describe_load_error(Path(f), e)) from None

    checkpointing.load = named_load
    try:
        accelerator.load_state(str(folder))
    except UserError:
        raise
    except Exception as e:  # the file read last (or the model's, read first) does not fit what this run built
        if not read:
            model = next(
                (p for p in sorted(folder.glob("model*.safetensors")) + sorted(folder.glob("pytorch_model*"))), folder
            )
            raise UserError(describe_load_error(model, e) if model.is_file() else f"{folder}: {e}") from None
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise UserError(f"{read[-1]}: does not fit this run's model or optimizer ({first[:200]})") from None
    finally:
        checkpointing.load = original


def batches(loader: torch.utils.data.DataLoader, sampler: StepSampler, step: int, accumulation: int) -> Iterator:
    """Batches from ``step`` on, epoch after epoch; the order depends only on the seed and the step."""
    micro = step * accumulation
    while True:
        sampler.set_position(*divmod(micro, sampler.steps_per_epoch))
        for batch in loader:
            micro += 1
            yield batch


def run_steps(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: torch.utils.data.DataLoader,
    sampler: StepSampler,
    *,
    step: int,
    seed: int,
    lr: float,
    training: TrainingConfig | FinetuneTrainingConfig,
    logging: LoggingConfig,
    out: Path,
    logger: pylogging.Logger,
    desc: str,
    loss_fn: Callable[[dict[str, Any], int], dict[str, torch.Tensor]],
    checkpoint: Callable[[int], None],
    phase: Callable[[int], str] | None = None,
    after_update: Callable[[], None] | None = None,
    postfix: dict[str, str] | None = None,
) -> LoopResult:
    """Train ``model`` from ``step`` to ``training.max_train_steps``.

    Every micro-batch starts by seeding torch from (``seed``, process, micro-step): its random draws (flips,
    timesteps, noise, the VAE's sample, the gates' Gumbel noise) are the same whether the run was resumed or not.

    ``phase(step)`` names the stage of a step in the log line and metrics; ``after_update()`` runs after each
    optimizer step taken (e.g. an EMA update); ``postfix`` maps the logged values shown on the bar to their format.
    """
    t, accumulation, rank = training, training.gradient_accumulation_steps, accelerator.process_index
    postfix = postfix or {"loss": ".4g"}
    preemption = _Preemption()
    metrics_file = open(out / "metrics.jsonl", "a") if accelerator.is_main_process else None
    running: dict[str, torch.Tensor] = {}
    unreadable: set[int] = set()
    nan_steps, unreadable_total, saved_step, preempted = 0, 0, step, False
    log_time, log_step = time.perf_counter(), step
    bar = progress_bar(total=t.max_train_steps, initial=step, desc=desc, disable=not accelerator.is_main_process)
    data_iter = batches(loader, sampler, step, accumulation)
    model.train()
    try:
        while step < t.max_train_steps:
            for group in optimizer.param_groups:  # constant after a linear warm-up
                group["lr"] = lr * min(1.0, (step + 1) / max(1, t.lr_warmup_steps))
            for micro in range(accumulation):
                batch = next(data_iter)
                torch.manual_seed(step_seed(seed, rank, step * accumulation + micro))
                for i, reason in batch["unreadable"]:
                    if not unreadable:
                        print(
                            f"[rank {rank}] skipping unreadable image {reason}; further ones are counted",
                            file=sys.stderr,
                        )
                    unreadable.add(i)
                with accelerator.accumulate(model):
                    values = loss_fn(batch, step)
                    accelerator.backward(values["loss"])  # divided by the accumulation steps
                for k, v in values.items():
                    running[k] = running.get(k, 0) + v.detach().float() / accumulation
            # the norm decides whether the step is finite; an infinite bound measures it without clipping (x 1.0)
            norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm or math.inf)
            finite = bool(torch.isfinite(norm))  # gradients are all-reduced: every process decides alike
            if finite or accelerator.scaler is not None:  # fp16: the scaler skips the step and lowers its scale
                optimizer.step()
                if after_update is not None:
                    after_update()
            optimizer.zero_grad(set_to_none=True)
            if not finite:
                nan_steps += 1
                if nan_steps > t.max_nan_steps:
                    raise UserError(
                        f"{nan_steps} steps had a non-finite gradient (training.max_nan_steps): lower the lr"
                    )
            stage = phase(step) if phase is not None else None
            step += 1
            bar.update(1)

            if step % logging.logging_steps == 0 or step == t.max_train_steps:
                n = step - log_step
                record: dict[str, Any] = {k: accelerator.reduce(v / n, "mean").item() for k, v in running.items()}
                unreadable_total = len(set(gather_object(sorted(unreadable))))  # rows met by any process
                record["step"] = step
                if stage is not None:
                    record["phase"] = stage
                record.update(
                    lr=optimizer.param_groups[0]["lr"], steps_per_sec=n / (time.perf_counter() - log_time),
                    nan_steps=nan_steps, unreadable=unreadable_total,
                )  # fmt: skip
                if accelerator.is_main_process:
                    head = f"step {step} " + (f"({stage}) " if stage is not None else "")
                    logger.info(head + " ".join(f"{k}={record[k]:.4g}" for k in running))
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    bar.set_postfix({k: f"{record[k]:{spec}}" for k, spec in postfix.items()})
                accelerator.log({k: v for k, v in record.items() if k != "phase"}, step=step)  # trackers want numbers
                running, log_time, log_step = {}, time.perf_counter(), step

            if step % logging.checkpointing_steps == 0 or step == t.max_train_steps:
                checkpoint(step)
                saved_step = step
            stop = torch.tensor(float(preemption.requested), device=accelerator.device)
            if accelerator.reduce(stop, "sum").item() > 0:  # a signal may reach only some processes
                logger.info(f"preemption signal: checkpointing at step {step} and exiting")
                preempted = True
                break
        if saved_step != step:
            checkpoint(step)
    finally:
        bar.close()
        preemption.restore()
        if metrics_file is not None:
            metrics_file.close()
        accelerator.end_training()

    if preempted:
        logger.info(f"stopped at step {step}; continue with logging.resume_from_checkpoint=latest")
    return LoopResult(step, preempted, nan_steps, unreadable_total)
