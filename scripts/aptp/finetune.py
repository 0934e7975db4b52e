"""The authors' fine-tuning command, run by our fine-tuning stage (``aptp.finetune``):

    accelerate launch scripts/aptp/finetune.py --pruning_ckpt_dir D --expert_id K \
        --base_config_path configs/finetuning/sd-2-1_cc3m.yaml

(their README calls it ``finteune.py``: that file runs this one). ``D`` as in ``scripts/aptp/filter_dataset.py``;
the expert is trained into ``<pruning run>/finetuning/expert_<K>/`` (``expert/`` at the end), which
``scripts/metrics/generate_fid_images.py --finetuning_ckpt_dir`` takes. Prints the equivalent ``-m aptp.finetune``
command.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `python scripts/aptp/...`

from aptp.authors_cli import (  # noqa: E402
    authors_parser,
    ignore_unused,
    launcher,
    need,
    override,
    read_yaml,
    resolve_pruning_dir,
    run_stage,
    unet_revision,
)
from diffcompress.cli import run  # noqa: E402

# their flag -> our config key
KEYS = {
    "pretrained_model_name_or_path": "pretrained_model_name_or_path",
    "seed": "seed",
    "tracker_project_name": "logging.tracker_project_name",
}
USED = {*KEYS, "base_config_path", "pruning_ckpt_dir", "expert_id", "revision", "non_ema_revision"}
WHY = {
    "prompt_encoder_model_name_or_path": "fine-tuning reads the filtered captions",
    "wandb_run_name": "the expert is trained into <pruning run>/finetuning/expert_<K>",
    "finetuning_ckpt_dir": "not a fine-tuning flag",
}


def main(argv: list[str] | None = None) -> None:
    args = authors_parser("APTP fine-tuning, the authors' command line (runs aptp.finetune)").parse_args(argv)
    need(args, "pruning_ckpt_dir", "expert_id", "base_config_path")
    read_yaml(args.base_config_path)  # a missing file fails here, naming the flag
    pruning_dir = resolve_pruning_dir(args.pruning_ckpt_dir)
    overrides = [override(KEYS[flag], getattr(args, flag)) for flag in KEYS if getattr(args, flag) is not None]
    if (revision := unet_revision(args)) is not None:
        overrides.append(override("revision", revision))
    ignore_unused(args, USED, WHY)
    argv_ours = [
        "--config",
        args.base_config_path,
        "--expert_id",
        args.expert_id,
        override("pruning_dir", str(pruning_dir)),
    ]
    run_stage("aptp.finetune", [*argv_ours, *overrides], launcher())


if __name__ == "__main__":
    run(main)
