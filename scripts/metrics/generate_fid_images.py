"""The authors' FID image generation, run by our generation stage (``aptp.generate``, one expert's captions):

    python scripts/metrics/generate_fid_images.py --finetuning_ckpt_dir C --expert_id K \
        --base_config_path configs/img_generation/sd-2-1_cc3m.yaml

``C``: our fine-tuning run (``<pruning run>/finetuning/expert_<K>``, whose config.yaml names the pruning run) or a
checkpoint folder under it (the run's expert is used), or the authors' fine-tuned expert (``unet/``,
``arch_vector.pt``) with their pruning checkpoint two folders up. The validation captions filtering routed to K are
drawn as theirs are (PNDM, guidance 7.5, their YAML's ``training.num_inference_steps`` and
``data.dataloader.image_generation_batch_size``, cv2-style resize to 256) into the folder theirs writes:
``<pruning run>/<dataset>_fid_images/``, every expert's images in one folder (PNGs named after the reference
images), for the FID of all experts together. Their script fails as shipped (it imports the missing
``pdm.models.diffusion`` and misnames the validation mapping file); this one runs. Prints the equivalent
``-m aptp.generate`` command.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `python scripts/metrics/...`

from aptp.authors_cli import (  # noqa: E402
    authors_parser,
    ignore_unused,
    launcher,
    lookup,
    need,
    read_yaml,
    resolve_finetuning_dir,
    run_stage,
    unet_revision,
)
from aptp.authors_config import DATASETS  # noqa: E402
from diffcompress.cli import run  # noqa: E402

# their flag -> our flag
FLAGS = {
    "pretrained_model_name_or_path": "--pretrained_model_name_or_path",
    "prompt_encoder_model_name_or_path": "--prompt_encoder",
    "seed": "--seed",
}
# their YAML key -> our flag
YAML_FLAGS = {
    "training.num_inference_steps": "--num_inference_steps",
    "data.dataloader.image_generation_batch_size": "--batch_size",
    "data.data_dir": "--data_dir",
}
USED = {*FLAGS, "base_config_path", "finetuning_ckpt_dir", "expert_id", "revision", "non_ema_revision"}
WHY = {
    "wandb_run_name": "images go into <pruning run>/<dataset>_fid_images",
    "tracker_project_name": "generation logs nothing",
    "pruning_ckpt_dir": "the pruning run is the one the fine-tuning run names",
}


def filtered_dataset(pruning_dir: Path) -> str | None:
    """The dataset filtering routed (its validation summary), if it says."""
    summary = pruning_dir / "filtered" / "validation.json"
    return json.loads(summary.read_text()).get("dataset") if summary.is_file() else None


def main(argv: list[str] | None = None) -> None:
    args = authors_parser("APTP FID images, the authors' command line (runs aptp.generate)").parse_args(argv)
    need(args, "finetuning_ckpt_dir", "expert_id", "base_config_path")
    data = read_yaml(args.base_config_path)
    pruning_dir, expert = resolve_finetuning_dir(args.finetuning_ckpt_dir, args.expert_id)
    ours = ["--pruning_dir", str(pruning_dir), "--expert_id", args.expert_id, "--expert_path", str(expert)]
    ours += ["--split", "validation", "--reference_preprocess", "authors"]
    for key, flag in YAML_FLAGS.items():
        if (value := lookup(data, key)) is not None:
            ours += [flag, value]
    name, folder = lookup(data, "data.dataset_name"), lookup(data, "data.data_dir")
    if name is None and isinstance(folder, str):
        name = next((o for theirs, o in DATASETS.items() if theirs in folder), None)
    if name is not None and folder is not None:  # without a folder: the dataset filtering read
        ours += ["--dataset_name", name]
    name = name or filtered_dataset(pruning_dir)
    if name is not None:  # where theirs writes (<finetuning_ckpt_dir>/../../): every expert's images in one folder
        ours += ["--output_dir", str(pruning_dir / f"{name}_fid_images")]
    for flag, target in FLAGS.items():
        if getattr(args, flag) is not None:
            ours += [target, getattr(args, flag)]
    if (revision := unet_revision(args)) is not None:
        ours += ["--revision", revision]
    ignore_unused(args, USED, WHY)
    run_stage("aptp.generate", ours, launcher())


if __name__ == "__main__":
    run(main)
