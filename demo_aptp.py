"""APTP end to end on captioned digits, on a CPU: a small text-to-image teacher pruned into a mixture of experts.

    python demo_aptp.py                   # make demo-aptp: the shipped teacher (assets/aptp-digits) -> report.md
    python demo_aptp.py --quick           # a few steps of everything (the test suite's version)
    python demo_aptp.py --train-teacher   # make aptp-teacher: re-train and re-export assets/aptp-digits

Each stage is a command, run as a child process (progress bars on the terminal, printed output in ``<out>/logs``,
command lines collected in ``<out>/commands.sh``):

1. ``python -m aptp.digits_world``: scikit-learn's digits rendered in named colours with captions of varied wording,
   in the CC3M layout (training digits, and the held-out digits as the validation split);
2. ``python -m aptp.prune``: the prompt router over K architecture codes of the frozen teacher UNet, at a MAC budget;
3. ``python -m aptp.filter_dataset``: every caption to its expert;
4. ``python -m aptp.finetune --expert_id K``: each expert (the teacher sliced by its code) trained on its captions
   with distillation from the teacher.

Then, in this process, ``APTPPipeline`` draws every validation caption with the expert its router picks, and the
dense teacher draws the same prompts from the same noise (PNDM, 25 steps, no classifier-free guidance: the teacher
never saw an empty caption). Scores: a digit classifier trained on the training digits (``diffcompress.digits``)
reads each image (``aptp.digits_world.digit_pixels``): digit accuracy is the share read as the prompt's digit; colour
accuracy the share showing the prompt's ink and background; FID is the Frechet distance in the classifier's feature
space to the real images of the same captions. Written to ``<out>``: ``report.md`` (the
table, prompt -> expert, example grids), ``results.json``, ``routing.json``, ``grids/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aptp import digits_world as world
from aptp.assignments import read_expert_ids, read_experts, read_router_info, read_summary
from diffcompress import digits
from diffcompress.checkpoint import load_file, write_json_atomic
from diffcompress.cli import ArgumentParser, run
from diffcompress.errors import UserError
from diffcompress.fid_metrics import activation_statistics, frechet_distance
from diffcompress.stages import StageRunner

ROOT = Path(__file__).resolve().parent
TEACHER = ROOT / "assets" / "aptp-digits"
CONFIGS = ROOT / "configs" / "aptp" / "demo"
SEED = 43  # the paper's generation seed


@dataclass
class Preset:
    """Everything that differs between the demo and the quick run."""

    num_experts: int = 4
    budget: float = 0.6  # keep this share of the teacher UNet's MACs on average
    prune_steps: int = 200
    pretrain_steps: int = 100
    prune_batch: int = 16
    finetune_steps: int = 150
    finetune_batch: int = 16
    prompts: int | None = None  # the first N validation captions; None: all of them
    sampling_steps: int = 25
    guidance_scale: float = 1.0
    batch_size: int = 64  # prompts per generation batch
    classifier_epochs: int = 20
    copies: int = 2  # renderings of every training digit
    grid_prompts: int = 12  # per expert, in its example grid and the report's prompt table
    timing_repeats: int = 5


PRESETS = {
    "demo": Preset(),
    "quick": Preset(
        num_experts=2,
        prune_steps=4,
        pretrain_steps=2,
        prune_batch=8,
        finetune_steps=2,
        finetune_batch=4,
        prompts=24,
        sampling_steps=3,
        batch_size=24,
        classifier_epochs=2,
        copies=1,
        grid_prompts=4,
        timing_repeats=1,
    ),  # fmt: skip
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", const="quick", dest="preset", help="a few steps of everything")
    mode.add_argument("--train-teacher", action="store_true", help="re-train the teacher and export it to --teacher")
    p.set_defaults(preset="demo")
    p.add_argument("--out", default=None, help="output folder (default: outputs/demo-aptp, outputs/quick-aptp or "
                   "outputs/aptp-teacher)")  # fmt: skip
    p.add_argument("--data", default="data/digits", help="prepared digits (made by prepare_digits.py when missing)")
    p.add_argument("--teacher", default=str(TEACHER), help="the teacher folder (sd/ and sentence-encoder/)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Running the stages


def shown(path: str | os.PathLike) -> str:
    """A path as messages show it: relative to the repository when inside it."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def check_teacher(teacher: Path) -> tuple[Path, Path]:
    sd, encoder = teacher / "sd", teacher / "sentence-encoder"
    if not (sd / "model_index.json").is_file() or not (encoder / "modules.json").is_file():
        raise UserError(
            f"--teacher {teacher}: expected sd/ (a Stable Diffusion folder) and sentence-encoder/ in it; run "
            f"`make aptp-teacher` (or restore {TEACHER.relative_to(ROOT)} from git)"
        )
    return sd, encoder


# ---------------------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class Reading:
    """What the classifier reads in a set of images drawn for ``contents``."""

    digits: np.ndarray  # int [N]
    features: np.ndarray  # [N, 64]
    colours: np.ndarray  # bool [N]: both named colours shown

    @classmethod
    def of(cls, classifier: digits.DigitClassifier, images: np.ndarray, contents: list) -> Reading:
        read, features = digits.classify(classifier, world.digit_pixels(images, contents))
        return cls(read, features, world.colours_match(images, contents))


def fid(features: np.ndarray, reference: np.ndarray) -> float | None:
    """Frechet distance between two feature sets (None below two samples: no covariance)."""
    if min(len(features), len(reference)) < 2:
        return None
    return frechet_distance(*activation_statistics(features), *activation_statistics(reference))


@dataclass
class Row:
    model: str
    prompts: int
    digit_accuracy: float | None  # None: no prompts
    colour_accuracy: float | None
    fid: float | None
    macs: float | None = None  # UNet MACs per denoising step
    params: int | None = None
    unet_ms: float | None = None  # one UNet forward of a generation batch, best of several
    teacher_digit_accuracy: float | None = None  # the dense teacher on the same prompts
    teacher_fid: float | None = None
    note: str = ""


def scores(reading: Reading, labels: np.ndarray, reference: np.ndarray, index: np.ndarray) -> dict:
    return dict(
        prompts=len(index), digit_accuracy=float((reading.digits[index] == labels[index]).mean()),
        colour_accuracy=float(reading.colours[index].mean()), fid=fid(reading.features[index], reference[index]),
    )  # fmt: skip


@torch.no_grad()
def unet_ms(unet: torch.nn.Module, batch: int, repeats: int) -> float:
    """Milliseconds of one forward of ``unet`` on a generation batch (8x8 latents, 77 text tokens), best of
    ``repeats`` after a warm-up."""
    cfg = unet.config
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    t, text = torch.full((batch,), 500), torch.zeros(batch, 77, cfg.cross_attention_dim)
    unet(x, t, text)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        unet(x, t, text)
        best = min(best, time.perf_counter() - start)
    return 1000 * best


def real_ceiling(cc3m: Path, labels: np.ndarray, classifier: digits.DigitClassifier, seed: int = 0) -> Reading:
    """What the classifier reads in real images compared to the references as generated ones are: for each prompt
    a distinct training image of the same digit (a seeded draw)."""
    captions = world.read_captions(cc3m, "train")
    train = np.array([world.parse_caption(c).digit for c in captions])
    pools = {d: list(np.random.default_rng(seed + d).permutation(np.flatnonzero(train == d))) for d in range(10)}
    rows = np.array([pools[d].pop() for d in labels])
    images = world.load_images(cc3m / "training")[rows]
    return Reading.of(classifier, images, [world.parse_caption(captions[i]) for i in rows])


# ---------------------------------------------------------------------------------------------------------------
# The demo


def run_stages(runner: StageRunner, preset: Preset, sd: Path, encoder: Path, data: Path, out: Path) -> dict[int, str]:
    """Captioned digits, pruning, filtering, fine-tuning of every expert; returns a note per expert left as sliced
    from the teacher (one that no training caption was routed to)."""
    cc3m, pruning = out / "world" / "cc3m", out / "pruning"
    runner("aptp.digits_world", ["--out", out / "world", "--data", data, "--copies", preset.copies],
           "render the captioned digits (CC3M layout)")  # fmt: skip
    runner("aptp.prune", [
        "--config", CONFIGS / "pruning.yaml", f"pretrained_model_name_or_path={sd}", f"model.prompt_encoder={encoder}",
        f"data.data_dir={cc3m}", f"data.embedding_cache_dir={out / 'prompt_embeddings'}", f"output_dir={pruning}",
        f"model.num_experts={preset.num_experts}", f"model.budget={preset.budget}",
        f"training.max_train_steps={preset.prune_steps}", f"training.pretrain_steps={preset.pretrain_steps}",
        f"training.train_batch_size={preset.prune_batch}",
    ], f"prune: a router over {preset.num_experts} experts at {preset.budget:.0%} of the teacher's MACs")  # fmt: skip
    runner("aptp.filter_dataset", ["--pruning_dir", pruning], "route every caption to its expert")
    notes = {}
    for k, rows in enumerate(read_summary(pruning, "train")["rows_per_expert"]):
        if rows == 0:
            notes[k] = "not fine-tuned: no training caption routed to it; it is the teacher sliced by its code"
        runner("aptp.finetune", [
            "--config", CONFIGS / "finetuning.yaml", "--expert_id", k, f"pruning_dir={pruning}",
            f"training.max_train_steps={preset.finetune_steps}", f"training.train_batch_size={preset.finetune_batch}",
        ], f"fine-tune expert {k} on its {rows} training captions")  # fmt: skip
    return notes


def score_models(
    pruning: Path, teacher_unet: torch.nn.Module, pipe, experts: np.ndarray, macs: list[int], reads: dict[str, Reading],
    labels: np.ndarray, preset: Preset, notes: dict[int, str],
) -> list[Row]:  # fmt: skip
    """The table's rows: real images, the dense teacher, APTP routed, and each expert on its prompts."""
    real, teacher, aptp, ceiling = reads["real"], reads["teacher"], reads["aptp"], reads["ceiling"]
    reference, everything = real.features, np.arange(len(labels))
    table = read_experts(pruning)
    timing = dict(batch=preset.batch_size, repeats=preset.timing_repeats)
    rows = [
        Row("real images (ceiling)", len(labels), float((real.digits == labels).mean()), float(real.colours.mean()),
            fid(ceiling.features, reference),
            note="digit and colour accuracy: the captions' own images; FID: training images of the same digits"),
        Row("dense teacher", **scores(teacher, labels, reference, everything), macs=table["dense"]["macs"],
            params=table["dense"]["params"], unet_ms=unet_ms(teacher_unet, **timing)),
    ]  # fmt: skip
    expert_rows = []
    for k, e in enumerate(table["experts"]):
        index = np.flatnonzero(experts == k)
        row = Row(f"expert {k}", 0, None, None, None, macs=e["macs"], params=e["params"],
                  unet_ms=unet_ms(pipe.expert_pipeline(k).unet, **timing), note=notes.get(k, ""))  # fmt: skip
        if len(index):
            row = Row(**{**asdict(row), **scores(aptp, labels, reference, index)})
            on_same = scores(teacher, labels, reference, index)
            row.teacher_digit_accuracy, row.teacher_fid = on_same["digit_accuracy"], on_same["fid"]
        expert_rows.append(row)
    share = np.bincount(experts, minlength=len(expert_rows)) / len(labels)
    rows.append(Row(f"APTP ({len(expert_rows)} experts, routed)", **scores(aptp, labels, reference, everything),
                    macs=float(np.mean(macs)), unet_ms=float(share @ [r.unet_ms for r in expert_rows]),
                    teacher_digit_accuracy=rows[1].digit_accuracy, teacher_fid=rows[1].fid,
                    note="GMACs and ms: the average over the prompts"))  # fmt: skip
    return rows + expert_rows


def run_demo(args: argparse.Namespace) -> Path:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from aptp.pipeline import APTPPipeline

    diffusers_logging.disable_progress_bar()  # the console is the list of stages: no per-model loading bars
    transformers_logging.disable_progress_bar()
    preset = PRESETS[args.preset]
    out = Path(args.out or ("outputs/demo-aptp" if args.preset == "demo" else "outputs/quick-aptp"))
    sd, encoder = check_teacher(Path(args.teacher))
    for stale in ("pruning", "grids"):  # a re-run starts clean (aptp.prune refuses to overwrite a run)
        shutil.rmtree(out / stale, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    wall_start = time.perf_counter()
    runner = StageRunner(out)
    data, cc3m, pruning = Path(args.data), out / "world" / "cc3m", out / "pruning"
    if not digits.is_prepared(data):
        digits.prepare(data)
        print(f"prepared the digits in {data}")
    notes = run_stages(runner, preset, sd, encoder, data, out)

    prompts = world.read_captions(cc3m, "validation")[: preset.prompts]
    contents = [world.parse_caption(p) for p in prompts]
    labels = np.array([c.digit for c in contents])
    print(f"training the digit classifier on {data / 'train'} ...", flush=True)
    evaluator = digits.Evaluator.build(data, seed=0, epochs=preset.classifier_epochs)
    runner.seconds["train the digit classifier (in this process)"] = evaluator.seconds
    classifier = evaluator.classifier

    print(f"drawing {len(prompts)} validation captions with the dense teacher and with APTP's experts ...", flush=True)
    teacher = world.load_pipeline(sd)
    start = time.perf_counter()
    teacher_images = world.draw(teacher, prompts, SEED, preset.sampling_steps, preset.guidance_scale,
                                preset.batch_size, desc="dense teacher")  # fmt: skip
    teacher_seconds = runner.seconds["draw the prompts: dense teacher"] = time.perf_counter() - start
    pipe = APTPPipeline.from_pretrained(pruning)
    start = time.perf_counter()
    drawn = pipe(prompts, preset.sampling_steps, preset.guidance_scale, seed=SEED, batch_size=preset.batch_size,
                 output_type="np")  # fmt: skip
    aptp_seconds = runner.seconds["draw the prompts: APTP (routing, loading the experts)"] = time.perf_counter() - start
    aptp_images, experts = world.to_uint8(drawn.images), np.array(drawn.experts)
    agree = int((read_expert_ids(pruning, "validation")[: len(prompts)] == experts).sum())
    routing_counts = routing_histograms(pruning, experts, pipe.route(prompts, "cosine"), out / "routing.png")

    reads = dict(
        real=Reading.of(classifier, world.load_images(cc3m / "validation")[: len(prompts)], contents),
        ceiling=real_ceiling(cc3m, labels, classifier), teacher=Reading.of(classifier, teacher_images, contents),
        aptp=Reading.of(classifier, aptp_images, contents),
    )  # fmt: skip
    rows = score_models(pruning, teacher.unet, pipe, experts, drawn.macs, reads, labels, preset, notes)
    grids = write_grids(out / "grids", aptp_images, teacher_images, experts, preset.grid_prompts)
    routing = [
        dict(prompt=p, expert=int(k), macs=int(m), digit=int(y), read_by_expert=int(a), read_by_teacher=int(t),
             colours_by_expert=bool(ca), colours_by_teacher=bool(ct))
        for p, k, m, y, a, t, ca, ct in zip(prompts, experts, drawn.macs, labels, reads["aptp"].digits,
                                            reads["teacher"].digits, reads["aptp"].colours, reads["teacher"].colours)
    ]  # fmt: skip
    write_json_atomic(out / "routing.json", routing)
    wall = time.perf_counter() - wall_start
    commands = runner.write_commands()
    info = dict(
        preset=args.preset, settings=asdict(preset), wall_seconds=wall, stage_seconds=runner.seconds,
        teacher=shown(args.teacher), teacher_seconds=teacher_seconds, aptp_seconds=aptp_seconds,
        budget=read_experts(pruning)["budget"], routing_agrees_with_filter=agree,
        classifier_heldout_accuracy=evaluator.heldout_accuracy,
        routed_train=read_summary(pruning, "train")["rows_per_expert"], routing_counts=routing_counts,
        rows=[asdict(r) for r in rows],
    )  # fmt: skip
    write_json_atomic(out / "results.json", info)
    report = write_report(out, info, rows, routing, grids, preset, contents, experts)
    print(markdown_table(rows))
    print(f"\nreport:        {report}\nexample grids: {out / 'grids'}/\nrouting:       {out / 'routing.json'}\n"
          f"results:       {out / 'results.json'}\ncommands:      {commands}\nwall time:     {wall / 60:.1f} min",
          flush=True)  # fmt: skip
    return report


def routing_histograms(pruning: Path, experts: np.ndarray, cosine: list[int], chart: Path) -> dict[str, list[int]]:
    """Prompts per expert, training captions and validation prompts, under the calibrated routing and plain cosine;
    a bar chart of them in ``chart``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(read_experts(pruning)["experts"])
    train = read_router_info(pruning)["routing"]
    counts = {
        "train, calibrated": train["train_counts"], "train, plain cosine": train["cosine_counts"],
        "validation, calibrated": np.bincount(experts, minlength=k).tolist(),
        "validation, plain cosine": np.bincount(cosine, minlength=k).tolist(),
    }  # fmt: skip
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
    for ax, split in zip(axes, ("train", "validation")):
        for j, rule in enumerate(("calibrated", "plain cosine")):
            values = np.array(counts[f"{split}, {rule}"], float)
            ax.bar(np.arange(k) + (j - 0.5) * 0.38, values / values.sum(), 0.38, label=rule)
        ax.axhline(1 / k, color="gray", lw=0.8, ls="--", label="1/K")
        ax.set(title=f"{split} captions", xlabel="expert", xticks=range(k))
    axes[0].set_ylabel("share of prompts")
    axes[1].legend(frameon=False)
    fig.tight_layout()
    fig.savefig(chart, dpi=120)
    plt.close(fig)
    return counts


def write_grids(folder: Path, aptp_images: np.ndarray, teacher_images: np.ndarray, experts: np.ndarray,
                count: int, scale: int = 3, gap: int = 2) -> dict[int, list[int]]:  # fmt: skip
    """Per expert a PNG of its first ``count`` prompts: the expert's images on top, the teacher's below. Returns
    expert -> the prompt indices of its columns."""
    folder.mkdir(parents=True, exist_ok=True)
    size, columns = aptp_images.shape[1], {}
    for k in sorted(set(experts.tolist())):
        index = np.flatnonzero(experts == k)[:count].tolist()
        canvas = np.full((2 * (size + gap) + gap, len(index) * (size + gap) + gap, 3), 255, np.uint8)
        for c, i in enumerate(index):
            x = gap + c * (size + gap)
            canvas[gap : gap + size, x : x + size] = aptp_images[i]
            canvas[2 * gap + size : 2 * (gap + size), x : x + size] = teacher_images[i]
        image = Image.fromarray(canvas)
        image.resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST).save(folder / f"expert_{k}.png")
        columns[k] = index
    return columns


# ---------------------------------------------------------------------------------------------------------------
# The report


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def markdown_table(rows: list[Row]) -> str:
    dense = next(r for r in rows if r.model == "dense teacher")
    lines = [
        "| model | GMACs / step | of dense | params | UNet ms | prompts | digit acc. | colour acc. | FID "
        "| teacher: digit acc. | teacher: FID |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = None if r.macs is None else r.macs / dense.macs
        params = "-" if r.params is None else f"{r.params / 1e6:.2f}M"
        lines.append(
            f"| {r.model} | {_num(r.macs and r.macs / 1e9, '.4f')} | {_num(ratio, '.0%')} | {params} "
            f"| {_num(r.unet_ms, '.1f')} | {r.prompts} | {_num(r.digit_accuracy, '.3f')} "
            f"| {_num(r.colour_accuracy, '.3f')} | {_num(r.fid, '.2f')} | {_num(r.teacher_digit_accuracy, '.3f')} "
            f"| {_num(r.teacher_fid, '.2f')} |"
        )
    return "\n".join(lines)


def _counts(values: list) -> str:
    return ", ".join(f"{v} ({n})" for v, n in sorted(Counter(values).items()))


def write_report(out: Path, info: dict, rows: list[Row], routing: list[dict], grids: dict[int, list[int]],
                 preset: Preset, contents: list, experts: np.ndarray) -> Path:  # fmt: skip
    n = len(routing)
    seconds = "\n".join(f"| {what} | {s:.1f} |" for what, s in info["stage_seconds"].items())
    content_rows = []
    for k in range(len(info["routed_train"])):
        mine = [c for c, e in zip(contents, experts) if e == k]
        content_rows.append(
            f"| {k} | {len(mine)} ({len(mine) / n:.0%}) | {info['routed_train'][k]} "
            f"| {_counts([c.digit for c in mine])} | {_counts([c.ink for c in mine])} "
            f"| {_counts([c.background for c in mine])} |"
        )
    prompt_rows = []
    for k, index in grids.items():
        for column, i in enumerate(index):
            r = routing[i]
            prompt_rows.append(
                f"| {k} | {column + 1} | {r['prompt']} | {r['digit']} | {r['read_by_expert']} | {r['read_by_teacher']} "
                f"| {'yes' if r['colours_by_expert'] else 'no'} | {'yes' if r['colours_by_teacher'] else 'no'} |"
            )
    counts, target = info["routing_counts"], info["budget"]
    macs = {r.model: r.macs for r in rows}
    routing_rows = [
        f"| {k} | {macs[f'expert {k}'] / macs['dense teacher']:.0%} | "
        + " | ".join(f"{c[k]} ({c[k] / max(sum(c), 1):.0%})" for c in counts.values())
        + " |"
        for k in range(len(info["routed_train"]))
    ]
    text = [
        f"# APTP on captioned digits: {info['preset']}",
        "",
        f"The teacher `{info['teacher']}` (a text-to-image Stable Diffusion of SD2.1's block types at toy width, "
        f"32 px, 8x8 latents) pruned by `aptp.prune` into {len(info['routed_train'])} experts at a budget of "
        f"{info['budget']:.0%} of its UNet MACs ({preset.prune_steps} steps, batch {preset.prune_batch}), every "
        f"caption routed by `aptp.filter_dataset`, each expert fine-tuned by `aptp.finetune` ({preset.finetune_steps} "
        f"steps, batch {preset.finetune_batch}, distillation from the teacher). Generation: the {n} validation "
        f"captions (the held-out digits), PNDM {preset.sampling_steps} steps, guidance {preset.guidance_scale}, seed "
        f"{SEED} + prompt index, the same noise for every model; APTP by `APTPPipeline` (its routing agrees with "
        f"`aptp.filter_dataset` on {info['routing_agrees_with_filter']} of {n} prompts). Wall time "
        f"{info['wall_seconds'] / 60:.1f} min on "
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads in this process).",
        "",
        markdown_table(rows),
        "",
        "- **digit acc.**: share of images that a CNN trained on the training digits (held-out accuracy "
        f"{info['classifier_heldout_accuracy']:.3f}) reads as the prompt's digit; it reads the 8x8 ink map: each "
        "pixel's position between the prompt's background and ink colours, averaged over 4x4 blocks.",
        "- **colour acc.**: share of images whose background and ink are the prompt's (the palette colours nearest to "
        "the image's median colour and to its pixels farthest from that).",
        "- **FID**: Frechet distance in the classifier's 64-d feature space between the images and the real images of "
        "the same captions (for an expert: of its prompts; few prompts make it larger). Lower is better.",
        "- **teacher** columns: the dense teacher on the same prompts. **UNet ms**: one UNet forward of a batch of "
        f"{preset.batch_size} on this CPU, best of {preset.timing_repeats}; at this toy size it follows the MACs only "
        "loosely, per-layer overheads weighing much. GMACs: per UNet step and image (`experts.json`, counted by "
        "hooks).",
        f"- Drawing all {n} prompts took {info['teacher_seconds']:.1f}s with the dense teacher and "
        f"{info['aptp_seconds']:.1f}s with APTP (routing and loading the experts included).",
        *[f"- {r.model}: {r.note}" for r in rows if r.note],
        "",
        "## Routing",
        "",
        "Prompts per expert: the calibrated rule (`argmax_k cos_k / 0.05 + log v_k`, v from the transport that "
        "balances the training captions, computed once at the end of pruning; what `aptp.filter_dataset` and "
        "`APTPPipeline` use) against the plain cosine argmax. MACs: the expert's share of the dense UNet's, against "
        f"the budget of {target:.0%} on average.",
        "",
        "![routing](routing.png)",
        "",
        f"| expert | MACs (target {target:.0%}) | " + " | ".join(counts) + " |",
        "|---|---|" + "---|" * len(counts),
        *routing_rows,
        "",
        "## What each expert got",
        "",
        "| expert | validation prompts | training captions | digits | inks | backgrounds |",
        "|---|---|---|---|---|---|",
        *content_rows,
        "",
        "## Prompts and their experts",
        "",
        f"`grids/expert_<k>.png`: the first {preset.grid_prompts} prompts routed to expert k, one per column (the "
        "table below, in order): the expert's image on top, the dense teacher's below. All prompts: `routing.json`.",
        "",
        *[f"![expert {k}](grids/expert_{k}.png)" for k in grids],
        "",
        "| expert | column | prompt | digit | read (expert) | read (teacher) | colours (expert) | colours (teacher) |",
        "|---|---|---|---|---|---|---|---|",
        *prompt_rows,
        "",
        "## Time per stage (s)",
        "",
        "| stage | s |",
        "|---|---|",
        seconds,
        "",
        f"Every stage's command line: `commands.sh`; their output: `logs/`. Teacher: `{info['teacher']}/README.md`.",
        "",
    ]  # fmt: skip
    path = out / "report.md"
    path.write_text("\n".join(text))
    return path


# ---------------------------------------------------------------------------------------------------------------
# The teacher


def train_teacher(args: argparse.Namespace) -> Path:
    """Build the captioned digits and the untrained teacher, train its UNet with ``aptp.finetune`` (one dense expert,
    no distillation), then export it to ``--teacher`` with measured metrics."""
    out = Path(args.out or "outputs/aptp-teacher")
    for stale in ("dense", "train"):
        shutil.rmtree(out / stale, ignore_errors=True)
    runner = StageRunner(out)
    w, dense = out / "world", out / "dense"
    runner("aptp.digits_world", ["--out", w, "--data", args.data, "--teacher-init"],
           "the captioned digits, the VAE and the untrained teacher")  # fmt: skip
    runner("aptp.baselines", [
        "--method", "dense", "--pretrained_model_name_or_path", w / "sd", "--output_dir", dense,
        "--resolution", world.RESOLUTION, "--data_dir", w / "cc3m", "--prompt_encoder", w / "sentence-encoder",
    ], "a one-expert pruning directory whose expert is the whole UNet")  # fmt: skip
    runner("aptp.filter_dataset", ["--pruning_dir", dense, "--splits", "train"], "every training caption to it")
    runner("aptp.finetune", ["--config", CONFIGS / "teacher.yaml", "--expert_id", 0, f"pruning_dir={dense}",
                             f"output_dir={out / 'train'}"], "train the teacher's UNet")  # fmt: skip
    runner.write_commands()
    return export_teacher(out, Path(args.teacher), Path(args.data), runner)


def export_teacher(out: Path, dest: Path, data: Path, runner: StageRunner) -> Path:
    """``dest``/sd: the untrained teacher with the trained UNet (EMA weights, stored as float16), ``dest``/
    sentence-encoder; scored as shipped; ``teacher.json`` and ``README.md`` with the commands and the metrics."""
    from diffusers import UNet2DConditionModel

    trained = out / "train" / "expert"
    code = json.loads((trained / "code.json").read_text())["code"]
    if not all(code):
        raise UserError(f"{trained}: expected the dense expert (an all-ones code)")
    unet = UNet2DConditionModel.from_config(json.loads((trained / "base_config.json").read_text()))
    unet.load_state_dict(load_file(trained / "expert.safetensors"), strict=True)  # the all-ones expert is the UNet
    for sub in ("sd", "sentence-encoder"):
        shutil.rmtree(dest / sub, ignore_errors=True)
        shutil.copytree(out / "world" / sub, dest / sub)
    shutil.rmtree(dest / "sd" / "unet")
    unet.half().save_pretrained(dest / "sd" / "unet")

    preset = PRESETS["demo"]
    cc3m = out / "world" / "cc3m"
    prompts = world.read_captions(cc3m, "validation")
    contents = [world.parse_caption(p) for p in prompts]
    labels = np.array([c.digit for c in contents])
    evaluator = digits.Evaluator.build(data, seed=0, epochs=preset.classifier_epochs)
    images = world.draw(world.load_pipeline(dest / "sd"), prompts, SEED, preset.sampling_steps,
                        preset.guidance_scale, preset.batch_size, desc="teacher samples")  # fmt: skip
    read = Reading.of(evaluator.classifier, images, contents)
    real = Reading.of(evaluator.classifier, world.load_images(cc3m / "validation"), contents)
    records = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    seconds, last = 0.0, 0
    for r in records:
        seconds += (r["step"] - last) / r["steps_per_sec"]
        last = r["step"]
    vae = json.loads((out / "world" / "sd" / "vae_training.json").read_text())
    metrics = dict(
        train_steps=records[-1]["step"], final_loss=records[-1]["loss"], training_seconds=round(seconds, 1),
        vae_steps=vae["steps"], vae_seconds=vae["seconds"], vae_mse=vae["final_mse"],
        threads=int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())), cpus=os.cpu_count(),
        prompts=len(prompts),
        sampler=f"PNDM {preset.sampling_steps} steps, guidance {preset.guidance_scale}, seed {SEED} + prompt index",
        digit_accuracy=float((read.digits == labels).mean()), colour_accuracy=float(read.colours.mean()),
        fid=fid(read.features, real.features),
        digit_accuracy_per_digit=[float((read.digits[labels == d] == d).mean()) for d in range(10)],
        classifier_heldout_accuracy=evaluator.heldout_accuracy,
    )  # fmt: skip
    info = dict(commands=runner.commands, metrics=metrics, torch=torch.__version__)
    write_json_atomic(dest / "teacher.json", info)
    write_teacher_card(dest, info)
    print(json.dumps(metrics, indent=1))
    print(f"teacher: {dest / 'sd'} (sentence encoder: {dest / 'sentence-encoder'}; card: {dest / 'README.md'})")
    return dest


def write_teacher_card(dest: Path, info: dict) -> None:
    m = info["metrics"]
    per_digit = " | ".join(f"{a:.2f}" for a in m["digit_accuracy_per_digit"])
    commands = "\n".join(info["commands"])
    vae = f"{m['vae_steps']}, {m['vae_seconds'] / 60:.1f} min, {m['vae_mse']:.4f}"
    cores = f"{m['threads']} threads, {m['cpus']} CPU cores shared with other work"
    text = f"""# The captioned-digits teacher of `make demo-aptp`

`sd/`: a Stable Diffusion folder (diffusers layout) for 32 px images of scikit-learn's digits in named colours,
from captions such as "the number 7 written in blue ink on grey paper": the UNet of `configs/aptp/tiny-unet.json`
(SD2.1's block types at toy width, v-prediction) on 8x8 latents, its weights stored as float16; a 3-level VAE trained
for reconstruction; a random 2-layer CLIP text encoder (frozen, as SD's) with a CLIP BPE tokenizer learnt on the
captions. `sentence-encoder/`: the router's prompt encoder (a bag of concepts: see `aptp/digits_world.py`).
Made by `make aptp-teacher` (`python demo_aptp.py --train-teacher`), which runs:

```bash
{commands}
```

and exports the EMA weights of the last command's expert (the dense UNet: an all-ones code) into `sd/unet`. It never
saw an empty caption, so sample it without classifier-free guidance (`guidance_scale=1`, as the demo does).

| | |
|---|---|
| VAE: steps, training time, final reconstruction MSE ([-1, 1] scale) | {vae} |
| UNet: training steps (batch 32) | {m["train_steps"]} |
| UNet: final training loss (last log interval) | {m["final_loss"]:.4f} |
| UNet: training time (sum of logged intervals; {cores}) | {m["training_seconds"] / 60:.1f} min |
| digit accuracy of the {m["prompts"]} validation captions' samples ({m["sampler"]}) | {m["digit_accuracy"]:.3f} |
| colour accuracy of the same samples | {m["colour_accuracy"]:.3f} |
| FID of the same samples vs the captions' real images (classifier features) | {m["fid"]:.2f} |
| classifier accuracy on the held-out digits | {m["classifier_heldout_accuracy"]:.3f} |

Digit accuracy per prompted digit:

| 0 | 1 | 2 | 3 | 4 | 5 | 6 | 7 | 8 | 9 |
|---|---|---|---|---|---|---|---|---|---|
| {per_digit} |

The metrics are those of `demo_aptp.py` (see its docstring), measured on the files as shipped; all of it is also in
`teacher.json`.
"""
    (dest / "README.md").write_text(text)


def main(args: argparse.Namespace) -> Path:
    if args.train_teacher:
        return train_teacher(args)
    return run_demo(args)


if __name__ == "__main__":
    run(lambda: main(parse_args()))
