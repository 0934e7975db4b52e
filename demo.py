"""The whole TinyFusion pipeline on scikit-learn's handwritten digits, through the project's own scripts, on a CPU.

    python demo.py                  # make demo: the shipped teacher 12 -> 6 layers four ways; outputs/demo/report.md
    python demo.py --bench          # make bench: 3 seeds, longer fine-tuning, the 2:4 and 6:12 patterns too
    python demo.py --quick          # a few steps of everything (the test suite's version)
    python demo.py --export-teacher outputs/teacher/digits-DiT-Digits-2/checkpoints/0005000.pt   # make teacher

Every step runs a top-level script (prepare_digits.py, prune_by_learning.py, prune_by_score.py, prune_by_index.py,
train.py, train_masked_kd.py, sample_ddp.py) through its ``main(parse_args(argv))``, exactly as on a cluster; the
equivalent command lines are printed and collected in ``<out>/commands.sh``, each step's output in ``<out>/logs``.

Per method: prune the teacher (``DiT-Digits/2``, 12 layers) to 6; measure the calibration loss right after pruning
(the diffusion loss on the held-out split with fixed timesteps and noise); fine-tune a fixed number of steps
(plainly, or by Masked KD from the teacher); sample ``--num-samples`` digits (labels i mod 10, per-index seeds);
score them with a classifier trained on the training split (accuracy: the share classified as their label; FID
in its 64-d feature space against the held-out split); time sampling against the teacher.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from diffcompress import digits
from diffcompress.checkpoint import load_dit_weights, load_file, read_metadata, save_checkpoint, select_state_dict
from diffcompress.cli import ArgumentParser, positive_int, run
from diffcompress.errors import UserError
from diffcompress.stages import StageRunner
from models_with_layer_pruning import create_model

TEACHER = Path(__file__).resolve().parent / "assets" / "digits" / "teacher.safetensors"
DEPTH, TARGET = 12, 6
DATA_FLAGS = ["--image-size", "8", "--num-classes", "10"]
COMMON_TRAIN = ["--num-workers", "0", "--precision", "fp32", "--device", "cpu", "--ckpt-every", "1000000"]


@dataclass
class Preset:
    """Everything that differs between the quick, demo and bench runs."""

    seeds: list[int]
    prune_steps: int  # learned pruning (Gumbel gates + LoRA), batch below
    finetune_steps: int  # the same for every method and recovery
    patterns: list[str]  # learned N:M patterns; the first also gets Masked KD
    batch_size: int = 64
    finetune_lr: float = 5e-4
    prune_lr: float = 5e-4
    ema_decay: float = 0.99
    num_samples: int = 500
    sampler: str = "ddim"
    sampling_steps: int = 25  # ddim; the teacher scores alike at 25 and 50 (accuracy 0.84-0.86 vs 0.80)
    cfg_scale: float = 2.0  # the teacher's samples: accuracy 0.58 / 0.80 / 0.89 at cfg 1 / 2 / 3, FID best near 1.5-2
    bi_nsamples: int = 256
    calib_draws: int = 4
    timing_batch: int = 50
    timing_repeats: int = 2
    classifier_epochs: int = 30
    log_every: int = 50


PRESETS = {
    "demo": Preset(seeds=[0], prune_steps=200, finetune_steps=300, patterns=["1:2"], num_samples=300),  # 10 min
    "bench": Preset(
        seeds=[0, 1, 2],
        prune_steps=200,
        finetune_steps=500,  # the demo's 300 and more; 9 prunings and 21 fine-tunes must fit an hour on 2 cores
        patterns=["1:2", "2:4", "6:12"],
        ema_decay=0.995,
        log_every=100,
    ),  # fmt: skip
    "quick": Preset(
        seeds=[0],
        prune_steps=4,
        finetune_steps=4,
        patterns=["1:2"],
        batch_size=16,
        num_samples=40,
        sampling_steps=4,
        bi_nsamples=32,
        calib_draws=1,
        timing_batch=20,
        timing_repeats=1,
        classifier_epochs=2,
        log_every=2,
    ),  # fmt: skip
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--bench", action="store_const", const="bench", dest="preset", help="3 seeds, more steps")
    mode.add_argument("--quick", action="store_const", const="quick", dest="preset", help="a few steps of everything")
    mode.add_argument("--export-teacher", default=None, metavar="CKPT",
                      help="write --teacher (fp16 safetensors + metrics) from train.py's final checkpoint")  # fmt: skip
    p.set_defaults(preset="demo")
    p.add_argument("--out", default=None, help="output folder (default: outputs/<demo|bench|quick>)")
    p.add_argument("--data", default="data/digits", help="prepared digits (made by prepare_digits.py when missing)")
    p.add_argument("--teacher", default=str(TEACHER), help="the dense 12-layer DiT-Digits/2")
    p.add_argument("--seeds", default=None, help="override the preset's seeds, e.g. '0,1'")
    p.add_argument("--finetune-steps", type=positive_int, default=None, help="override the preset's fine-tuning steps")
    p.add_argument("--prune-steps", type=positive_int, default=None, help="override the preset's learned-pruning steps")
    p.add_argument("--num-samples", type=positive_int, default=None, help="override the preset's samples per model")
    p.add_argument("--command", default=None, help="--export-teacher: the training command to record")
    return p.parse_args(argv)


def resolve_preset(args: argparse.Namespace) -> Preset:
    preset = PRESETS[args.preset]
    if args.seeds:
        try:
            preset = replace(preset, seeds=[int(s) for s in args.seeds.split(",") if s.strip()])
        except ValueError:
            raise UserError(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. '0,1,2'") from None
    for name in ("finetune_steps", "prune_steps", "num_samples"):
        value = getattr(args, name)
        if value is not None:
            if value <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
            preset = replace(preset, **{name: value})
    return preset


# ----------------------------------------------------------------------------------------- the pipeline


@dataclass
class Row:
    """One model of the table (for one seed)."""

    method: str
    seed: int | None
    kept: list[int]
    params: int
    calibration_loss: float | None = None
    accuracy: float | None = None
    fid: float | None = None
    sampling_seconds: float | None = None
    speedup: float | None = None
    grid: str | None = None
    extra: dict = field(default_factory=dict)


def pattern_tag(pattern: str) -> str:
    return pattern.replace(":", "-")


def sampling_flags(preset: Preset) -> list[str]:
    return ["--vae", "none", *DATA_FLAGS, "--sampler", preset.sampler, "--num-sampling-steps",
            str(preset.sampling_steps), "--cfg-scale", str(preset.cfg_scale), "--precision", "fp32",
            "--device", "cpu"]  # fmt: skip


def load_dit(path: str | os.PathLike, depth: int) -> torch.nn.Module:
    model = create_model(digits.MODEL, depth=depth, input_size=digits.IMAGE_SIZE, in_channels=digits.CHANNELS,
                         num_classes=digits.NUM_CLASSES)  # fmt: skip
    load_dit_weights(model, path)
    return model.eval()


def sample_and_score(run_script: StageRunner, preset: Preset, evaluator: digits.Evaluator, ckpt: Path, depth: int,
                     sample_dir: Path, seed: int, what: str) -> tuple[dict, np.ndarray, np.ndarray, Path]:  # fmt: skip
    """sample_ddp.py's digits (labels i mod 10, per-index seeds) of a checkpoint, scored: (scores, images, labels,
    npz)."""
    argv = ["--model", digits.MODEL, "--depth", str(depth), "--ckpt", str(ckpt), *sampling_flags(preset),
            "--num-fid-samples", str(preset.num_samples), "--per-proc-batch-size", str(min(500, preset.num_samples)),
            "--balanced-labels", "--global-seed", str(seed), "--sample-dir", str(sample_dir)]  # fmt: skip
    npz = run_script("sample_ddp", argv, f"sample {preset.num_samples} digits: {what}")
    with np.load(npz) as data:
        images, labels = data["arr_0"], data["labels"]
    return evaluator.score(images, labels), images, labels, npz


def evaluate_model(run_script: StageRunner, preset: Preset, evaluator: digits.Evaluator, ckpt: Path, depth: int,
                   folder: Path, row: Row, grid: Path, teacher: torch.nn.Module | None) -> None:  # fmt: skip
    """Sample and score, draw the grid, and time sampling in turns with the teacher (None: this is the teacher)."""
    seed = row.seed if row.seed is not None else preset.seeds[0]
    scores, images, labels, npz = sample_and_score(run_script, preset, evaluator, ckpt, depth, folder / "samples",
                                                   seed, row.method)  # fmt: skip
    row.accuracy, row.fid = scores["accuracy"], scores["fid"]
    row.extra["samples"] = str(npz)
    row.grid = str(digits.save_grid(images, labels, grid))
    models = [load_dit(ckpt, depth)] + ([teacher] if teacher is not None else [])
    sampler_args = importlib.import_module("sample_ddp").parse_args(sampling_flags(preset))
    seconds = digits.sampling_seconds(models, sampler_args, preset.timing_batch, preset.timing_repeats)
    row.sampling_seconds = seconds[0]
    row.speedup = seconds[-1] / seconds[0]


def run_pipeline(args: argparse.Namespace) -> Path:
    preset = resolve_preset(args)
    out = Path(args.out or f"outputs/{args.preset}")
    teacher = Path(args.teacher)
    if not teacher.is_file():
        raise UserError(f"--teacher {teacher} does not exist: run 'make teacher' (or git checkout {TEACHER})")
    if out.exists():
        shutil.rmtree(out / "runs", ignore_errors=True)  # a re-run starts clean; the report is rewritten
    out.mkdir(parents=True, exist_ok=True)
    wall_start = time.perf_counter()
    run_script = StageRunner(out, in_process=True)
    data = Path(args.data)
    if not digits.is_prepared(data):
        run_script("prepare_digits", ["--out", str(data)], "prepare the digits (train / held-out)")
    train_data, heldout = data / "train", data / "heldout"
    grids = out / "grids"
    shutil.rmtree(grids, ignore_errors=True)

    print(f"training the evaluation classifier on {train_data} ...", flush=True)
    evaluator = digits.Evaluator.build(data, seed=0, epochs=preset.classifier_epochs)
    ceiling = evaluator.ceiling(preset.num_samples)
    print(f"     classifier held-out accuracy {evaluator.heldout_accuracy:.4f} ({evaluator.seconds:.1f}s); "
          f"FID of {ceiling['n']} training digits vs held-out {ceiling['fid']:.3f}", flush=True)  # fmt: skip

    rows: list[Row] = []
    teacher_model = load_dit(teacher, DEPTH)
    teacher_row = Row("teacher (dense)", None, list(range(DEPTH)), teacher_model.num_params(),
                      calibration_loss=digits.calibration_loss(teacher_model, heldout, preset.calib_draws))  # fmt: skip
    evaluate_model(run_script, preset, evaluator, teacher, DEPTH, out / "runs" / "teacher", teacher_row,
                   grids / "teacher.png", None)  # fmt: skip
    rows.append(teacher_row)
    decision_plots = []

    train_flags = ["--data-path", str(train_data), *DATA_FLAGS, *COMMON_TRAIN, "--global-batch-size",
                   str(preset.batch_size), "--log-every", str(preset.log_every)]  # fmt: skip
    for seed in preset.seeds:
        runs = out / "runs" / f"seed{seed}"
        pruned: dict[str, tuple[str, Path]] = {}  # key -> (method name, pruned checkpoint)
        for pattern in preset.patterns:
            tag = pattern_tag(pattern)
            path = runs / f"learned-{tag}" / "pruned.pt"
            summary = run_script("prune_by_learning", [
                "--model", digits.MODEL, "--groups", pattern, "--load-weight", str(teacher), "--delta-w", "--lora",
                *train_flags, "--max-steps", str(preset.prune_steps), "--lr", str(preset.prune_lr),
                "--ema-decay", str(preset.ema_decay), "--global-seed", str(seed), "--results-dir", str(runs),
                "--prefix", f"learned-{tag}", "--save-model", str(path),
            ], f"learned {pattern} pruning with LoRA (seed {seed})")  # fmt: skip
            plot = Path(runs / f"learned-{tag}-{digits.MODEL.replace('/', '-')}" / "decisions.png")
            if plot.is_file():
                suffix = f"-seed{seed}" if len(preset.seeds) > 1 else ""
                decision_plots.append(shutil.copy(plot, out / f"decisions-{tag}{suffix}.png"))
            pruned[f"learned-{tag}"] = (f"learned {pattern} (LoRA)", Path(summary["output"]))
        bi = run_script("prune_by_score", [
            "--model", digits.MODEL, "--ckpt", str(teacher), "--data-path", str(train_data), *DATA_FLAGS,
            "--nsamples", str(preset.bi_nsamples), "--n-pruned", str(DEPTH - TARGET), "--seed", str(seed),
            "--device", "cpu", "--save-model", str(runs / "bi" / "pruned.pt"),
        ], f"BI score pruning (seed {seed})")  # fmt: skip
        pruned["bi"] = ("BI score (ShortGPT)", Path(bi.path))
        for kind, name in (("oracle", "oracle (evenly spaced)"), ("random", "random 1:2")):
            run_script("prune_by_index", [
                "--model", digits.MODEL, "--ckpt", str(teacher), "--kept-indices", kind, "--groups", "1:2",
                "--seed", str(seed), "--save-model", str(runs / kind / "pruned.pt"),
            ], f"{name} pruning (seed {seed})")  # fmt: skip
            pruned[kind] = (name, runs / kind / "pruned.pt")

        recoveries = [(key, "fine-tune") for key in pruned]
        recoveries.insert(1, (f"learned-{pattern_tag(preset.patterns[0])}", "Masked KD"))
        for key, recovery in recoveries:
            method, path = pruned[key]
            kept = read_metadata(path)["kept_indices"]
            student = load_dit(path, TARGET)
            row = Row(f"{method} + {recovery}", seed, kept, student.num_params(),
                      calibration_loss=digits.calibration_loss(student, heldout, preset.calib_draws))  # fmt: skip
            prefix = f"{key}-{'kd' if recovery == 'Masked KD' else 'ft'}"
            flags = ["--model", digits.MODEL, "--depth", str(TARGET), "--load-weight", str(path), *train_flags,
                     "--max-steps", str(preset.finetune_steps), "--lr", str(preset.finetune_lr), "--lr-min",
                     str(preset.finetune_lr / 10), "--ema-decay", str(preset.ema_decay), "--global-seed", str(seed),
                     "--results-dir", str(runs), "--prefix", prefix]  # fmt: skip
            if recovery == "Masked KD":
                flags += ["--teacher", digits.MODEL, "--load-teacher", str(teacher)]
                result = run_script("train_masked_kd", flags, f"Masked KD of {method} (seed {seed})")
            else:
                result = run_script("train", flags, f"fine-tune {method} (seed {seed})")
            suffix = f"-seed{seed}" if len(preset.seeds) > 1 else ""
            evaluate_model(run_script, preset, evaluator, result.checkpoint, TARGET, runs / prefix, row,
                           grids / f"{prefix}{suffix}.png", teacher_model)  # fmt: skip
            rows.append(row)
            print(f"     {row.method} (seed {seed}): kept {kept}, accuracy {row.accuracy:.3f}, FID {row.fid:.2f}, "
                  f"calibration loss {row.calibration_loss:.4f}, speedup {row.speedup:.2f}x", flush=True)  # fmt: skip

    wall = time.perf_counter() - wall_start
    commands = run_script.write_commands()
    report = write_report(out, args.preset, preset, rows, evaluator, ceiling, decision_plots, wall, teacher)
    print(f"\nreport:          {report}\nsample grids:    {grids}/\ndecision plots:  "
          f"{', '.join(str(p) for p in decision_plots) or '-'}\ncommands:        {commands}\n"
          f"wall time:       {wall / 60:.1f} min", flush=True)  # fmt: skip
    return report


# ----------------------------------------------------------------------------------------- the report


def _mean_spread(values: list[float], digits_: int) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits_}f}"
    return f"{np.mean(values):.{digits_}f} ± {np.std(values, ddof=1):.{digits_}f}"


def _kept_text(patterns: list[list[int]]) -> str:
    unique = []
    for p in patterns:
        if p not in unique:
            unique.append(p)
    if len(unique) == 1:
        return str(unique[0]) if len(unique[0]) < DEPTH else f"all {DEPTH}"
    return " / ".join(f"{p} ({patterns.count(p)}x)" for p in unique)


def summarise(rows: list[Row]) -> list[dict]:
    """One line per method: means and sample standard deviations over seeds."""
    methods = list(dict.fromkeys(r.method for r in rows))
    table = []
    for method in methods:
        group = [r for r in rows if r.method == method]
        table.append(dict(
            method=method, seeds=len(group), kept=_kept_text([r.kept for r in group]),
            params=f"{group[0].params / 1e6:.2f}M", speedup=_mean_spread([r.speedup for r in group], 2),
            accuracy=_mean_spread([r.accuracy for r in group], 3), fid=_mean_spread([r.fid for r in group], 2),
            calibration_loss=_mean_spread([r.calibration_loss for r in group], 4),
        ))  # fmt: skip
    return table


def markdown_table(table: list[dict], ceiling: dict, heldout_count: int) -> str:
    lines = ["| method | kept layers | params | sampling speedup | accuracy | FID | calibration loss |",
             "|---|---|---|---|---|---|---|",
             f"| held-out digits (ceiling: real data) | - | - | - | {ceiling['accuracy']:.3f} | {ceiling['fid']:.2f} "
             f"| - |"]  # fmt: skip
    for t in table:
        speed = t["speedup"] + ("x" if t["speedup"] != "-" else "")
        lines.append(f"| {t['method']} | {t['kept']} | {t['params']} | {speed} | {t['accuracy']} | {t['fid']} | "
                     f"{t['calibration_loss']} |")  # fmt: skip
    return "\n".join(lines)


def write_report(out: Path, name: str, preset: Preset, rows: list[Row], evaluator: digits.Evaluator, ceiling: dict,
                 decision_plots: list, wall: float, teacher: Path) -> Path:  # fmt: skip
    table = summarise(rows)
    seeds = len(preset.seeds)
    spread = f"mean ± standard deviation over {seeds} seeds" if seeds > 1 else f"seed {preset.seeds[0]}"
    meta = read_metadata(teacher) or {}
    text = [
        f"# TinyFusion on digits: {name}",
        "",
        f"The dense teacher `{teacher}` ({digits.MODEL}, {DEPTH} layers) pruned to {TARGET} layers; every pruned "
        f"model then trained {preset.finetune_steps} steps at batch {preset.batch_size} (fine-tune: train.py; "
        f"Masked KD: train_masked_kd.py from the teacher). Numbers: {spread}. Wall time {wall / 60:.1f} min on "
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads).",
        "",
        markdown_table(table, ceiling, evaluator.heldout_count),
        "",
        "- **accuracy**: share of generated digits (labels i mod 10) that a CNN trained on the training split "
        f"classifies as their label; its own accuracy on the {evaluator.heldout_count} held-out digits is the "
        "ceiling row.",
        f"- **FID**: Frechet distance in the classifier's {digits.DigitClassifier.FEATURES}-d feature space between "
        f"{preset.num_samples} samples and the {evaluator.heldout_count} held-out digits (ceiling: "
        f"{ceiling['n']} real training digits against the same held-out digits). Lower is better.",
        f"- **calibration loss**: diffusion loss (MSE + VB) on the held-out digits right after pruning, before "
        f"any training ({preset.calib_draws} fixed (t, noise) draws per digit; the teacher row is the dense "
        "model's own).",
        f"- **sampling speedup**: the teacher's time over the model's, best of {preset.timing_repeats} runs each of "
        f"{preset.timing_batch} digits, {preset.sampling_steps} {preset.sampler} steps, this CPU; the two models "
        "are timed in turns, so load from other work on the machine hits both alike.",
        f"- Sampling for the scores: sample_ddp.py, {preset.sampler} {preset.sampling_steps} steps, cfg "
        f"{preset.cfg_scale}, {preset.num_samples} digits per model. Learned pruning: prune_by_learning.py, "
        f"{preset.prune_steps} steps, LoRA rank 8, lr {preset.prune_lr} (gates 10x), tau 4 -> 0.1.",
        "",
        "## Figures",
        "",
        *[f"- `{Path(p).relative_to(out)}`: learned layer decisions over training" for p in decision_plots],
        *[f"- `{Path(r.grid).relative_to(out)}`: {r.method}" + (f" (seed {r.seed})" if seeds > 1 else "")
          for r in rows if r.grid],
        "",
        "## Per run",
        "",
        "| method | seed | kept layers | accuracy | FID | calibration loss | sampling s |",
        "|---|---|---|---|---|---|---|",
        *[f"| {r.method} | {'-' if r.seed is None else r.seed} | {r.kept} | {r.accuracy:.3f} | {r.fid:.2f} | "
          f"{r.calibration_loss:.4f} | {r.sampling_seconds:.2f} |" for r in rows],
        "",
        f"Teacher: {meta.get('command', '(no training command recorded)')}",
        f"Every step's command line: `{(out / 'commands.sh').relative_to(out)}`; their output: `logs/`.",
        "",
    ]  # fmt: skip
    path = out / "report.md"
    path.write_text("\n".join(text))
    (out / "results.json").write_text(json.dumps(dict(
        preset=name, settings=asdict(preset), wall_seconds=wall, ceiling=ceiling,
        classifier_heldout_accuracy=evaluator.heldout_accuracy, summary=table, runs=[asdict(r) for r in rows],
    ), indent=1) + "\n")  # fmt: skip
    return path


# ----------------------------------------------------------------------------------------- the teacher


def export_teacher(args: argparse.Namespace) -> Path:
    """train.py's final checkpoint -> the shipped fp16 safetensors, with its command and measured metrics."""
    ckpt = Path(args.export_teacher)
    train_state = load_file(ckpt)
    # The final raw weights, not the EMA: the cosine schedule ends at lr 1e-5, so the last weights are already an
    # annealed average, while the 0.999 EMA still holds ~5% of the early lr-1e-3 trajectory. Measured on the same
    # 300 seeded samples (ddim 50, cfg 1): accuracy 0.62 raw vs 0.18 EMA.
    state = select_state_dict(train_state, use_ema=False, source=f"checkpoint {str(ckpt)!r}")
    half = {k: v.to(torch.float16) for k, v in state.items()}
    model = create_model(digits.MODEL, input_size=digits.IMAGE_SIZE, in_channels=digits.CHANNELS,
                         num_classes=digits.NUM_CLASSES)  # fmt: skip
    load_dit_weights(model, half)  # scored as shipped: the fp16-rounded weights
    model.eval()
    train_args = train_state.get("args", {})
    metrics_file = ckpt.parent.parent / "metrics.jsonl"
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.is_file() else []
    seconds, last = 0.0, 0
    for r in records:
        seconds += (r["step"] - last) / r["steps_per_sec"]
        last = r["step"]
    preset = PRESETS["demo"]
    data = Path(args.data)
    if not digits.is_prepared(data):
        digits.prepare(data)
    evaluator = digits.Evaluator.build(data, seed=0, epochs=preset.classifier_epochs)
    out = Path(args.teacher)
    save_checkpoint(half, out)  # scored as shipped: the fp16 file (the metadata follows below)
    work = Path(args.out or ckpt.parent.parent / "export")
    scores, *_ = sample_and_score(
        StageRunner(work, in_process=True), preset, evaluator, out, DEPTH, work / "samples", 0, "the teacher"
    )
    metrics = {
        "train_steps": int(train_state.get("train_steps", 0)), "final_loss": records[-1]["loss"] if records else None,
        "training_seconds": round(seconds, 1), "threads": torch.get_num_threads(),
        "sample_accuracy": scores["accuracy"], "sample_fid": scores["fid"], "samples": preset.num_samples,
        "sampler": f"{preset.sampler} {preset.sampling_steps} steps, cfg {preset.cfg_scale}",
        "calibration_loss_heldout": digits.calibration_loss(model, data / "heldout", preset.calib_draws),
        "classifier_heldout_accuracy": evaluator.heldout_accuracy,
    }  # fmt: skip
    metadata = {
        "model": digits.MODEL, "depth": DEPTH, "dtype": "float16 (final weights, not the EMA)",
        "source_checkpoint": str(ckpt),
        "command": args.command or "python train.py " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                                 for k, v in train_args.items()),
        "train_args": train_args, "metrics": metrics, "torch": torch.__version__,
    }  # fmt: skip
    save_checkpoint(half, out, metadata=metadata)
    write_teacher_card(out, metadata)
    print(json.dumps(metrics, indent=1))
    print(f"wrote {out} (+ {out}.json, {out.parent / 'README.md'})")
    return out


def write_teacher_card(path: Path, metadata: dict) -> None:
    m = metadata["metrics"]
    text = f"""# The digits teacher

`{path.name}`: {metadata["model"]} ({metadata["depth"]} layers, width 128, patch 2, 8x8 pixels, 10 classes),
train.py's final weights stored as {metadata["dtype"]}. Not the EMA: the cosine schedule ends at lr 1e-5, so the
last weights are already annealed, while the 0.999 EMA still carries the early lr-1e-3 weights and samples far worse
(accuracy 0.18 against 0.62 on the same 300 seeded samples, ddim 50, cfg 1). Made by `make teacher`:

```bash
python prepare_digits.py --out data/digits
{metadata["command"]}
python demo.py --export-teacher {metadata["source_checkpoint"]}
```

| | |
|---|---|
| training steps | {m["train_steps"]} |
| final training loss (last log interval) | {m["final_loss"]:.4f} |
| training time (sum of logged intervals, {m["threads"]} threads) | {m["training_seconds"] / 60:.1f} min |
| accuracy of {m["samples"]} samples ({m["sampler"]}) | {m["sample_accuracy"]:.3f} |
| FID of the same samples vs held-out (classifier features) | {m["sample_fid"]:.2f} |
| diffusion loss on the held-out split | {m["calibration_loss_heldout"]:.4f} |
| classifier accuracy on the held-out split | {m["classifier_heldout_accuracy"]:.3f} |

Everything is seeded; with the same torch build and thread count the run repeats bit for bit (the thread count
changes the float rounding of CPU matrix products, hence `OMP_NUM_THREADS=2` in the Makefile). All of it is
also in `{path.name}.json` and in the safetensors header.
"""
    (path.parent / "README.md").write_text(text)


def main(args: argparse.Namespace):
    if args.export_teacher:
        return export_teacher(args)
    return run_pipeline(args)


if __name__ == "__main__":
    run(lambda: main(parse_args()))
