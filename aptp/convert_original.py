"""Convert the authors' APTP artifacts into a pruning directory of ours, which every later stage reads.

    python -m aptp.convert_original checkpoints/cc3m/checkpoint-5000 results/aptp/authors-cc3m
    python -m aptp.convert_original models/diffusion_pruning/APTP-Base-CC3M results/aptp/base-cc3m
    python -m aptp.convert_original rezashkv/diffusion_pruning results/aptp/base-cc3m --variant APTP-Base-CC3M

SRC is a pruning checkpoint of theirs (``hypernet/``, ``quantizer/``, ...), a released variant folder (the same and
``arch<k>/checkpoint-N/``) or, with ``--variant``, the hub repo. DST gets ``router.pt``, ``router.json`` and
``experts.json`` (the experts' codes from their ``embedding_gs``, which the authors' routing rule also keeps), their
run's ``config.yaml`` and filtering files when SRC has them, and each expert of theirs as one of ours
(``finetuning/expert_<k>/expert``). Their routing needs no calibration; ours (``--routing calibrated``, the default
elsewhere) is computed over the training captions by ``python -m aptp.calibrate_routing --pruning_dir DST``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from diffcompress.checkpoint import save_checkpoint, write_json_atomic
from diffcompress.cli import ArgumentParser, run
from diffcompress.errors import UserError
from diffcompress.progress import progress_bar

from . import original
from .assignments import EXPERTS, ROUTER_INFO, ROUTER_WEIGHTS, load_router, read_experts, read_router_info
from .expert import save_expert
from .filter_dataset import load_unet_config
from .layout import ArchLayout
from .pipeline import expert_folder


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description="APTP: convert the authors' pruning checkpoint / released experts to ours")
    p.add_argument("src", help="their checkpoint-N/ or variant folder, or the hub repo id with --variant")
    p.add_argument("dst", help="the pruning directory to write (must not hold a router yet)")
    p.add_argument("--variant", help=f"hub variant folder, e.g. {original.VARIANTS[0]}")
    p.add_argument("--cache_dir", help="hub cache folder (default: the hub's)")
    p.add_argument("--pretrained_model_name_or_path", help="the Stable Diffusion it prunes (default: their run's)")
    p.add_argument("--prompt_encoder", help="sentence encoder (default: their run's, all-mpnet-base-v2)")
    p.add_argument("--no_experts", action="store_true", help="convert the router only")
    args = p.parse_args(argv)
    src, dst = Path(args.src), Path(args.dst)
    fetch = None
    if original.is_hub_variant(args.src, args.variant):
        src = original.fetch_router_files(args.src, args.variant, cache_dir=args.cache_dir)
        fetch = lambda k: original.fetch_expert_files(args.src, args.variant, k, cache_dir=args.cache_dir)  # noqa: E731
    elif args.variant:
        src = src / args.variant
    if not original.is_authors_pruning_dir(src):
        raise UserError(f"{src} is not an authors' pruning checkpoint or variant folder (no hypernet/ and quantizer/)")
    if (dst / ROUTER_INFO).exists():
        raise UserError(f"{dst / ROUTER_INFO} exists: choose a new DST")

    info = read_router_info(src)
    info["pretrained_model_name_or_path"] = args.pretrained_model_name_or_path or info["pretrained_model_name_or_path"]
    info["prompt_encoder"] = args.prompt_encoder or info["prompt_encoder"]
    config = original.unet_config(src) or load_unet_config(info["pretrained_model_name_or_path"])
    router = load_router(src, ArchLayout.from_config(config), routing="authors")
    described = read_experts(src, config)
    dst.mkdir(parents=True, exist_ok=True)
    save_checkpoint(router.state_dict(), dst / ROUTER_WEIGHTS)
    write_json_atomic(dst / EXPERTS, described)
    config_file, _ = original.run_config(src)
    if config_file is not None:
        shutil.copyfile(config_file, dst / "config.yaml")
    for name in sorted(p.name for p in src.glob("*_mapped_indices.pt")):
        shutil.copyfile(src / name, dst / name)  # their filtering's expert of every caption row

    converted = []
    if not args.no_experts:
        folders = original.expert_dirs(src)
        wanted = range(router.num_experts) if fetch is not None else sorted(folders)
        for k in progress_bar(wanted, desc="experts", unit="expert"):
            folder = fetch(k) if fetch is not None else folders[k]
            unet, code = original.load_authors_expert(folder)
            if code.tolist() != described["experts"][k]["code"]:
                raise UserError(f"{folder}: its arch_vector.pt is not expert {k}'s embedding_gs in {src}")
            save_expert(unet, code, expert_folder(dst / "finetuning", k))
            converted.append(k)
    write_json_atomic(dst / ROUTER_INFO, dict(info, authors=str(src)))  # last: a DST with router.json is complete
    print(
        f"converted {src} -> {dst}: router ({router.num_experts} experts), experts.json, "
        f"{len(converted)} fine-tuned expert(s) in {dst / 'finetuning'}"
        f"{', config.yaml' if config_file else ''}\n"
        f"their routing rule: routing='authors' (APTPPipeline, aptp.filter_dataset --routing authors); ours needs "
        f"`python -m aptp.calibrate_routing --pruning_dir {dst}`"
        f"{'' if config_file else ' with a config.yaml naming the training captions in ' + str(dst)}"
    )


if __name__ == "__main__":
    run(main)
