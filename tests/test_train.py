"""train.py and the shared training loop: DDP under torchrun, exact resume, preemption, bad input."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import train as train_script
from diffcompress.checkpoint import CheckpointError, load_file
from diffcompress.data import FeatureDataset
from diffcompress.distributed import DistInfo
from diffcompress.trainer import StepSampler, diffusion_objective, lr_factor, train
from diffusion import create_diffusion
from models_with_layer_pruning import create_model

from .conftest import ROOT

TINY_ARGS = ["--model", "DiT-Ti/4", "--num-classes", "4", "--global-batch-size", "8", "--num-workers", "0",
             "--lr", "1e-3", "--lr-min", "1e-4"]  # fmt: skip


def make_features(root, n=48, classes=4, size=8, seed=0):
    """A learnable toy set: each class is a fixed pattern plus a little noise; views are [x, flip(x)]."""
    rng = np.random.default_rng(seed)
    patterns = rng.standard_normal((classes, 4, size, size)).astype(np.float32)
    (root / "imagenet64_features").mkdir(parents=True)
    (root / "imagenet64_labels").mkdir()
    for i in range(n):
        x = patterns[i % classes] + 0.05 * rng.standard_normal((4, size, size)).astype(np.float32)
        np.save(root / "imagenet64_features" / f"{i}.npy", np.stack([x, x[..., ::-1]]))
        np.save(root / "imagenet64_labels" / f"{i}.npy", np.array([i % classes]))
    return root


def fit_tiny_dit(model, features, results, steps=150):
    """Fit ``model`` to the toy set with train.py's recipe (fast lr); returns it with the trained weights
    (not the EMA: at 0.9999 it is still near the initialisation after so few steps)."""
    args = train_script.parse_args(["--data-path", str(features), "--results-dir", str(results), "--num-classes", "4",
                                    "--global-batch-size", "16", "--num-workers", "0", "--ckpt-every", "100000",
                                    "--max-steps", str(steps), "--lr", "2e-3", "--lr-min", "2e-3",
                                    "--log-every", "1000"])  # fmt: skip
    info = DistInfo(0, 0, 1, torch.device("cpu"))
    train(args, info, model, diffusion_objective(create_diffusion("")), FeatureDataset(features))
    model.zero_grad(set_to_none=True)
    return model


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return make_features(tmp_path_factory.mktemp("features"))


def run_train(features, results, *extra):
    args = train_script.parse_args(
        [*TINY_ARGS, "--data-path", str(features), "--results-dir", str(results), "--prefix", "t", *extra]
    )
    return train_script.main(args)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------ the loop's parts


def test_step_sampler_partitions_each_epoch():
    seen = []
    for rank in range(2):
        s = StepSampler(size=50, global_batch=8, rank=rank, world=2, seed=3)
        s.set_position(epoch=1, step_in_epoch=0)
        seen.append(list(s))
    assert len(seen[0]) == len(seen[1]) == 6 * 4  # 50 // 8 = 6 full steps, 4 per rank
    assert not set(seen[0]) & set(seen[1])
    resumed = StepSampler(size=50, global_batch=8, rank=1, world=2, seed=3)
    resumed.set_position(epoch=1, step_in_epoch=2)
    assert list(resumed) == seen[1][8:]  # mid-epoch resume continues the same order
    whole = StepSampler(size=50, global_batch=8, rank=0, world=1, seed=3)
    whole.set_position(epoch=1, step_in_epoch=0)
    chunks = np.array(list(whole)).reshape(6, 8)  # one process sees the same global batches
    assert np.array_equal(chunks[:, :4].ravel(), seen[0]) and np.array_equal(chunks[:, 4:].ravel(), seen[1])


def test_lr_schedule_warmup_then_cosine_to_floor():
    args = train_script.parse_args(["--data-path", "x", "--lr", "2e-4", "--lr-min", "1e-4", "--warmup-steps", "10"])
    assert lr_factor(0, args, 110) == pytest.approx(0.1)
    assert lr_factor(9, args, 110) == pytest.approx(1.0)
    assert lr_factor(10, args, 110) == pytest.approx(1.0)
    assert lr_factor(60, args, 110) == pytest.approx(0.75)  # halfway: (1 + 0.5) / 2
    assert lr_factor(110, args, 110) == pytest.approx(0.5)  # the floor: 1e-4 / 2e-4


# ------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_train_ddp_two_processes_loss_falls(features, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(ROOT / "train.py"), *TINY_ARGS, "--data-path", str(features),
           "--results-dir", str(tmp_path), "--prefix", "ddp", "--max-steps", "40", "--log-every", "10",
           "--ckpt-every", "20"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    exp = tmp_path / "ddp-DiT-Ti-4"
    records = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    assert records[-1]["loss"] < 0.7 * records[0]["loss"], records
    assert all(r["steps_per_sec"] > 0 for r in records)
    assert sorted(p.name for p in (exp / "checkpoints").iterdir()) == ["0000020.pt", "0000040.pt"]
    state = load_file(exp / "checkpoints" / "0000040.pt")
    assert {"model", "ema", "opt", "sched", "train_steps", "args"} <= set(state)
    assert state["train_steps"] == 40 and state["args"]["global_batch_size"] == 8
    model = create_model("DiT-Ti/4", input_size=8, num_classes=4)
    model.load_state_dict(state["ema"])  # the EMA is a loadable DiT


def assert_same_state(a, b):
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k}"
    for pa, pb in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        assert torch.equal(pa["exp_avg"], pb["exp_avg"]) and torch.equal(pa["exp_avg_sq"], pb["exp_avg_sq"])


@pytest.mark.slow  # a whole pipeline end to end
def test_exact_resume(features, tmp_path):
    # 5 steps per epoch (48 // 8): step 3 is mid-epoch and the resumed run crosses an epoch boundary
    straight = run_train(features, tmp_path / "a", "--max-steps", "7", "--ckpt-every", "3")
    middle = tmp_path / "a" / "t-DiT-Ti-4" / "checkpoints" / "0000003.pt"
    resumed = run_train(features, tmp_path / "b", "--max-steps", "7", "--resume", str(middle))
    assert straight.train_steps == resumed.train_steps == 7
    a, b = load_file(straight.checkpoint), load_file(resumed.checkpoint)
    assert_same_state(a, b)
    assert a["sched"]["last_epoch"] == b["sched"]["last_epoch"] == 7
    assert not torch.equal(load_file(middle)["ema"]["blocks.0.mlp.fc1.weight"], a["ema"]["blocks.0.mlp.fc1.weight"])


@pytest.mark.slow
def test_sigterm_checkpoints_and_resumes(features, tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY_ARGS, "--data-path", str(features), "--results-dir",
           str(tmp_path), "--prefix", "t", "--max-steps", "100000", "--log-every", "1",
           "--lr-schedule", "constant"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "t-DiT-Ti-4" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "preempted at step" in out
    ckpts = sorted((tmp_path / "t-DiT-Ti-4" / "checkpoints").glob("*.pt"))
    assert len(ckpts) == 1
    stopped = load_file(ckpts[0])["train_steps"]
    assert 3 <= stopped < 100000
    # a constant lr does not depend on --max-steps, so the interrupted run can be finished early and compared
    resumed = run_train(
        features, tmp_path, "--lr-schedule", "constant", "--max-steps", str(stopped + 2), "--resume", "auto"
    )
    straight = run_train(features, tmp_path / "straight", "--lr-schedule", "constant", "--max-steps", str(stopped + 2))
    assert_same_state(load_file(resumed.checkpoint), load_file(straight.checkpoint))


# ------------------------------------------------------------------------------------ bad input


def test_nan_loss_steps_are_skipped_then_stop(features, tmp_path):
    args = train_script.parse_args([*TINY_ARGS, "--data-path", str(features), "--results-dir", str(tmp_path),
                                    "--max-steps", "10", "--max-nan-steps", "3"])  # fmt: skip
    model = create_model("DiT-Ti/4", input_size=8, num_classes=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def nan_objective(m, x, y, step):
        return {"loss": m(x, torch.zeros(len(x), dtype=torch.long), y).mean() * float("nan")}

    info = DistInfo(0, 0, 1, torch.device("cpu"))
    with pytest.raises(Exception, match="4 steps had a non-finite loss") as e:
        train(args, info, model, nan_objective, FeatureDataset(features))
    assert "\n" not in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no update was applied


def test_bad_input_gives_one_line_errors(features, tmp_path, script):
    def error(*args):
        result = script("train.py", *args)
        assert result.code == 2, result.err
        return result.last_line

    common = [*TINY_ARGS, "--max-steps", "1", "--results-dir", str(tmp_path)]
    missing = error(*common, "--data-path", str(tmp_path / "missing"))
    assert f"features folder '{tmp_path / 'missing'}' does not exist" in missing
    empty = tmp_path / "empty"
    empty.mkdir()
    assert str(empty) in error(*common, "--data-path", str(empty))
    broken = make_features(tmp_path / "broken", n=10)
    (broken / "imagenet64_labels" / "3.npy").unlink()
    assert "3" in error(*common, "--data-path", str(broken))
    assert "invalid choice: 'DiT-Q/2'" in error("--model", "DiT-Q/2", "--data-path", str(features))
    wrong = tmp_path / "wrong.pt"
    torch.save(create_model("DiT-Ti/4", input_size=8, num_classes=4, depth=3).state_dict(), wrong)
    msg = error(*common, "--data-path", str(features), "--load-weight", str(wrong))
    assert "missing" in msg and "blocks.3-11.*" in msg and "depth 3" in msg


def test_batch_not_divisible_by_world_size(features, tmp_path):
    args = train_script.parse_args([*TINY_ARGS, "--data-path", str(features), "--results-dir", str(tmp_path),
                                    "--max-steps", "1", "--global-batch-size", "7"])  # fmt: skip
    info = DistInfo(0, 0, 2, torch.device("cpu"))
    with pytest.raises(ValueError, match="--global-batch-size 7 is not divisible by the world size 2"):
        train(args, info, create_model("DiT-Ti/4", input_size=8, num_classes=4), lambda *a: {}, [0] * 48)


def test_load_weight_of_wrong_model_raises_checkpoint_error(features, tmp_path):
    wrong = tmp_path / "w.pt"
    torch.save(create_model("DiT-B/4", input_size=8, num_classes=4).state_dict(), wrong)
    with pytest.raises(CheckpointError, match="mis-shaped"):
        run_train(features, tmp_path, "--max-steps", "1", "--load-weight", str(wrong))


def test_epochs_and_keep_last(features, tmp_path):
    result = run_train(features, tmp_path, "--epochs", "1", "--ckpt-every", "1", "--keep-last", "2")
    assert result.train_steps == 48 // 8  # one epoch of full global batches
    names = sorted(p.name for p in (result.experiment_dir / "checkpoints").iterdir())
    assert names == ["0000005.pt", "0000006.pt"]


def test_epoch_based_runs_move_the_cosine_once_per_epoch_as_the_authors_scheduler():
    args = train_script.parse_args(["--data-path", "x", "--lr", "2e-4", "--lr-min", "1e-4", "--epochs", "4"])
    assert train_script.parse_args(["--data-path", "x"]).epochs == 1400  # DiT's default
    floor = 0.5
    for epoch in range(4):  # CosineAnnealingLR(T_max=4, eta_min=1e-4) stepped once per epoch of 10 steps
        expected = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * epoch / 4))
        for step in range(epoch * 10, epoch * 10 + 10):
            assert lr_factor(step, args, 40, steps_per_epoch=10) == pytest.approx(expected)
    args.max_steps = 40  # a step-based run: the cosine moves every step
    assert lr_factor(5, args, 40, steps_per_epoch=10) != lr_factor(6, args, 40, steps_per_epoch=10)


def test_results_dir_defaults_to_outputs_and_an_old_results_run_is_named(features, tmp_path, monkeypatch, script):
    monkeypatch.chdir(tmp_path)
    old = tmp_path / "results" / "t-DiT-Ti-4" / "checkpoints"
    old.mkdir(parents=True)
    (old / "0000002.pt").write_bytes(b"")
    result = script("train.py", *TINY_ARGS, "--data-path", features, "--prefix", "t", "--max-steps", "1",
                    "--resume", "auto")  # fmt: skip
    assert result.code == 2 and "pass --results-dir results to continue it" in result.last_line
    result = script("train.py", *TINY_ARGS, "--data-path", features, "--prefix", "u", "--max-steps", "1",
                    "--strong-aug", "--strict", "--vae", "none")  # fmt: skip
    assert result.code == 0, result.err
    assert (tmp_path / "outputs" / "u-DiT-Ti-4" / "checkpoints" / "0000001.pt").is_file()


def test_tf32_flag_on_every_training_script():
    """--tf32/--no-tf32 (DiT's default on) reaches the CUDA switches; a CPU has no TF32."""
    import prune_by_learning
    import train_masked_kd
    from diffcompress.distributed import set_tf32

    required = {train_masked_kd: ["--load-teacher", "t.pt"], prune_by_learning: []}
    for module in (train_script, train_masked_kd, prune_by_learning):
        base = ["--data-path", "x", "--model", "DiT-S/2", *required.get(module, [])]
        assert module.parse_args(base).tf32 is True
        assert module.parse_args([*base, "--no-tf32"]).tf32 is False
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        assert set_tf32(torch.device("cuda"), False) is False
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert set_tf32(torch.device("cuda"), True) is True
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        assert set_tf32(torch.device("cpu"), True) is False and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
