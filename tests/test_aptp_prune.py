"""APTP's pruning stage on a tiny world (random SD of SD2.1's layout, sentence encoder, CC3M-layout captions with a
corrupt image and a row without one): configs, a real 2-process `accelerate launch` with resume, SIGTERM."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from diffusers import UNet2DConditionModel

from aptp import calibrate_routing, filter_dataset, prune
from aptp.config import PruneConfig, load_config
from aptp.expert import materialize
from aptp.layout import ArchLayout
from aptp.losses import LossWeights
from aptp.macs import count_macs, unet_inputs
from aptp.make_tiny import build_world
from aptp.router import Router
from diffcompress.errors import UserError
from tests.aptp_helpers import assert_same_tensors, stop_and_resume
from tests.conftest import ROOT
from tests.test_distributed import free_port

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = ROOT / "configs/aptp/pruning"
TERMS = ("ddpm", "distill", "block", "resource", "contrastive", "std", "max", "loss")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("aptp-tiny")
    tiny = build_world(root, train_rows=24, val_rows=2, size=40)
    encoder = tiny["encoder"]
    return [
        f"pretrained_model_name_or_path={root / 'sd'}", f"data.data_dir={root / 'cc3m'}",
        f"model.prompt_encoder={encoder}", "data.dataloader_num_workers=0",
    ]  # fmt: skip


@pytest.fixture()
def in_process():
    """prune.main in this process; accelerate's process-wide state is reset afterwards."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def state(out, step):
    return json.loads((out / "checkpoints" / f"checkpoint-{step}" / "state.json").read_text())


# ----------------------------------------------------------------------------------------------------
# Configs


def test_paper_configs_load_with_the_recipe():
    for name in ("cc3m", "coco"):
        cfg = load_config(CONFIGS / f"{name}.yaml")
        assert cfg.data.dataset_name == name and cfg.losses == LossWeights()
        t = cfg.training
        assert (t.resolution, t.train_batch_size, t.max_train_steps, t.pretrain_steps) == (256, 64, 5000, 500)
        assert (t.learning_rate, t.scale_lr, t.lr_warmup_steps, t.snr_gamma) == (2e-4, True, 100, 5.0)
        assert (cfg.model.budget, cfg.model.num_experts) == (0.6, 8)
        assert cfg.model.prompt_encoder.endswith("all-mpnet-base-v2")
        # the authors' maths: argmax of the plan, no clipping; codes at the Gumbel noise's mean (measured, README)
        assert (cfg.model.assignment, cfg.model.expert_threshold, t.max_grad_norm) == ("argmax", "mean", None)
    tiny = load_config(CONFIGS / "tiny.yaml")
    assert tiny.training.mixed_precision == "no" and tiny.data.dataloader_num_workers == 0


def test_config_errors_are_one_line(tmp_path):
    file = tmp_path / "bad.yaml"
    file.write_text("seed: 1\nbudget: 0.5\ntraining:\n  learning_rate: 3e-4\n  batch: 8\nlosses:\n  ddpm: 1\n  kd: 2\n")
    with pytest.raises(UserError, match=r"unknown keys budget, training\.batch, losses\.kd$") as e:
        load_config(file)
    assert "\n" not in str(e.value)
    file.write_text("training:\n  learning_rate: 3e-4\n")  # YAML reads 3e-4 as a string
    assert load_config(file).training.learning_rate == 3e-4
    cfg = load_config(file, ["model.num_experts=4", "losses.ddpm=0.5", "logging.resume_from_checkpoint=latest"])
    assert (cfg.model.num_experts, cfg.losses.ddpm, cfg.logging.resume_from_checkpoint) == (4, 0.5, "latest")
    cfg = load_config(file, ["training.max_grad_norm=1.0", "model.assignment=capacity"])  # ours, by option
    assert (cfg.training.max_grad_norm, cfg.model.assignment) == (1.0, "capacity")
    for override, message in [
        ("training.max_train_steps=ten", "training.max_train_steps must be int, got 'ten'"),
        ("model.budget=1.5", r"model.budget must be in \(0, 1\]"),
        ("training.mixed_precision=fp8", "mixed_precision must be no, fp16 or bf16"),
        ("data=3", "data must be a mapping"),
        ("model.experts.k=3", "unknown key model.experts"),
        ("model.assignment=greedy", "model.assignment must be one of argmax, capacity"),
        ("model.expert_threshold=max", "model.expert_threshold must be one of mean, median, none, sample"),
        ("training.max_grad_norm=0", "training.max_grad_norm must be positive or null"),
        ("nokey", "expected section.key=value"),
    ]:
        with pytest.raises(UserError, match=message):
            load_config(file, [override])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    assert isinstance(load_config(None), PruneConfig)


# ----------------------------------------------------------------------------------------------------
# The pruning stage


def launch(world, *overrides):
    """``accelerate launch`` with 2 processes (gloo on CPU) of ``python -m aptp.prune`` on the tiny config."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(free_port()), "-m", "aptp.prune", "--config", str(CONFIGS / "tiny.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(cmd + world + list(overrides), env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def launched(world, tmp_path_factory):
    """4 steps (2 pre-training the predictor, 2 routed) of 2 accumulated batches of 2 processes, from scratch;
    its log, output folder and embedding cache."""
    root = tmp_path_factory.mktemp("launched")
    out, cache = root / "run", root / "cache"
    overrides = [f"output_dir={out}", f"data.embedding_cache_dir={cache}", "training.max_train_steps=4"]
    overrides += ["training.pretrain_steps=2", "training.gradient_accumulation_steps=2"]
    overrides += ["logging.logging_steps=1", "logging.checkpointing_steps=2"]
    return launch(world, *overrides), out, cache


@pytest.mark.slow
def test_two_processes(world, launched):
    log, out, cache = launched
    assert "2 process(es) x 4 x 2 accumulation = global batch 16, lr 0.2" in log  # tiny.yaml's 0.05 x sqrt(16)
    assert "23 captions with images (1 without an image skipped)" in log
    assert "prompt embeddings of 23 captions computed over 2 process(es)" in log
    assert len(list(cache.iterdir())) == 1  # the processes' parts joined into one file
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["phase"] for r in records] == ["pretrain", "pretrain", "routed", "routed"]
    assert all(math.isfinite(r[k]) for r in records for k in TERMS)
    assert records[-1]["unreadable"] <= 1  # one corrupt image, however many processes met it
    saved = state(out, 4)
    assert (saved["step"], saved["world_size"], saved["budget"]) == (4, 2, 0.6) and 0 < saved["target"] < 0.6
    assert f"budget p=0.6 -> prunable target p'={saved['target']:.4f}" in log
    assert {"router.pt", "state.json", "random_states_0.pkl", "random_states_1.pkl"} <= {
        p.name for p in (out / "checkpoints/checkpoint-4").iterdir()
    }

    # Pre-training moves only the predictor: the codebook keeps its orthogonal init until the routed steps.
    pretrained, routed = (torch.load(out / f"checkpoints/checkpoint-{s}/router.pt", weights_only=True) for s in (2, 4))
    c = pretrained["codebook"]
    torch.testing.assert_close(c @ c.t(), torch.eye(4), atol=1e-5, rtol=0)
    assert not torch.equal(routed["codebook"], c)
    assert not torch.equal(routed["predictor.weight"], pretrained["predictor.weight"])  # the contrastive loss

    # The expert codes: binary, each expert's MACs (counted by hooks on the sliced UNet) and parameters as written.
    experts = json.loads((out / "experts.json").read_text())
    info = json.loads((out / "router.json").read_text())
    unet = UNet2DConditionModel.from_pretrained(world[0].split("=", 1)[1], subfolder="unet")
    layout = ArchLayout.from_config(unet.config)
    router = Router(layout, info["prompt_dim"], info["num_experts"])
    router.load_state_dict(torch.load(out / "router.pt", weights_only=True))
    inputs = unet_inputs(unet, 32 // 2)  # the tiny VAE halves the resolution
    assert experts["dense"]["macs"] == sum(count_macs(unet, **inputs).values())
    assert len(experts["experts"]) == 4
    for k, e in enumerate(experts["experts"]):
        code = torch.tensor(e["code"])
        assert torch.equal(code, router.expert_mask(k).int()) and len(code) == layout.size
        expert = materialize(unet, code, layout)
        assert e["macs"] == sum(count_macs(expert, **inputs).values()) <= experts["dense"]["macs"]
        assert e["params"] == sum(p.numel() for p in expert.parameters()) <= experts["dense"]["params"]


@pytest.mark.slow
def test_resume_keeps_budget_and_sigterm_checkpoints(world, launched, tmp_path, in_process, capsys):
    out = tmp_path / "run"
    shutil.copytree(launched[1], out)
    (out / "experts.json").unlink()
    args = ["--config", str(CONFIGS / "tiny.yaml"), *world, f"output_dir={out}"]
    args += [f"data.embedding_cache_dir={launched[2]}", "logging.logging_steps=1", "logging.checkpointing_steps=1000"]
    # at 48 px the MAC table gives p' = 0.557 instead of 0.550: the stored budgets must win
    args += ["logging.resume_from_checkpoint=latest", "training.resolution=48"]
    target = state(out, 4)["target"]

    def terminate_after_a_step():
        while len((out / "metrics.jsonl").read_text().splitlines()) < 5:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_after_a_step, daemon=True).start()
    prune.main([*args, "training.max_train_steps=500"])  # returns: exit code 0 under the CLI
    log = capsys.readouterr().out
    assert f"resumed from {out / 'checkpoints/checkpoint-4'} at step 4" in log and f"p'={target:.4f}" in log
    assert "preemption signal: checkpointing at step" in log and not (out / "experts.json").exists()
    step = int(prune.checkpoints(out)[-1].name.split("-")[1])
    assert 5 <= step < 10 and (state(out, step)["budget"], state(out, step)["target"]) == (0.6, target)
    assert [r["step"] for r in metrics(out)] == list(range(1, step + 1))

    fresh = [a for a in args if a != "logging.resume_from_checkpoint=latest"]
    with pytest.raises(UserError, match="already holds checkpoint-"):
        prune.main(fresh)  # it would overwrite the run
    with pytest.raises(UserError, match="trained with budget 0.6, the config gives 0.5"):
        prune.main([*args, "model.budget=0.5"])
    prune.main([*args, f"training.max_train_steps={step + 1}"])
    assert [r["step"] for r in metrics(out)] == list(range(1, step + 2))
    assert "expert codes:" in capsys.readouterr().out and (out / "experts.json").is_file()


@pytest.mark.slow  # the launched run's folder
def test_a_router_without_calibration_is_calibrated_once(world, launched, tmp_path, in_process, capsys):
    """A pruning folder from before the calibrated routing: filtering refuses it in one line naming the command,
    plain cosine still routes, and ``aptp.calibrate_routing`` writes what ``aptp.prune`` writes at its end."""
    out = tmp_path / "run"
    shutil.copytree(launched[1], out)
    info = json.loads((out / "router.json").read_text())
    written = info.pop("routing")
    assert written["rule"] == "calibrated" and len(written["log_v"]) == 4 and sum(written["train_counts"]) == 23
    (out / "router.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match=f"calibrate_routing --pruning_dir {out}") as e:
        filter_dataset.main(["--pruning_dir", str(out)])
    assert "\n" not in str(e.value)
    filter_dataset.main(["--pruning_dir", str(out), "--routing", "cosine", "--splits", "train"])
    assert json.loads((out / "filtered" / "train.json").read_text())["routing"] == "cosine"
    calibrate_routing.main(["--pruning_dir", str(out)])
    assert "calibrated over 23 training captions" in capsys.readouterr().out
    again = json.loads((out / "router.json").read_text())["routing"]
    np.testing.assert_allclose(again["log_v"], written["log_v"], rtol=0, atol=1e-9)
    assert again["train_counts"] == written["train_counts"] and again["cosine_counts"] == written["cosine_counts"]
    filter_dataset.main(["--pruning_dir", str(out), "--splits", "train"])
    assert json.loads((out / "filtered" / "train.json").read_text())["rows_per_expert"] == written["train_counts"]


@pytest.mark.slow  # a whole pipeline end to end
def test_sigterm_and_resume_equal_the_uninterrupted_run_bit_for_bit(world, tmp_path, in_process, capsys):
    """Every draw of a step (flips, timesteps, noise, the VAE's sample, the Gumbel noise, the data order) comes from
    (seed, process, step): stopped by SIGTERM and resumed, the run ends with the router, codes, calibration and
    optimizer state of the run that was never stopped."""
    base = ["--config", str(CONFIGS / "tiny.yaml"), *world, f"data.embedding_cache_dir={tmp_path / 'cache'}"]
    base += ["training.max_train_steps=6", "training.pretrain_steps=3", "logging.logging_steps=1"]
    base += ["logging.checkpointing_steps=1000", "training.random_flip=true"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    stop_and_resume(prune.main, base, straight, stopped, after=2)
    log = capsys.readouterr().out
    assert "preemption signal: checkpointing at step" in log and "resumed from" in log

    for name in ("router.pt", "checkpoints/checkpoint-6/router.pt", "checkpoints/checkpoint-6/optimizer.bin"):
        assert_same_tensors(*(torch.load(d / name, weights_only=True) for d in (straight, stopped)), name)
    for name in ("experts.json", "router.json"):
        a, b = (json.loads((d / name).read_text()) for d in (straight, stopped))
        assert a == b, name
    assert [r["loss"] for r in metrics(straight)] == [r["loss"] for r in metrics(stopped)]
