"""The authors' pruning command, run by our pruning stage (``aptp.prune``):

    accelerate launch scripts/aptp/prune.py --base_config_path configs/pruning/sd-2-1_cc3m.yaml --wandb_run_name R

Their YAML is read by our config loader (``aptp.authors_config``); the run goes into their run folder,
``<training.logging.logging_dir>/<cwd's parent name>/<config folder name>/<config stem>/<R>/``, where aptp.prune
writes its results (router.pt, router.json, experts.json, config.yaml; checkpoints under checkpoints/). Flags map
onto our config keys; those without effect are named in one note. Prints the equivalent ``-m aptp.prune`` command.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `python scripts/aptp/...`

from aptp.authors_cli import (  # noqa: E402
    authors_parser,
    authors_run_dir,
    ignore_unused,
    launcher,
    lookup,
    need,
    override,
    read_yaml,
    run_stage,
    unet_revision,
)
from aptp.authors_config import is_authors_schema  # noqa: E402
from aptp.config import PruneConfig  # noqa: E402
from diffcompress.cli import run  # noqa: E402

# their flag -> our config key
KEYS = {
    "pretrained_model_name_or_path": "pretrained_model_name_or_path",
    "prompt_encoder_model_name_or_path": "model.prompt_encoder",
    "seed": "seed",
    "tracker_project_name": "logging.tracker_project_name",
}
USED = {*KEYS, "base_config_path", "wandb_run_name", "revision", "non_ema_revision"}
WHY = {
    "pruning_ckpt_dir": "not a pruning flag",
    "finetuning_ckpt_dir": "not a pruning flag",
    "expert_id": "not a pruning flag",
}


def main(argv: list[str] | None = None) -> None:
    args = authors_parser("APTP pruning, the authors' command line (runs aptp.prune)").parse_args(argv)
    need(args, "base_config_path", "wandb_run_name")
    data = read_yaml(args.base_config_path)
    # their run folder's prefix; a config of ours gives its output_dir
    prefix = lookup(data, "training.logging.logging_dir") if is_authors_schema(data) else data.get("output_dir")
    out = authors_run_dir(args.base_config_path, prefix or PruneConfig.output_dir, args.wandb_run_name)
    overrides = [override(KEYS[flag], getattr(args, flag)) for flag in KEYS if getattr(args, flag) is not None]
    if (revision := unet_revision(args)) is not None:
        overrides.append(override("revision", revision))
    ignore_unused(args, USED, WHY)
    run_stage(
        "aptp.prune", ["--config", args.base_config_path, override("output_dir", str(out)), *overrides], launcher()
    )


if __name__ == "__main__":
    run(main)
