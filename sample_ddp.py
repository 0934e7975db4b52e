"""Sample many images (e.g. 50K for FID) over any number of processes, then pack them into one .npz.

    torchrun --nproc_per_node=8 sample_ddp.py --model DiT-D14/2 --ckpt TinyDiT-D14-MaskedKD-500K.pt \
        --vae path/to/sd-vae-ft-ema --num-fid-samples 50000 --cfg-scale 1.5
    python sample_ddp.py --model DiT-Ti/4 --image-size 16 --vae none --num-classes 10 --num-fid-samples 64

Image i gets its label and its starting noise from (--global-seed, i) alone, so the result does not
depend on the number of processes or the batch size, and a re-run (after a crash or with more GPUs)
only makes the missing PNGs. Rank r makes the missing indices r, r+W, ...; rank 0 then writes
``<folder>.npz`` with ``arr_0`` uint8 [N, H, W, 3] in index order, ``labels`` [N], and the sampling ``precision``
(fp32 by default, as DiT's script; ``--precision bf16`` when asked) and ``tf32`` (TF32 matmuls: on CUDA unless
``--no-tf32``) as 0-d arrays.

``<folder>/run.json`` records the checkpoint (path, size, modification time) and the settings; a re-run
whose checkpoint or settings differ is refused instead of mixing two models' images (the folder is named
after the checkpoint's file name, which a new checkpoint may share).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffcompress.checkpoint import atomic_path, write_json_atomic
from diffcompress.cli import ArgumentParser, non_negative_int, positive_int, run
from diffcompress.distributed import barrier, cleanup, setup_distributed
from diffcompress.errors import UserError
from diffcompress.progress import progress_bar
from diffcompress.sampling import add_sampling_args, apply_precision, load_model_and_codec, sample_latents, to_uint8

# Flags that change how the images are made, not which images: a re-run may change them.
RUN_FREE_FLAGS = ("num_fid_samples", "per_proc_batch_size", "sample_dir", "device")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_args(p, cfg_scale=1.5)
    p.add_argument("--num-fid-samples", type=positive_int, default=50_000)
    p.add_argument("--per-proc-batch-size", type=positive_int, default=32)
    p.add_argument("--sample-dir", default="samples")
    p.add_argument("--global-seed", type=non_negative_int, default=0)
    p.add_argument("--balanced-labels", action="store_true", help="labels i mod num-classes instead of uniform")
    return p.parse_args(argv)


def index_seed(global_seed: int, index: int) -> int:
    return int(np.random.SeedSequence([global_seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def label_of(index: int, args: argparse.Namespace) -> int:
    if args.balanced_labels:
        return index % args.num_classes
    return int(np.random.default_rng(index_seed(args.global_seed, index)).integers(args.num_classes))


def folder_name(args: argparse.Namespace) -> str:
    """DiT's sample folder name; a sampler other than DiT's 250 DDPM steps is named before the seed."""
    ckpt = Path(args.ckpt).stem if args.ckpt else "random"
    steps = args.num_sampling_steps
    sampler = "" if (args.sampler, steps) == ("ddpm", 250) else f"-{args.sampler}{steps}"
    return (f"{args.model.replace('/', '-')}-{ckpt}-size-{args.image_size}-vae-{Path(args.vae).name}-"
            f"cfg-{args.cfg_scale}{sampler}-seed-{args.global_seed}")  # fmt: skip


def run_record(args: argparse.Namespace, precision: str, tf32: bool) -> dict:
    """What decides the images: every other flag (precision and TF32 as chosen for the device, not as asked), and the
    checkpoint's identity (hashing gigabytes would be slow)."""
    record = {k: v for k, v in sorted(vars(args).items()) if k not in RUN_FREE_FLAGS}
    record.update(precision=precision, tf32=tf32)
    if args.ckpt and Path(args.ckpt).is_file():
        stat = Path(args.ckpt).stat()
        record["ckpt"] = {"path": str(Path(args.ckpt).resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return record


def check_same_run(folder: Path, record: dict) -> None:
    """Refuse to add to PNGs that another checkpoint or other settings made."""
    path = folder / "run.json"
    if not path.is_file():
        return
    previous = json.loads(path.read_text())
    changed = sorted(k for k in set(previous) | set(record) if previous.get(k) != record.get(k))
    if changed:
        raise UserError(f"{folder} holds samples made with another {', '.join(changed)} (see {path}); "
                        "delete the folder or pass another --sample-dir")  # fmt: skip


def png_problem(path: Path, size: int) -> str | None:
    """Why the PNG at ``path`` cannot be one of these samples (None when it can): a cheap check of its header, size
    and chunk checksums, without decoding the pixels."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as img:
            if img.format != "PNG" or img.mode != "RGB" or img.size != (size, size):
                return f"{img.format} {img.mode} {img.size[0]}x{img.size[1]}, expected PNG RGB {size}x{size}"
            img.verify()  # reads every chunk to IEND, checking CRCs: catches truncation and flipped bytes
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises SyntaxError for a broken PNG structure
        return f"{type(e).__name__}: {e}"
    return None


def read_png(path: Path, size: int) -> np.ndarray:
    """The pixels of one sample PNG, uint8 [size, size, 3]; a file that cannot be read is named."""
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB") if img.mode != "RGB" else img)
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: unreadable sample PNG ({type(e).__name__}: {e}); delete it and run again") from None
    if arr.shape != (size, size, 3):
        raise UserError(
            f"{path}: sample of shape {list(arr.shape)}, expected [{size}, {size}, 3]; delete it and run again"
        )
    return arr


def total_over_processes(n: int, device: torch.device) -> int:
    if not torch.distributed.is_initialized():
        return n
    t = torch.tensor([n], device=device)
    torch.distributed.all_reduce(t)
    return int(t.item())


@torch.no_grad()
def main(args: argparse.Namespace) -> Path:
    if args.num_fid_samples <= 0 or args.per_proc_batch_size <= 0:
        raise ValueError("--num-fid-samples and --per-proc-batch-size must be positive")
    info = setup_distributed(args.device)
    device, (precision, tf32) = info.device, apply_precision(args, info.device)
    model, codec, latent = load_model_and_codec(args, device)
    folder = Path(args.sample_dir) / folder_name(args)
    folder.mkdir(parents=True, exist_ok=True)
    record = run_record(args, precision, tf32)
    check_same_run(folder, record)  # every rank checks before rank 0 may write the record
    barrier()
    if info.is_main:
        write_json_atomic(folder / "run.json", record)
        for stale in folder.glob(".*.png.tmp"):  # left by a process killed mid-write
            stale.unlink(missing_ok=True)
    barrier()
    done = {int(n[:-4]) for n in os.listdir(folder) if n.endswith(".png") and n[:-4].isdigit()}
    mine = range(info.rank, args.num_fid_samples, info.world_size)
    # each process checks the PNGs it would make: a truncated or corrupt one is made again, never packed
    problems = {i: png_problem(folder / f"{i:06d}.png", args.image_size) for i in mine if i in done}
    broken = [i for i, problem in problems.items() if problem is not None]
    first_problem = problems[broken[0]] if broken else None
    todo = [i for i in mine if problems.get(i) is not None or i not in problems]
    n_broken = total_over_processes(len(broken), device)
    if info.is_main:
        print(f"{len(done) - n_broken} of {args.num_fid_samples} samples exist in {folder}; {info.world_size} "
              "process(es)")  # fmt: skip
        if n_broken:
            example = f" (e.g. {broken[0]:06d}.png: {first_problem})" if broken else ""
            print(f"note: {n_broken} existing PNG(s) in {folder} are truncated, corrupt or of another size"
                  f"{example}; making them again")  # fmt: skip
    shape = (codec.channels, latent, latent)
    for start in progress_bar(range(0, len(todo), args.per_proc_batch_size), disable=not info.is_main, desc="batches"):
        ids = todo[start : start + args.per_proc_batch_size]
        z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(index_seed(args.global_seed, i)))
                         for i in ids]).to(device)  # fmt: skip
        y = torch.tensor([label_of(i, args) for i in ids], device=device)
        images = to_uint8(codec.decode(sample_latents(model, z, y, args, precision, progress=False)))
        for i, image in zip(ids, images):
            tmp = folder / f".{i:06d}.png.tmp"
            Image.fromarray(image).save(tmp, format="PNG")
            os.replace(tmp, folder / f"{i:06d}.png")  # a crash never leaves half an image
    barrier()
    out = folder.parent / f"{folder.name}.npz"  # not with_suffix: the name holds dots (cfg-1.5)
    if info.is_main:
        arr = np.stack([read_png(folder / f"{i:06d}.png", args.image_size) for i in
                        progress_bar(range(args.num_fid_samples), desc="npz")])  # fmt: skip
        labels = np.array([label_of(i, args) for i in range(args.num_fid_samples)], dtype=np.int64)
        with atomic_path(out) as tmp:  # a full disk names the npz and leaves no half file
            np.savez(tmp, arr_0=arr, labels=labels, precision=np.array(precision), tf32=np.array(tf32))
        print(f"wrote {out} (arr_0 {arr.shape} uint8 in index order, labels; sampled in {precision}"
              f"{', TF32 matmuls' if tf32 else ''}) from the PNGs in {folder}")  # fmt: skip
    barrier()
    cleanup()
    return out


if __name__ == "__main__":
    run(lambda: main(parse_args()))
