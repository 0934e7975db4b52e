"""The authors' filtering command, run by our filtering stage (``aptp.filter_dataset``):

    python scripts/aptp/filter_dataset.py --pruning_ckpt_dir D --base_config_path configs/filtering/sd-2-1_cc3m.yaml

``D``: their ``<run>/checkpoint-5000`` of one of our pruning runs means that run (aptp.prune keeps the results in
the run folder); our run folder or the authors' pruning checkpoint (hypernet/, quantizer/) is taken as is. The
YAML's ``data.data_dir`` is the dataset read. The prompt encoder and model are those the pruning run recorded.
Prints the equivalent ``-m aptp.filter_dataset`` command.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `python scripts/aptp/...`

import yaml  # noqa: E402

from aptp.authors_cli import (  # noqa: E402
    authors_parser,
    ignore_unused,
    launcher,
    lookup,
    need,
    read_yaml,
    resolve_pruning_dir,
    run_stage,
)
from aptp.authors_config import DATASETS  # noqa: E402
from diffcompress.cli import run  # noqa: E402
from diffcompress.errors import UserError  # noqa: E402

USED = {"base_config_path", "pruning_ckpt_dir"}
RECORDED = "filtering uses the models the pruning run recorded"
WHY = {
    "pretrained_model_name_or_path": RECORDED,
    "prompt_encoder_model_name_or_path": RECORDED,
    "revision": RECORDED,
    "non_ema_revision": RECORDED,
    "seed": "routing draws no random numbers",
    "wandb_run_name": "filtering writes into the pruning folder",
    "tracker_project_name": "filtering logs nothing",
    "finetuning_ckpt_dir": "not a filtering flag",
    "expert_id": "not a filtering flag",
}


def dataset_name(data: dict) -> str | None:
    """The YAML's data.dataset_name, else the one its data_dir names (as their loader picks it)."""
    name, folder = lookup(data, "data.dataset_name"), lookup(data, "data.data_dir")
    if name is None and isinstance(folder, str):
        name = next((ours for theirs, ours in DATASETS.items() if theirs in folder), None)
    return name


def main(argv: list[str] | None = None) -> None:
    args = authors_parser("APTP filtering, the authors' command line (runs aptp.filter_dataset)").parse_args(argv)
    need(args, "pruning_ckpt_dir", "base_config_path")
    data = read_yaml(args.base_config_path)
    pruning_dir = resolve_pruning_dir(args.pruning_ckpt_dir)
    ours = pruning_dir / "config.yaml"
    pruned_on = (yaml.safe_load(ours.read_text()) or {}).get("data", {}) if ours.is_file() else {}
    name = dataset_name(data)
    if name and pruned_on.get("dataset_name") and name != pruned_on["dataset_name"]:
        raise UserError(
            f"--base_config_path {args.base_config_path}: dataset {name}, but the pruning run {pruning_dir} was "
            f"trained on {pruned_on['dataset_name']}"
        )
    argv_ours = ["--pruning_dir", str(pruning_dir)]
    if (folder := lookup(data, "data.data_dir")) is not None:
        argv_ours += ["--data_dir", str(folder)]
    ignore_unused(args, USED, WHY)
    run_stage("aptp.filter_dataset", argv_ours, launcher())


if __name__ == "__main__":
    run(main)
