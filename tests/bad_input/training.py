"""Rows of tests/test_bad_input.py: training (flags, non-finite runs, resume, devices, output folders, leftovers).

Most rows fail at parse time (a flag's type refuses a meaningless value before anything is read or written); the
others train a DiT-Ti/4 on 8x8 toy latents for a step or two."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.bad_input import LEFTOVERS, NAMED, SILENT, TRACEBACK, Case, Result

TINY = ["--model", "DiT-Ti/4", "--num-classes", "4", "--global-batch-size", "8", "--num-workers", "0",
        "--log-every", "1", "--ckpt-every", "1000"]  # fmt: skip
RUN = Path("outputs") / "train-DiT-Ti-4"  # the experiment folder of TINY under the default --results-dir


def features(tmp: Path, n: int = 8, scale: float = 1.0, nan_row: int | None = None) -> Path:
    """Packed toy latents [N, 2 views, 4, 8, 8] (``scale``: their size; ``nan_row``: one sample made NaN)."""
    root = tmp / "features"
    root.mkdir(exist_ok=True)
    x = np.random.default_rng(0).standard_normal((n, 2, 4, 8, 8)).astype(np.float32) * scale
    if nan_row is not None:
        x[nan_row] = np.nan
    np.save(root / "features.npy", x)
    np.save(root / "labels.npy", np.arange(n) % 4)
    return root


def train(*flags):
    """train.py on toy features made in the test's folder (the prepare callables receive it)."""
    return lambda tmp: ["train.py", *TINY, "--data-path", features(tmp), *flags]


def refused(script: str, *flags: str, required: tuple[str, ...] = ()):
    """A command refused at parse time: nothing is read, so the required inputs need not exist."""
    return lambda tmp: [script, *required, *flags]


def nothing_written(tmp: Path, result: Result) -> None:
    assert not (tmp / "outputs").exists() and not (tmp / "samples").exists(), "a refused run wrote output"


DATA = ("--data-path", "features")  # required, never read by a parse-time refusal
SAMPLE = ("--model", "DiT-Ti/4", "--random-init")


def parse_rows() -> list[Case]:
    """Every count, interval or size flag that cannot be 0 or negative, in each script, refused by name."""
    rows = [
        ("depth-zero", "train.py", ["--depth", "0"], DATA),
        ("depth-negative", "train_masked_kd.py", ["--depth", "-2"], (*DATA, "--load-teacher", "t.pt")),
        ("max-steps-negative", "train.py", ["--max-steps", "-5"], DATA),
        ("epochs-zero", "train.py", ["--epochs", "0"], DATA),
        ("ckpt-every-zero", "train.py", ["--ckpt-every", "0"], DATA),
        ("log-every-zero", "prune_by_learning.py", ["--log-every", "0"], DATA),
        ("global-batch-size-zero", "train.py", ["--global-batch-size", "0"], DATA),
        ("num-workers-negative", "train.py", ["--num-workers", "-1"], DATA),
        ("keep-last-negative", "train.py", ["--keep-last", "-1"], DATA),
        ("grad-accum-zero", "train.py", ["--grad-accum-steps", "0"], DATA),
        ("lr-nan", "train.py", ["--lr", "nan"], DATA),
        ("lr-zero", "train_masked_kd.py", ["--lr", "0"], (*DATA, "--load-teacher", "t.pt")),
        ("ema-decay-above-one", "train.py", ["--ema-decay", "1.5"], DATA),
        ("max-nan-share-above-one", "train.py", ["--max-nan-share", "2"], DATA),
        ("image-size-zero", "train.py", ["--image-size", "0"], DATA),
        ("alpha-kd-negative", "train_masked_kd.py", ["--alpha-kd", "-0.5"], (*DATA, "--load-teacher", "t.pt")),
        ("lora-rank-zero", "prune_by_learning.py", ["--lora-rank", "0"], DATA),
        ("tau-range-zero", "prune_by_learning.py", ["--tau-range", "0", "0"], DATA),
        ("num-sampling-steps-zero", "sample_ddp.py", ["--num-sampling-steps", "0"], SAMPLE),
        ("num-sampling-steps-one", "sample.py", ["--num-sampling-steps", "1"], SAMPLE),  # the variance needs 2
        ("num-fid-samples-zero", "sample_ddp.py", ["--num-fid-samples", "0"], SAMPLE),
        ("per-proc-batch-size-negative", "sample_ddp.py", ["--per-proc-batch-size", "-4"], SAMPLE),
        ("sample-image-size-zero", "sample.py", ["--image-size", "0"], SAMPLE),
        ("cfg-scale-inf", "sample.py", ["--cfg-scale", "inf"], SAMPLE),
        ("nsamples-zero", "prune_by_score.py", ["--nsamples", "0"], ("--n-pruned", "1")),
        ("n-pruned-zero", "prune_by_score.py", ["--n-pruned", "0"], ()),
        ("score-batch-size-zero", "prune_by_score.py", ["--batch-size", "0"], ("--n-pruned", "1")),
        ("target-depth-zero", "prune_by_index.py", ["--target-depth", "0"],
         ("--ckpt", "x", "--kept-indices", "oracle")),
        ("extract-batch-size-zero", "extract_features.py", ["--batch-size", "0"], ("--data-path", "images")),
        ("evaluator-batch-size-zero", "evaluator.py", ["--batch-size", "0"], ("ref.npz", "sample.npz")),
        ("save-npz-num-zero", "save_npz.py", ["--num", "0"], ("samples",)),
        ("aptp-generate-steps-zero", "aptp.generate", ["--num_inference_steps", "0"],
         ("--pruning_dir", "p", "--prompts", "q")),
        ("aptp-expert-id-negative", "aptp.finetune", ["--expert_id", "-1"], ("--config", "c.yaml")),
        ("seed-negative", "sample_ddp.py", ["--global-seed", "-1"], SAMPLE),
    ]  # fmt: skip
    cases = []
    for id_, script, flags, required in rows:
        flag = flags[0]
        cases.append(Case(id_, SILENT if "zero" in id_ or "negative" in id_ else NAMED,
                          refused(script, *flags, required=required), words=("argument", flag),
                          check=nothing_written))  # fmt: skip
    return cases


def tau_reversed() -> Case:
    return Case("tau-range-reversed", SILENT, refused("prune_by_learning.py", "--tau-range", "0.1", "4",
                required=DATA), words=("--tau-range", "START", "END"), check=nothing_written)  # fmt: skip


# --------------------------------------------------------------------------------------------- non-finite runs


def no_checkpoint(tmp: Path, result: Result) -> None:
    assert not list((tmp / RUN / "checkpoints").glob("*.pt")), "a run that learned nothing wrote a checkpoint"


def huge(tmp: Path) -> list:
    """Latents of 1e30: finite inputs, but every loss overflows to inf, so every step is skipped."""
    return ["train.py", *TINY, "--data-path", features(tmp, scale=1e30), "--max-steps", "2"]


def half_huge(tmp: Path) -> list:
    """One sample of 16 at 1e30, batches of 4: one step in four is skipped, more than the 0.1 allowed."""
    root = features(tmp, n=16)
    x = np.load(root / "features.npy")
    x[:1] *= 1e30
    np.save(root / "features.npy", x)
    return ["train.py", *TINY, "--global-batch-size", "4", "--data-path", root, "--max-steps", "4",
            "--max-nan-share", "0.1", "--max-nan-steps", "100"]  # fmt: skip


def nan_sample(tmp: Path) -> list:
    return ["train.py", *TINY, "--data-path", features(tmp, nan_row=3), "--max-steps", "2"]


# --------------------------------------------------------------------------------------------- resume, device, folders


def fake_checkpoint(tmp: Path, model: str, weights: dict | None = None) -> Path:
    """A training checkpoint of ``model`` as our trainer writes it (empty weights unless given)."""
    path = tmp / "other.pt"
    w = weights or {}
    torch.save({"model": w, "ema": w, "opt": {}, "sched": {}, "train_steps": 1, "args": {"model": model}}, path)
    return path


def resume_other_model(tmp: Path) -> list:
    return [*train("--max-steps", "2")(tmp), "--resume", fake_checkpoint(tmp, "DiT-Ti/2")]


def resume_auto_other_depth(tmp: Path) -> list:
    """``--resume auto`` finds, in the same folder, a checkpoint of another --depth (the folder names only --model)."""
    ckpt = tmp / RUN / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.save({"model": {}, "ema": {}, "opt": {}, "sched": {}, "train_steps": 1,
                "args": {"model": "DiT-Ti/4", "depth": 4}}, ckpt / "0000001.pt")  # fmt: skip
    return [*train("--max-steps", "2", "--depth", "2")(tmp), "--resume", "auto"]


def resume_unfit_weights(tmp: Path) -> list:
    """A checkpoint that names no model, holding another architecture's weights: one line, not a size-mismatch dump."""
    from models_with_layer_pruning import create_model

    other = create_model("DiT-Ti/2", input_size=8, num_classes=4).state_dict()
    path = tmp / "other.pt"
    torch.save({"model": other, "ema": other, "opt": {}, "sched": {}, "train_steps": 1, "args": {}}, path)
    return [*train("--max-steps", "2")(tmp), "--resume", path]


no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def results_under_a_file(tmp: Path) -> list:
    (tmp / "a_file").write_text("not a folder\n")
    return [*train("--max-steps", "1")(tmp), "--results-dir", tmp / "a_file" / "sub"]


# --------------------------------------------------------------------------------------------- leftovers


def stale_temps(tmp: Path) -> list:
    """Two checkpoint writes killed mid-way (one of a step the run will not reach again) and one complete checkpoint."""
    ckpt = tmp / RUN / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / ".0000009.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    (ckpt / ".0000002.pt.x7y8z9.tmp").write_bytes(b"half a checkpoint")
    return [*train("--max-steps", "3", "--ckpt-every", "1", "--keep-last", "2")(tmp), "--resume", "auto"]


def temps_gone_keep_last(tmp: Path, result: Result) -> None:
    ckpt = tmp / RUN / "checkpoints"
    assert not list(ckpt.glob(".*.tmp")), list(ckpt.iterdir())
    assert sorted(p.name for p in ckpt.glob("*.pt")) == ["0000002.pt", "0000003.pt"]
    assert "removed" in result.out and ".0000009.pt.k1ll3d.tmp" in result.out  # said, not silent


def stale_temp_only(tmp: Path) -> list:
    """Only a killed write in the folder: ``--resume auto`` starts afresh (never loads it) and removes it."""
    ckpt = tmp / RUN / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / ".0000005.pt.abcdef.tmp").write_bytes(b"\x80\x02 truncated pickle")
    return [*train("--max-steps", "1")(tmp), "--resume", "auto"]


def started_afresh(tmp: Path, result: Result) -> None:
    ckpt = tmp / RUN / "checkpoints"
    assert [p.name for p in ckpt.iterdir()] == ["0000001.pt"]
    assert "starting from scratch" in result.out


CASES: list[Case] = [
    *parse_rows(),
    tau_reversed(),
    Case("all-steps-non-finite", SILENT, huge, words=("all 2 steps", "skipped"), check=no_checkpoint),
    Case(
        "most-steps-non-finite", SILENT, half_huge, words=("1 of 4 steps", "--max-nan-share 0.1"), check=no_checkpoint
    ),
    Case("nan-sample-named", NAMED, nan_sample, words=("features.npy",), check=no_checkpoint),
    Case("resume-other-model", TRACEBACK, resume_other_model, words=("other.pt", "DiT-Ti/2", "DiT-Ti/4")),
    Case(
        "resume-auto-other-depth",
        TRACEBACK,
        resume_auto_other_depth,
        words=("0000001.pt", "--depth 4", "--depth 2", "--resume auto"),
    ),  # fmt: skip
    Case("resume-unfit-weights", TRACEBACK, resume_unfit_weights, words=("other.pt", "does not fit", "DiT-Ti/4")),
    Case(
        "device-cuda-without-gpu",
        TRACEBACK,
        train("--max-steps", "1", "--device", "cuda"),
        words=("--device cuda", "no CUDA"),
        check=nothing_written,
        marks=(no_gpu,),
    ),  # fmt: skip
    Case(
        "device-misspelt",
        NAMED,
        train("--max-steps", "1", "--device", "gpu0"),
        words=("--device", "gpu0", "cpu"),
        check=nothing_written,
    ),  # fmt: skip
    Case("results-dir-under-a-file", TRACEBACK, results_under_a_file, words=("a_file", "not a folder")),
    Case("killed-writes-removed-keep-last", LEFTOVERS, stale_temps, code=0, check=temps_gone_keep_last),
    Case("killed-write-never-resumed", LEFTOVERS, stale_temp_only, code=0, check=started_afresh),
]
