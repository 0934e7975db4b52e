"""The authors' four README commands (scripts/aptp/{prune,filter_dataset,finteune}.py,
scripts/metrics/generate_fid_images.py) run as written on the tiny world, with tiny configs in their schema: each
prints its equivalent ``-m aptp.*`` command once and runs our stage; their flags map onto ours; their folders
(``<run>/checkpoint-N``, the fine-tuning run or a checkpoint of it) are found; bad folders fail in one line."""

import json
import shlex
import subprocess
import sys

import pytest
import yaml

import aptp.filter_dataset
import aptp.finetune
import aptp.generate
import aptp.prune
from aptp.make_tiny import build_world
from tests.aptp_helpers import reset_accelerate
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

AUTHORS = ROOT / "configs/aptp/authors"
RUN = "tiny-run"  # --wandb_run_name


def authors_config(name: str, changes: dict) -> dict:
    """Their config ``name`` (our copy of its keys) with ``changes`` ({"a.b": value}) applied: tiny values."""
    data = yaml.safe_load((AUTHORS / name).read_text())
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return data


def tiny_configs(root, world) -> dict:
    """The authors' four configs at tiny values, as their repository lays them out: configs/<stage>/sd-2-1_tiny.yaml."""
    common = {
        "model.unet.resolution": 32, "data.data_dir": str(world["cc3m"]), "data.dataloader.train_batch_size": 4,
        "training.logging.report_to": "none", "training.optim.lr_warmup_steps": 1,
    }  # fmt: skip
    configs = {
        "pruning": authors_config("pruning/sd-2-1_cc3m.yaml", {
            **common, "pretrained_model_name_or_path": str(world["sd"]),  # their flags land in the config root
            "prompt_encoder_model_name_or_path": str(world["encoder"]),
            "model.quantizer.num_arch_vq_codebook_embeddings": 2, "training.max_train_steps": 2,
            "training.hypernet_pretraining_steps": 1, "training.logging.logging_dir": "results",
        }),
        "finetuning": authors_config("finetuning/sd-2-1_cc3m.yaml", {
            **common, "data.dataloader.train_batch_size": 2, "training.max_train_steps": 2,
            "training.optim.unet_learning_rate": 1e-4,
        }),
        "filtering": {"data": {"dataset_name": "cc3m", "data_dir": str(world["cc3m"]), "max_train_samples": None}},
        "img_generation": {
            "model": {"unet": {"unet_mid_block": "UNetMidBlock2DCrossAttnWidthGated"}},
            "data": {"dataset_name": "cc3m", "data_dir": str(world["cc3m"]),
                     "dataloader": {"image_generation_batch_size": 3}},
            "training": {"num_inference_steps": 2},
        },
    }  # fmt: skip
    for stage, data in configs.items():
        (root / "configs" / stage).mkdir(parents=True)
        (root / "configs" / stage / "sd-2-1_tiny.yaml").write_text(yaml.safe_dump(data))
    return {stage: f"configs/{stage}/sd-2-1_tiny.yaml" for stage in configs}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny world, and a checkout-like folder (<parent>/diffusion_pruning/configs/...) to run the commands in."""
    root = tmp_path_factory.mktemp("aptp-authors")
    world = build_world(root / "world", train_rows=12, val_rows=6, size=32)
    repo = root / "checkouts" / "diffusion_pruning"
    repo.mkdir(parents=True)
    return dict(world, repo=repo, configs=tiny_configs(repo, world))


@pytest.fixture()
def in_repo(world, monkeypatch):
    """Commands run from the checkout-like folder; accelerate's process-wide state reset after each stage."""
    monkeypatch.chdir(world["repo"])
    yield world["repo"]
    reset_accelerate()


def ran(result, module: str) -> list[str]:
    """The argv of the equivalent command the script printed (exactly once), after its exit 0."""
    assert result.code == 0, result.err
    lines = [line for line in result.out.splitlines() if line.startswith("equivalent: ")]
    assert len(lines) == 1, result.out
    words = shlex.split(lines[0])
    assert words[1:4] == ["python", "-m", module], lines[0]
    return words[4:]


@pytest.mark.slow  # a whole pipeline end to end
def test_the_four_readme_commands_chain(world, in_repo, script):
    configs, repo = world["configs"], in_repo
    # 1. pruning: the run goes into their run folder, <logging_dir>/<cwd's parent>/<config folder>/<stem>/<run>
    result = script("scripts/aptp/prune.py", "--base_config_path", configs["pruning"], "--wandb_run_name", RUN)
    run_dir = repo / "results" / "checkouts" / "pruning" / "sd-2-1_tiny" / RUN
    assert ran(result, "aptp.prune") == ["--config", configs["pruning"], f"output_dir={run_dir.relative_to(repo)}"]
    for name in ("router.pt", "router.json", "experts.json", "config.yaml"):
        assert (run_dir / name).is_file(), name
    assert len(json.loads((run_dir / "experts.json").read_text())["experts"]) == 2
    reset_accelerate()

    # 2. filtering, given their checkpoint folder (which aptp.prune does not write): the run folder is used
    ckpt = run_dir.relative_to(repo) / "checkpoint-2"
    result = script("scripts/aptp/filter_dataset.py", "--pruning_ckpt_dir", ckpt, "--base_config_path",
                    configs["filtering"])  # fmt: skip
    assert ran(result, "aptp.filter_dataset") == [
        "--pruning_dir", str(run_dir.relative_to(repo)), "--data_dir", str(world["cc3m"])
    ]  # fmt: skip
    assert "using " + str(run_dir.relative_to(repo)) in result.err
    train = json.loads((run_dir / "filtered/train.json").read_text())
    val = json.loads((run_dir / "filtered/validation.json").read_text())
    assert (train["rows"], val["rows"]) == (11, 6)  # a training caption without an image is no row
    both = [k for k in range(2) if train["rows_per_expert"][k] and val["rows_per_expert"][k]]
    assert both, (train, val)
    k = both[0]
    reset_accelerate()

    # 3. fine-tuning, by the README's name of the script
    result = script("scripts/aptp/finteune.py", "--pruning_ckpt_dir", ckpt, "--expert_id", k, "--base_config_path",
                    configs["finetuning"])  # fmt: skip
    assert ran(result, "aptp.finetune") == [
        "--config", configs["finetuning"], "--expert_id", str(k), f"pruning_dir={run_dir.relative_to(repo)}"
    ]  # fmt: skip
    expert_run = run_dir / "finetuning" / f"expert_{k}"
    assert (expert_run / "expert").is_dir() and (expert_run / "config.yaml").is_file()
    reset_accelerate()

    # 4. FID images of expert k's validation captions, from its fine-tuning folder
    finetuned = expert_run.relative_to(repo)
    result = script("scripts/metrics/generate_fid_images.py", "--finetuning_ckpt_dir", finetuned, "--expert_id", k,
                    "--base_config_path", configs["img_generation"])  # fmt: skip
    assert ran(result, "aptp.generate") == [
        "--pruning_dir", str(run_dir.relative_to(repo)), "--expert_id", str(k), "--expert_path",
        str(finetuned / "expert"), "--split", "validation", "--reference_preprocess", "authors",
        "--num_inference_steps", "2", "--batch_size", "3", "--data_dir", str(world["cc3m"]), "--dataset_name", "cc3m",
        "--output_dir", str(run_dir.relative_to(repo) / "cc3m_fid_images"),  # where theirs writes
    ]  # fmt: skip
    images = sorted((run_dir / "cc3m_fid_images").glob("*.png"))
    assert len(images) == val["rows_per_expert"][k]

    # ... and from a checkpoint folder under it: the run's expert, with a note; every image is there already
    checkpoint = sorted((expert_run / "checkpoints").glob("checkpoint-*"))[-1]
    result = script("scripts/metrics/generate_fid_images.py", "--finetuning_ckpt_dir", checkpoint, "--expert_id", k,
                    "--base_config_path", configs["img_generation"])  # fmt: skip
    assert ran(result, "aptp.generate")[:6] == [
        "--pruning_dir", str(run_dir.relative_to(repo)), "--expert_id", str(k), "--expert_path",
        str(expert_run / "expert"),
    ]  # fmt: skip
    assert "checkpoints hold training state" in result.err and f"0 drawn now, {len(images)} were there" in result.out


def fake_stage(monkeypatch, module) -> list:
    """The stage's main records its argv instead of running."""
    calls = []
    monkeypatch.setattr(module, "main", calls.append)
    return calls


def test_flags_map_onto_ours_and_unused_ones_are_named(world, in_repo, script, monkeypatch):
    calls = fake_stage(monkeypatch, aptp.prune)
    result = script(
        "scripts/aptp/prune.py", "--base_config_path", world["configs"]["pruning"], "--wandb_run_name", "r 2",
        "--pretrained_model_name_or_path", "sd dir", "--prompt_encoder_model_name_or_path", "enc", "--seed", 7,
        "--revision", "fp16", "--non_ema_revision", "fp16", "--tracker_project_name", "null", "--use_ema",
        "--cache_dir", "c", "--mixed_precision", "fp16", "--enable_xformers_memory_efficient_attention",
        "--expert_id", 3,
    )  # fmt: skip
    out_dir = "results/checkouts/pruning/sd-2-1_tiny/r 2"
    expected = [
        "--config", world["configs"]["pruning"], f"output_dir={out_dir}", "pretrained_model_name_or_path=sd dir",
        "model.prompt_encoder=enc", "seed=7", 'logging.tracker_project_name="null"', "revision=fp16",
    ]  # fmt: skip
    assert ran(result, "aptp.prune") == expected
    assert calls == [expected]
    notes = [line for line in result.err.splitlines() if line.startswith("note: ignored ")]
    assert len(notes) == 1, result.err
    for flag in ("--cache_dir", "--enable_xformers_memory_efficient_attention", "--expert_id (not a pruning flag)",
                 "--mixed_precision", "--use_ema"):  # fmt: skip
        assert flag in notes[0]
    assert "--seed" not in notes[0] and "--revision" not in notes[0]

    result = script("scripts/aptp/prune.py", "--base_config_path", world["configs"]["pruning"],
                    "--wandb_run_name", "r", "--revision", "a", "--non_ema_revision", "b")  # fmt: skip
    assert result.code == 2 and result.last_line.startswith("error: --non_ema_revision b: ")
    result = script("scripts/aptp/prune.py", "--base_config_path", world["configs"]["pruning"])
    assert result.code == 2 and result.last_line == "error: --wandb_run_name is required"
    result = script("scripts/aptp/prune.py", "--base_config_path", "configs/pruning/none.yaml", "--wandb_run_name", "r")
    assert result.code == 2 and result.last_line == "error: --base_config_path configs/pruning/none.yaml does not exist"


@pytest.mark.parametrize("stage", ["filter_dataset", "finetune"])
def test_pruning_ckpt_dir_resolves_or_fails_in_one_line(world, in_repo, script, monkeypatch, stage, tmp_path):
    repo = tmp_path
    calls = fake_stage(monkeypatch, getattr(aptp, stage))
    path = f"scripts/aptp/{stage}.py"
    flags = ["--base_config_path", world["configs"]["filtering" if stage == "filter_dataset" else "finetuning"]]
    flags += ["--expert_id", "1"] if stage == "finetune" else []
    ours = repo / "ours"  # a finished run of ours (what makes one: router.pt and router.json)
    (ours / "checkpoints").mkdir(parents=True)
    for name in ("router.pt", "router.json"):
        (ours / name).write_text("")
    theirs = repo / "theirs" / "checkpoint-5000"  # the authors' pruning checkpoint
    for name in ("hypernet", "quantizer"):
        (theirs / name).mkdir(parents=True)
    for given, resolved in [(ours, ours), (ours / "checkpoint-9", ours), (ours / "checkpoints/checkpoint-9", ours),
                            (theirs, theirs)]:  # fmt: skip
        calls.clear()
        result = script(path, "--pruning_ckpt_dir", given, *flags)
        assert result.code == 0, result.err
        argv = calls[0]
        assert (argv[argv.index("--pruning_dir") + 1] if stage == "filter_dataset" else argv[4]) == (
            str(resolved) if stage == "filter_dataset" else f"pruning_dir={resolved}"
        )
        assert ("using " in result.err) == (given != resolved)
    for bad in (repo / "nowhere", repo / "theirs", repo / "nowhere" / "checkpoint-5000"):
        result = script(path, "--pruning_ckpt_dir", bad, *flags)
        assert result.code == 2 and result.last_line.startswith(f"error: --pruning_ckpt_dir {bad}: neither "), (
            result.err
        )
        assert len(result.err.strip().splitlines()) == 1
    unfinished = repo / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    (unfinished / "config.yaml").write_text("{}")
    result = script(path, "--pruning_ckpt_dir", unfinished / "checkpoints/checkpoint-3", *flags)
    assert result.code == 2 and result.last_line.endswith(
        f"the pruning run {unfinished} has not finished (no router.json)"
    )


def test_finetuning_ckpt_dir_of_another_expert_or_unknown_fails_in_one_line(
    world, in_repo, script, monkeypatch, tmp_path
):
    calls = fake_stage(monkeypatch, aptp.generate)
    run = tmp_path / "p" / "finetuning" / "expert_1"
    (run / "expert").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"pruning_dir": "p"}))
    flags = ["--base_config_path", world["configs"]["img_generation"]]
    result = script("scripts/metrics/generate_fid_images.py", "--finetuning_ckpt_dir", run, "--expert_id", 0, *flags)
    assert result.code == 2 and result.last_line.endswith("the fine-tuning run of expert 1, not --expert_id 0")
    # its config.yaml names the pruning run relative to where it ran: found as <pruning run>/finetuning/expert_1
    result = script("scripts/metrics/generate_fid_images.py", "--finetuning_ckpt_dir", run, "--expert_id", 1, *flags)
    assert result.code == 0 and calls[0][:2] == ["--pruning_dir", str(tmp_path / "p")]
    result = script("scripts/metrics/generate_fid_images.py", "--finetuning_ckpt_dir", run.parent, "--expert_id", 1,
                    *flags)  # fmt: skip
    assert result.code == 2 and result.last_line.startswith(f"error: --finetuning_ckpt_dir {run.parent}: neither ")


@pytest.mark.slow
def test_a_script_runs_as_a_file_from_elsewhere(tmp_path):
    """``python scripts/aptp/finteune.py`` from another folder finds the package; a bad folder is one line, exit 2."""
    config = tmp_path / "ft.yaml"
    config.write_text("training:\n  max_train_steps: 1\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/aptp/finteune.py"), "--pruning_ckpt_dir", "missing", "--expert_id", "0",
         "--base_config_path", str(config)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: --pruning_ckpt_dir missing: neither a finished aptp.prune run (router.pt, router.json), its "
        "checkpoint-N, nor the authors' pruning checkpoint (hypernet/, quantizer/)"
    ]


def test_authors_finetuned_expert_is_passed_with_their_pruning_checkpoint(
    world, in_repo, script, monkeypatch, tmp_path
):
    calls = fake_stage(monkeypatch, aptp.generate)
    pruning = (
        tmp_path / "APTP-Base-CC3M"
    )  # their layout: <variant>/{hypernet,quantizer}, <variant>/arch<k>/checkpoint-N
    expert = pruning / "arch1" / "checkpoint-30000"
    for folder in (pruning / "hypernet", pruning / "quantizer", expert / "unet"):
        folder.mkdir(parents=True)
    (expert / "arch_vector.pt").write_bytes(b"")
    flags = ["--expert_id", 1, "--base_config_path", world["configs"]["img_generation"]]
    result = script("scripts/metrics/generate_fid_images.py", "--finetuning_ckpt_dir", expert, *flags)
    assert ran(result, "aptp.generate")[:6] == ["--pruning_dir", str(pruning), "--expert_id", "1", "--expert_path",
                                                str(expert)]  # fmt: skip
    assert calls and calls[0][calls[0].index("--output_dir") + 1] == str(pruning / "cc3m_fid_images")
    (pruning / "quantizer").rmdir()
    result = script("scripts/metrics/generate_fid_images.py", "--finetuning_ckpt_dir", expert, *flags)
    assert result.code == 2 and result.last_line.endswith(f"{pruning} holds no hypernet/ and quantizer/")


def test_launches_print_once_and_name_the_launcher(world, in_repo, script, monkeypatch):
    fake_stage(monkeypatch, aptp.prune)
    flags = ["--base_config_path", world["configs"]["pruning"], "--wandb_run_name", "r", "--use_ema"]
    monkeypatch.setenv("LOCAL_RANK", "0")
    result = script("scripts/aptp/prune.py", *flags)
    assert result.out.startswith("equivalent: accelerate launch -m aptp.prune --config ") and "--use_ema" in result.err
    monkeypatch.setenv("RANK", "1")  # another process of the launch: silent
    result = script("scripts/aptp/prune.py", *flags)
    assert result.code == 0 and "equivalent" not in result.out and "note:" not in result.err
