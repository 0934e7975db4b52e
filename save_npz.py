"""Pack a folder of sample PNGs into the npz the evaluator reads (the job of the authors' save_npz.py).

    python save_npz.py samples/DiT-D14-2-pretrained-size-256-vae-ema-cfg-1.5-seed-0 --num-fid-samples 50000

The images go in index order (``000000.png``, ``000001.png``, ...: the names sample_ddp.py writes), never in
directory order, as ``arr_0`` uint8 [N, H, W, 3]; the output is ``<folder>.npz`` beside the folder unless
``--output`` says otherwise. Every index 0..N-1 must be there and every image must have the same size; grey or
RGBA images are converted to RGB (and counted). ``--any-names`` packs a folder whose PNGs are not numbered, in
natural name order (``img2`` before ``img10``). The write is atomic: a crash leaves no half npz.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from diffcompress.cli import ArgumentParser, positive_int, run
from diffcompress.data import to_rgb8
from diffcompress.errors import UserError
from diffcompress.progress import progress_bar

INDEXED = re.compile(r"^(\d+)\.png$")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sample_dir", nargs="?", default=None, help="folder of PNGs named by index (000000.png, ...)")
    p.add_argument("--sample-dir", dest="sample_dir_flag", default=None, help="same as the positional folder")
    p.add_argument("--num-fid-samples", "--num", type=positive_int, default=None,
                   help="pack indices 0..N-1 (default: every indexed PNG in the folder)")  # fmt: skip
    p.add_argument("--output", default=None, help="npz path (default: <folder>.npz beside the folder)")
    p.add_argument("--any-names", action="store_true", help="pack every *.png in natural name order")
    args = p.parse_args(argv)
    if args.sample_dir and args.sample_dir_flag and args.sample_dir != args.sample_dir_flag:
        p.error("give the sample folder once (positional or --sample-dir)")
    args.sample_dir = args.sample_dir or args.sample_dir_flag
    if not args.sample_dir:
        p.error("the sample folder is required (positional or --sample-dir)")
    return args


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def list_images(folder: Path, num: int | None = None, any_names: bool = False) -> list[Path]:
    """The PNGs to pack, in index order; one-line errors for a missing folder, gaps or stray names."""
    if not folder.is_dir():
        raise UserError(f"sample folder {str(folder)!r} does not exist (or is not a folder)")
    names = [n for n in os.listdir(folder) if n.lower().endswith(".png") and not n.startswith(".")]
    if any_names:
        files = sorted(names, key=_natural_key)
        if num is not None:
            if num > len(files):
                raise UserError(f"--num-fid-samples {num}: {folder} holds only {len(files)} PNGs")
            files = files[:num]
        if not files:
            raise UserError(f"sample folder {str(folder)!r} holds no PNG")
        return [folder / n for n in files]
    indexed = {int(m.group(1)): n for n in names if (m := INDEXED.match(n))}
    if not indexed:
        hint = f" ({len(names)} PNGs with other names: pass --any-names)" if names else ""
        raise UserError(f"sample folder {str(folder)!r} holds no PNG named by index (000000.png, ...){hint}")
    count = num if num is not None else max(indexed) + 1
    if count <= 0:
        raise UserError(f"--num-fid-samples {num}: must be at least 1")
    missing = [i for i in range(count) if i not in indexed]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise UserError(
            f"sample folder {str(folder)!r} lacks {len(missing)} of indices 0..{count - 1}: "
            f"{', '.join(f'{i:06d}.png' for i in missing[:5])}{more} (finish sampling or pass --num-fid-samples)"
        )
    return [folder / indexed[i] for i in range(count)]


def pack(files: list[Path], output: Path) -> tuple[np.ndarray, int]:
    """Stack ``files`` into arr_0 uint8 [N, H, W, 3] and write ``output`` atomically; returns (array, converted)."""
    arr, converted = None, 0
    for i, file in enumerate(progress_bar(files, desc="npz")):
        try:
            with Image.open(file) as img:
                if img.mode != "RGB":
                    img, converted = to_rgb8(img, file), converted + 1
                image = np.asarray(img, dtype=np.uint8)
        except OSError as e:
            raise UserError(f"{file} is not a readable PNG ({e})") from None
        if arr is None:
            arr = np.empty((len(files), *image.shape), dtype=np.uint8)  # one buffer: 50K 256^2 images are 9.8 GB
        elif image.shape != arr.shape[1:]:
            size, first = f"{image.shape[1]}x{image.shape[0]}", f"{arr.shape[2]}x{arr.shape[1]}"
            raise UserError(f"{file} is {size}, the first image {first}: all samples must have one size")
        arr[i] = image
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp.npz")
    try:
        np.savez(tmp, arr_0=arr)
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return arr, converted


def main(args: argparse.Namespace) -> Path:
    folder = Path(args.sample_dir)
    files = list_images(folder, args.num_fid_samples, args.any_names)
    output = Path(args.output) if args.output else folder.parent / f"{folder.name}.npz"  # names may hold dots
    arr, converted = pack(files, output)
    note = f"; {converted} non-RGB image(s) converted to RGB" if converted else ""
    order = "natural name order" if args.any_names else "index order"
    print(f"wrote {output} (arr_0 {tuple(arr.shape)} uint8 in {order}) from {len(files)} PNGs in {folder}{note}")
    return output


if __name__ == "__main__":
    run(lambda: main(parse_args()))
