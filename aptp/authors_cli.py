"""The authors' command lines, mapped onto ours: what ``scripts/aptp/*.py`` and ``scripts/metrics/*.py`` share.

Each of those scripts parses the authors' flags, builds the equivalent ``python -m aptp.<stage> ...`` argument list,
prints it once (so people learn our command), says which of their flags have no effect, and runs our stage in the
same process (under ``accelerate launch`` too).

Their pipeline scripts share one parser (pdm/utils/arg_utils.py): ``authors_parser`` accepts all of its flags in each
of ours, each script uses the ones its stage needs and names the rest in one note. Their folders are found here:
``resolve_pruning_dir`` (``--pruning_ckpt_dir``: their ``<run>/checkpoint-5000`` or ours) and
``resolve_finetuning_dir`` (``--finetuning_ckpt_dir``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from diffcompress.cli import ArgumentParser, non_negative_int
from diffcompress.errors import UserError

from .config import read_yaml as read_yaml_file

CHECKPOINT = re.compile(r"checkpoint-\d+")


def is_main_process() -> bool:
    """Rank 0 of a launch (or no launch): the process that prints the notes and the equivalent command."""
    return int(os.environ.get("RANK", "0")) == 0


def launcher() -> str:
    """``accelerate launch`` when this process was started by a launcher, else ``python``."""
    launched = "LOCAL_RANK" in os.environ or any(k.startswith("ACCELERATE_") for k in os.environ)
    return "accelerate launch" if launched else "python"


def equivalent_command(module: str, argv: Sequence[str], launcher: str = "python") -> str:
    """``python -m aptp.<module> <argv>`` quoted for a shell (``launcher``: e.g. ``accelerate launch``)."""
    return " ".join([launcher, "-m", module, *(shlex.quote(str(a)) for a in argv)])


def note_ignored(flags: Iterable[str], why: str = "they have no effect in the authors' code either") -> None:
    """One line naming the authors' flags that were given but are not used."""
    flags = sorted(set(flags))
    if flags and is_main_process():
        print(f"note: ignored {', '.join(flags)} ({why})", file=sys.stderr)


def note(message: str) -> None:
    """One line on stderr, from the main process only."""
    if is_main_process():
        print(f"note: {message}", file=sys.stderr)


def run_stage(module: str, argv: Sequence[str], launcher: str = "python") -> None:
    """Print the equivalent command (once per launch), then run ``<module>.main(argv)`` here."""
    if is_main_process():
        print(f"equivalent: {equivalent_command(module, argv, launcher)}", flush=True)
    importlib.import_module(module).main([str(a) for a in argv])


# ---------------------------------------------------------------------------------------------------------------
# The pipeline scripts' flags (pdm/utils/arg_utils.py). Defaults are None here, so that "given" can be told apart:
# a flag not given leaves our config's value, which is the authors' default wherever it matters (seed 43, SD 2.1,
# all-mpnet-base-v2).

FLAGS = {  # flag -> (type, help)
    "base_config_path": (str, "their YAML config (required)"),
    "pretrained_model_name_or_path": (str, "SD folder or hub id (theirs: stabilityai/stable-diffusion-2-1)"),
    "prompt_encoder_model_name_or_path": (str, "sentence encoder (theirs: sentence-transformers/all-mpnet-base-v2)"),
    "pruning_ckpt_dir": (str, "the pruning run's checkpoint folder (filter_dataset, finetune)"),
    "finetuning_ckpt_dir": (str, "the fine-tuned expert's folder (generate_fid_images)"),
    "expert_id": (non_negative_int, "the expert (finetune, generate_fid_images)"),
    "seed": (non_negative_int, "random seed (theirs: 43)"),
    "revision": (str, "hub revision of the Stable Diffusion model"),
    "non_ema_revision": (str, "hub revision of the UNet (theirs: --revision)"),
    "wandb_run_name": (str, "the run folder's name (prune)"),
    "tracker_project_name": (str, "the tracker's project (theirs: text2image-dynamic-pruning)"),
    "pruning_type": (str, "multi-expert (used by none of these scripts)"),
    "local_rank": (non_negative_int, "set by the launcher"),
    "mixed_precision": (str, "no effect in theirs"),
    "cache_dir": (str, "no effect in theirs"),
    "clip_model_name_or_path": (str, "no effect in theirs"),
}  # fmt: skip
SWITCHES = {
    "enable_xformers_memory_efficient_attention": "xformers attention (here: PyTorch's)",
    "push_to_hub": "push to the hub (not done here)",
    "use_ema": "no effect in theirs",
}
IGNORED_WHY = (
    "without effect in the authors' code, or here: PyTorch's attention, no hub upload, the launcher sets the rank"
)


def authors_parser(description: str) -> argparse.ArgumentParser:
    """The authors' shared parser: every flag of arg_utils.py, in each script."""
    parser = ArgumentParser(description=description)
    for flag, (kind, text) in FLAGS.items():
        parser.add_argument(f"--{flag}", type=kind, default=None, help=text)
    for flag, text in SWITCHES.items():
        parser.add_argument(f"--{flag}", action="store_true", help=text)
    return parser


def given_flags(args: argparse.Namespace) -> set[str]:
    """The flags given on the command line (not at their None / False defaults)."""
    return {k for k, v in vars(args).items() if v is not None and v is not False}


def ignore_unused(args: argparse.Namespace, used: Iterable[str], why: dict[str, str] | None = None) -> None:
    """One note naming every given flag outside ``used``, with ``why``'s reason where it has one for the flag."""
    unused = sorted(given_flags(args) - set(used))
    if not unused or not is_main_process():
        return
    why = why or {}
    named = [f"--{f} ({why[f]})" if f in why else f"--{f}" for f in unused]
    generic = "; " + IGNORED_WHY if any(f not in why for f in unused) else ""
    print(f"note: ignored {', '.join(named)}{generic}", file=sys.stderr)


def need(args: argparse.Namespace, *flags: str) -> None:
    """The flags this script requires (their parser has one requirement for all scripts: ours differ)."""
    for flag in flags:
        if getattr(args, flag) is None:
            raise UserError(f"--{flag} is required")


def unet_revision(args: argparse.Namespace) -> str | None:
    """--revision; their --non_ema_revision (the UNet's) may only repeat it: we load one revision for all parts."""
    if args.non_ema_revision is not None and args.non_ema_revision != args.revision:
        raise UserError(
            f"--non_ema_revision {args.non_ema_revision}: a UNet revision other than --revision "
            f"({args.revision}) is not supported here"
        )
    return args.revision


def override(key: str, value: Any) -> str:
    """``key=value`` for our stages' overrides (read as YAML): a string YAML would read otherwise is quoted."""
    if isinstance(value, str):
        try:
            same = yaml.safe_load(value) == value
        except yaml.YAMLError:
            same = False
        if not same:
            return f"{key}={json.dumps(value)}"
    return f"{key}={value}"


def read_yaml(path: str, flag: str = "--base_config_path") -> dict[str, Any]:
    """A YAML mapping, or one line naming the flag."""
    return read_yaml_file(path, f"{flag} {path}")


def lookup(data: dict[str, Any], key: str) -> Any:
    """``data["a"]["b"]`` for ``"a.b"``; None where missing."""
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def authors_run_dir(config_path: str, logging_dir: str, run_name: str, cwd: Path | None = None) -> Path:
    """Their pruning run folder (pdm/utils/logging_utils.py): ``<logging_dir>/<cwd's parent name>/<config folder
    name>/<config stem>/<run name>``."""
    cwd = Path.cwd() if cwd is None else cwd
    config = Path(config_path)
    return Path(logging_dir) / cwd.resolve().parent.name / config.resolve().parent.name / config.stem / run_name


# ---------------------------------------------------------------------------------------------------------------
# Their folders -> ours


def is_our_pruning_run(path: Path) -> bool:
    """A finished ``aptp.prune`` run: its results lie in the run folder itself."""
    return (path / "router.json").is_file() and (path / "router.pt").is_file()


def is_authors_pruning_checkpoint(path: Path) -> bool:
    """Their ``checkpoint-N`` of a pruning run (or a released variant): ``hypernet/`` and ``quantizer/``."""
    return (path / "hypernet").is_dir() and (path / "quantizer").is_dir()


def resolve_pruning_dir(value: str, flag: str = "--pruning_ckpt_dir") -> Path:
    """The pruning folder our stages take, for their ``--pruning_ckpt_dir``: our run folder as is; their
    ``checkpoint-N`` (existing or not) of one of our runs -> the run folder (aptp.prune writes the run's results
    there, checkpoints under ``checkpoints/``); their own checkpoint format as is."""
    path = Path(value)
    if is_our_pruning_run(path) or is_authors_pruning_checkpoint(path):
        return path
    if CHECKPOINT.fullmatch(path.name):
        runs = [path.parent] + ([path.parent.parent] if path.parent.name == "checkpoints" else [])
        for run in runs:
            if is_our_pruning_run(run):
                note(f"{flag} {value}: aptp.prune keeps the run's results in the run folder itself; using {run}")
                return run
        for run in runs:
            if (run / "config.yaml").is_file() and (run / "checkpoints").is_dir():
                raise UserError(f"{flag} {value}: the pruning run {run} has not finished (no router.json)")
    raise UserError(
        f"{flag} {value}: neither a finished aptp.prune run (router.pt, router.json), its checkpoint-N, "
        f"nor the authors' pruning checkpoint (hypernet/, quantizer/)"
    )


def resolve_finetuning_dir(value: str, expert_id: int, flag: str = "--finetuning_ckpt_dir") -> tuple[Path, Path]:
    """(pruning folder, expert folder) for their ``--finetuning_ckpt_dir``: our fine-tuning run
    (``<pruning_dir>/finetuning/expert_<K>``: ``config.yaml`` names the pruning run, ``expert/`` the weights) or a
    checkpoint folder under it (its run's expert is used); their fine-tuned expert (``unet/``, ``arch_vector.pt``)
    with the pruning checkpoint two folders up (where their script looks for it)."""
    path = Path(value)
    if (path / "arch_vector.pt").is_file() and (path / "unet").is_dir():
        pruning = path.parent.parent
        if not is_authors_pruning_checkpoint(pruning):
            raise UserError(f"{flag} {value}: the authors' expert, but {pruning} holds no hypernet/ and quantizer/")
        return pruning, path
    for run in [path, path.parent, path.parent.parent][: 3 if CHECKPOINT.fullmatch(path.name) else 1]:
        config = run / "config.yaml"
        pruning = lookup(read_yaml(str(config), flag), "pruning_dir") if config.is_file() else None
        if not pruning:
            continue
        named = re.fullmatch(r"expert_(\d+)", run.name)
        if named and int(named.group(1)) != expert_id:
            raise UserError(
                f"{flag} {value}: the fine-tuning run of expert {named.group(1)}, not --expert_id {expert_id}"
            )
        if not (run / "expert").is_dir():
            raise UserError(f"{flag} {value}: the fine-tuning run {run} has not finished (no expert/)")
        if not Path(pruning).is_dir() and run.parent.name == "finetuning":  # recorded relative to another folder
            pruning = run.parent.parent
        if run != path:
            note(f"{flag} {value}: aptp.finetune's checkpoints hold training state; using its expert {run / 'expert'}")
        return Path(pruning), run / "expert"
    raise UserError(
        f"{flag} {value}: neither an aptp.finetune run (config.yaml with pruning_dir, expert/), a checkpoint under "
        f"one, nor the authors' fine-tuned expert (unet/, arch_vector.pt)"
    )
