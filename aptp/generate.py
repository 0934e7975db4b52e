"""Generate images with APTP's experts: per-expert FID sets, or prompts routed to their experts.

Per expert (the FID sets): every caption of ``--split`` routed to expert K (``aptp.filter_dataset``) gives one image,
resized to 256 (PIL bicubic) and named after its reference image (``<stem>.png``; ``<stem>_<caption id>.png`` where
one image has several captions, as in COCO):

    python -m aptp.generate --pruning_dir results/aptp/pruning --expert_id 3 --split validation --save_references

Routed: prompts from a file (one per line, or a JSON list of strings), each drawn by the expert its router picks,
saved as ``00000.png``, ``00001.png``, ... at the generated resolution:

    python -m aptp.generate --pruning_dir results/aptp/pruning --prompts prompts.txt

COCO-30k (routed, the paper's COCO evaluation set): the first caption of each of 30,000 distinct val2014 images drawn
with seed 42 (``aptp.data.coco30k``; ``--max_samples N``: the first N of that draw), each routed to its expert, resized
to ``--size`` and named after its image (``COCO_val2014_<id>.png``); ``--save_references`` writes those 30k reference
images beside them; ``python -m aptp.evaluate <output_dir> --coco30k data/coco`` scores them:

    python -m aptp.generate --pruning_dir results/aptp/pruning/coco --coco30k data/coco --save_references

Defaults follow the paper: PNDM 25 steps, guidance 7.5, seed 43. Caption row r (prompt i) draws its noise from
seed + r (seed + i), so a re-run or a resumed run gives the same images; images that exist are skipped. Written to
``--output_dir``: the PNGs and ``prompts.json`` (file name -> caption); in the routed modes also ``routing.json``
(image, prompt, expert, MACs). ``--save_references`` also writes the reference images of the same rows, short side
resized to 256 (bicubic) and center-cropped, under the same names into a sibling folder (``<output_dir>_references``),
for FID on exactly these rows. ``--reference_preprocess authors`` resizes as the authors' scripts did instead, for
FIDs comparable with the paper's: both the generated images and the whole references straight to 256 x 256 with
cv2.resize's bilinear arithmetic (``aptp.data.resize_like_cv2``; for the references an assumption, see there).

Experts: ``--expert_path`` (per expert; default ``<pruning_dir>/finetuning/expert_<K>/expert``) or ``--experts_dir``
(routed; default ``<pruning_dir>/finetuning``). An expert without a fine-tuned folder is sliced from the dense UNet
with a warning, or refused with ``--missing_expert error``. ``--expert_id K`` for an expert that no caption of the
split was routed to has nothing to draw: it says so in one line and exits 0.

Under ``accelerate launch`` or ``torchrun`` each process draws the images i with i % world_size == rank.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import yaml
from diffusers.utils.pil_utils import numpy_to_pil
from PIL import Image

from diffcompress.checkpoint import write_json_atomic
from diffcompress.cli import ArgumentParser, non_negative_float, non_negative_int, positive_int, run
from diffcompress.data import to_rgb8
from diffcompress.distributed import DistInfo, barrier, cleanup, resolve_precision, setup_distributed
from diffcompress.errors import UserError
from diffcompress.progress import progress_bar

from . import original
from .assignments import read_expert_rows, read_summary
from .data import COCO30K_SIZE, REFERENCE_PREPROCESS, CaptionTable, coco30k, load_captions, resize_like_cv2
from .pipeline import MISSING_EXPERT, APTPPipeline, per_prompt_generators

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHOWN_ROWS = 20  # routed mode prints this many rows of its routing table
FLAG_MODES = {  # the modes each flag applies to
    "expert_path": ("expert_id",), "dataset_name": ("expert_id",), "data_dir": ("expert_id",),
    "max_samples": ("expert_id", "coco30k"), "save_references": ("expert_id", "coco30k"),
    "references_dir": ("expert_id", "coco30k"), "reference_preprocess": ("expert_id", "coco30k"),
    "experts_dir": ("prompts", "coco30k"),
}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description="APTP generation: per-expert FID sets or routed prompts")
    p.add_argument("--pruning_dir", required=True, help="output_dir of aptp.prune (router, experts.json, filtered/)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--expert_id", type=non_negative_int, help="per expert: draw the captions of --split routed to this expert"
    )
    mode.add_argument("--prompts", help="routed: a text file with one prompt per line, or a JSON list of prompts")
    mode.add_argument(
        "--coco30k", metavar="COCO_DIR",
        help="routed: the COCO-30k captions of this COCO 2014 folder (annotations/, images/val2014/)",
    )  # fmt: skip
    p.add_argument("--expert_path", help="per expert: its fine-tuned folder (default: the aptp.finetune layout)")
    p.add_argument("--experts_dir", help="routed: folder of expert_<K>/expert (default: <pruning_dir>/finetuning)")
    p.add_argument(
        "--missing_expert", default="dense", choices=MISSING_EXPERT,
        help="an expert without a fine-tuned folder: slice it from the dense UNet (warns), or fail",
    )  # fmt: skip
    p.add_argument("--split", default="validation", help="per expert: caption split (train | validation)")
    p.add_argument(
        "--max_samples", type=positive_int, help="per expert: its first N rows; COCO-30k: the first N of the draw"
    )
    p.add_argument("--dataset_name", help="per expert: cc3m | coco (default: the one filtering read)")
    p.add_argument("--data_dir", help="per expert: the dataset folder (default: the one filtering read)")
    p.add_argument("--save_references", action="store_true", help="also write the resized reference images")
    p.add_argument(
        "--reference_preprocess", choices=REFERENCE_PREPROCESS,
        help="ours (default): bicubic, references short side + centre crop; authors: cv2 bilinear to size x size",
    )  # fmt: skip
    p.add_argument("--output_dir", help="default: <pruning_dir>/generation/<split>/expert_<K>, .../routed, .../coco30k")
    p.add_argument("--references_dir", help="default: <output_dir>_references")
    p.add_argument("--size", type=positive_int, default=256, help="FID sets: saved images are resized to size x size")
    p.add_argument("--pretrained_model_name_or_path", help="Stable Diffusion folder or hub id (default: router.json)")
    p.add_argument("--revision")
    p.add_argument("--prompt_encoder", help="sentence-transformers folder or hub id (default: router.json)")
    p.add_argument("--scheduler", default="PNDMScheduler", help="a diffusers scheduler class name")
    p.add_argument("--num_inference_steps", type=positive_int, default=25)
    p.add_argument("--guidance_scale", type=non_negative_float, default=7.5)
    p.add_argument("--seed", type=non_negative_int, default=43)
    p.add_argument(
        "--resolution", type=positive_int, help="generated height and width (default: the model's; SD2.1: 768)"
    )
    p.add_argument("--batch_size", type=positive_int, default=8, help="prompts per forward pass, per process")
    p.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16")
    p.add_argument("--device", help="cuda | cpu (default: cuda when available)")
    args = p.parse_args(argv)
    mode = "expert_id" if args.expert_id is not None else "coco30k" if args.coco30k else "prompts"
    for flag, modes in FLAG_MODES.items():
        if mode not in modes and getattr(args, flag) not in (None, False):
            raise UserError(f"--{flag} applies only with {' or '.join(f'--{m}' for m in modes)}")
    for flag in ("max_samples", "size", "num_inference_steps", "batch_size", "resolution"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be positive, got {getattr(args, flag)}")
    args.reference_preprocess = args.reference_preprocess or "ours"
    return args


def load_pipeline(
    args: argparse.Namespace, info: DistInfo, dtype: torch.dtype, experts: str | dict[int, str] | None
) -> APTPPipeline:
    return APTPPipeline.from_pretrained(
        args.pruning_dir, experts, pretrained_model_name_or_path=args.pretrained_model_name_or_path,
        revision=args.revision, prompt_encoder=args.prompt_encoder, scheduler=args.scheduler,
        missing_expert=args.missing_expert, device=info.device, torch_dtype=dtype,
    )  # fmt: skip


def dataset_of(args: argparse.Namespace, summary: dict) -> tuple[str, str]:
    """--dataset_name and --data_dir; by default those filtering read (its summary), else the pruning run's."""
    if "dataset" in summary and "data_dir" in summary:
        data = dict(dataset_name=summary["dataset"], data_dir=summary["data_dir"])
    elif (config := original.run_config(args.pruning_dir)[0]) is not None:  # ours, or the authors' run's
        data = (yaml.safe_load(config.read_text()) or {}).get("data", {})
    else:
        data = {}
    name, folder = args.dataset_name or data.get("dataset_name"), args.data_dir or data.get("data_dir")
    if not (name and folder):
        raise UserError("--dataset_name and --data_dir: not given, and neither filtering nor pruning recorded them")
    return name, folder


def image_names(table: CaptionTable, rows: np.ndarray) -> list[str]:
    """``<stem of the reference image>.png`` per row; ``<stem>_<caption id>.png`` for images with several captions."""
    stems = [Path(p).stem for p in table.paths]
    shared = {s for s, n in Counter(stems).items() if n > 1}
    return [f"{stems[r]}_{table.ids[r]}.png" if stems[r] in shared else f"{stems[r]}.png" for r in rows]


def record_prompts(folder: Path, prompts: dict[str, str], main: bool) -> None:
    """Add ``prompts`` to ``folder/prompts.json`` (the main process writes); images of other prompts are an error."""
    path = folder / "prompts.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    if clash := [name for name, prompt in prompts.items() if old.get(name, prompt) != prompt]:
        raise UserError(
            f"{folder}: {len(clash)} of its images were drawn for other prompts ({clash[0]}: {old[clash[0]]!r}, "
            f"now {prompts[clash[0]]!r}): choose another --output_dir"
        )
    if main:
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {**old, **prompts})


def save_png(image: Image.Image, path: Path) -> None:
    """Write atomically, so an interrupted run never leaves a partial image that a resumed run would skip."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def square(image: Image.Image, size: int) -> Image.Image:
    """Short side resized to ``size`` (bicubic), then the centered ``size`` x ``size`` crop: the training
    transform's geometry (``aptp.data.ImageTransform``)."""
    w, h = image.size
    resized = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    image = to_rgb8(image).resize(resized, Image.BICUBIC)
    left, top = int(round((resized[0] - size) / 2)), int(round((resized[1] - size) / 2))
    return image.crop((left, top, left + size, top + size))


def fid_image(image: Image.Image, size: int, preprocess: str) -> Image.Image:
    """A generated image as the FID set holds it: ``ours`` PIL bicubic to ``size`` x ``size``; ``authors``
    cv2.resize's bilinear arithmetic (the authors' generation script)."""
    if preprocess == "authors":
        return Image.fromarray(resize_like_cv2(np.asarray(to_rgb8(image)), size, size))
    return image.resize((size, size), Image.BICUBIC)


def reference_image(image: Image.Image, size: int, preprocess: str) -> Image.Image:
    """A reference image as the FID set holds it: ``ours`` short side to ``size`` and the centre crop (``square``);
    ``authors`` the whole image to ``size`` x ``size`` with cv2.resize's bilinear arithmetic (assumed to be what
    their resize_and_save_images.py --size 256 256 does; see ``aptp.data.REFERENCE_PREPROCESS``)."""
    if preprocess == "authors":
        return Image.fromarray(resize_like_cv2(np.asarray(to_rgb8(image)), size, size))
    return square(image, size)


def write_references(
    paths: list[str], names: list[str], indices: range | list[int], refs: Path, args: argparse.Namespace, info: DistInfo
) -> None:
    """``refs/names[j]``: the reference image ``paths[j]`` resized, for each j in ``indices`` not yet written."""
    refs.mkdir(parents=True, exist_ok=True)
    for j in progress_bar(indices, desc="references", unit="image", disable=not info.is_main):
        if (refs / names[j]).exists():
            continue
        try:
            with Image.open(paths[j]) as image:
                save_png(reference_image(image, args.size, args.reference_preprocess), refs / names[j])
        except OSError as e:  # a corrupt download; FID then compares one image fewer
            print(f"[rank {info.rank}] skipping unreadable reference {paths[j]}: {e}")


def generate_expert(args: argparse.Namespace, info: DistInfo, dtype: torch.dtype) -> None:
    """Per-expert mode: one image per caption row routed to ``--expert_id``."""
    k, pruning_dir = args.expert_id, Path(args.pruning_dir)
    rows = read_expert_rows(pruning_dir, args.split, k)[: args.max_samples]
    if len(rows) == 0:
        if info.is_main:
            print(f"expert {k}: no {args.split} caption was routed to it ({pruning_dir / 'filtered'}); nothing to draw")
        return
    summary = read_summary(pruning_dir, args.split)
    table = load_captions(*dataset_of(args, summary), args.split)
    if summary["rows"] != len(table):
        raise UserError(
            f"{pruning_dir}/filtered assigned {summary['rows']} {args.split} rows, {table.source} has {len(table)}: "
            f"pass the --dataset_name and --data_dir that filtering read"
        )
    out = Path(args.output_dir or pruning_dir / "generation" / args.split / f"expert_{k}")
    refs = Path(args.references_dir or out.with_name(f"{out.name}_references"))
    names = image_names(table, rows)
    record_prompts(out, {n: table.captions[r] for n, r in zip(names, rows)}, info.is_main)

    experts = {k: args.expert_path} if args.expert_path else None
    pipe = load_pipeline(args, info, dtype, experts)
    pipe.expert_pipeline(k)  # a missing or mismatched expert fails now, not after the references
    before = sum((out / n).exists() for n in names)
    mine = range(info.rank, len(rows), info.world_size)
    todo = [j for j in mine if not (out / names[j]).exists()]
    out.mkdir(parents=True, exist_ok=True)
    with progress_bar(total=len(todo), desc=f"expert {k}", unit="image", disable=not info.is_main) as bar:
        for start in range(0, len(todo), args.batch_size):
            chunk = todo[start : start + args.batch_size]
            captions = [table.captions[rows[j]] for j in chunk]
            generators = per_prompt_generators([args.seed + int(rows[j]) for j in chunk], len(chunk))
            images = pipe.generate(
                k, captions, generators, args.num_inference_steps, args.guidance_scale, args.resolution,
                args.resolution, args.batch_size, bar,
            )  # fmt: skip
            for j, image in zip(chunk, numpy_to_pil(images)):
                save_png(fid_image(image, args.size, args.reference_preprocess), out / names[j])

    if args.save_references:
        write_references([table.paths[r] for r in rows], names, mine, refs, args, info)
    barrier()
    if info.is_main:
        done = sum((out / n).exists() for n in names)
        print(
            f"expert {k}: {done} of its {len(rows)} {args.split} captions have images in {out} ({done - before} drawn "
            f"now, {before} were there); prompts: {out / 'prompts.json'}"
        )
        if args.save_references:
            print(f"references: {sum((refs / n).exists() for n in names)} images in {refs}")


def read_prompts(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--prompts {path!r} does not exist")
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".json":
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"--prompts {path!r} is not valid JSON ({e})") from None
        if not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)):
            raise UserError(f"--prompts {path!r}: expected a JSON list of strings")
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"--prompts {path!r} holds no prompts")
    return prompts


def generate_routed(args: argparse.Namespace, info: DistInfo, dtype: torch.dtype) -> None:
    """Routed modes: every prompt drawn by its expert; ``--prompts`` at the generated resolution, ``--coco30k``
    resized to ``--size`` and named after the COCO images (with their references, given ``--save_references``)."""
    if args.coco30k:
        table = coco30k(args.coco30k, args.max_samples or COCO30K_SIZE)
        prompts, paths = list(table.captions), list(table.paths)
        names = [f"{Path(p).stem}.png" for p in paths]
        out = Path(args.output_dir or Path(args.pruning_dir) / "generation" / "coco30k")
    else:
        prompts, paths = read_prompts(args.prompts), []
        names = [f"{i:05d}.png" for i in range(len(prompts))]
        out = Path(args.output_dir or Path(args.pruning_dir) / "generation" / "routed")
    record_prompts(out, dict(zip(names, prompts)), info.is_main)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args, info, dtype, args.experts_dir)
    experts = pipe.route(prompts)  # every process routes every prompt: cheap, and no communication
    macs = [int(pipe.experts[k]["macs"]) for k in experts]
    if info.is_main:
        routing = [dict(image=n, prompt=p, expert=k, macs=m) for n, p, k, m in zip(names, prompts, experts, macs)]
        write_json_atomic(out / "routing.json", routing)
        width = max(10, *(len(n) for n in names))
        print(f"{'image':<{width}} {'expert':>6} {'GMACs':>8}  prompt")
        for r in routing[:SHOWN_ROWS]:
            print(f"{r['image']:<{width}} {r['expert']:>6} {r['macs'] / 1e9:>8.4f}  {r['prompt']}")
        if len(routing) > SHOWN_ROWS:
            print(f"... {len(routing) - SHOWN_ROWS} more in {out / 'routing.json'}")
        counts = Counter(experts)
        print("prompts per expert: " + ", ".join(f"{k}: {counts[k]}" for k in sorted(counts)))

    mine = range(info.rank, len(prompts), info.world_size)
    todo = [i for i in mine if not (out / names[i]).exists()]
    with progress_bar(total=len(todo), desc="routed", unit="image", disable=not info.is_main) as bar:
        for k in sorted({experts[i] for i in todo}):
            group = [i for i in todo if experts[i] == k]
            bar.set_postfix(expert=k)
            for start in range(0, len(group), args.batch_size):
                chunk = group[start : start + args.batch_size]
                generators = per_prompt_generators([args.seed + i for i in chunk], len(chunk))
                images = pipe.generate(
                    k, [prompts[i] for i in chunk], generators, args.num_inference_steps, args.guidance_scale,
                    args.resolution, args.resolution, args.batch_size, bar,
                )  # fmt: skip
                for i, image in zip(chunk, numpy_to_pil(images)):
                    save_png(fid_image(image, args.size, args.reference_preprocess) if paths else image, out / names[i])
    refs = Path(args.references_dir or out.with_name(f"{out.name}_references"))
    if args.save_references:
        write_references(paths, names, mine, refs, args, info)
    barrier()
    if info.is_main:
        done = sum((out / n).exists() for n in names)
        print(f"{done} routed images in {out}; prompts: {out / 'prompts.json'}; routing: {out / 'routing.json'}")
        if args.save_references:
            print(f"references: {sum((refs / n).exists() for n in names)} images in {refs}")
        if args.coco30k:
            ref = f"--ref-dir {refs}" if args.save_references else f"--coco30k {args.coco30k}"
            preprocess = " --reference_preprocess authors" if args.reference_preprocess == "authors" else ""
            print(f"score them: python -m aptp.evaluate {out} {ref}{preprocess}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = setup_distributed(args.device)
    try:
        dtype = DTYPES[resolve_precision(args.precision, info.device)]
        (generate_expert if args.expert_id is not None else generate_routed)(args, info, dtype)
    finally:
        cleanup()


if __name__ == "__main__":
    run(main)
