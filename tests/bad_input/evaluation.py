"""Rows of tests/test_bad_input.py: evaluation (evaluator.py, its activation cache, aptp.evaluate's reference
caches), sample_ddp.py's resume over existing PNGs, and resuming aptp.prune from a tampered training state.

The worlds (a random FID Inception, a random clean-fid Inception, a 1-step tiny APTP pruning run) are built once per
process and shared; every row copies what it breaks."""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.bad_input import LEFTOVERS, MALICIOUS, NAMED, ROOT, SILENT, TRACEBACK, Case, Result

_WORLD = Path(tempfile.mkdtemp(prefix="bad-input-evaluation-"))


def _images(n: int, size: int = 16, seed: int = 0, channels: int = 3, dtype=np.uint8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, channels)).astype(dtype)


@functools.cache
def fid_inception() -> Path:
    """A random FID Inception whose BatchNorm statistics are calibrated on images (finite, varied activations)."""
    from diffcompress.inception import FIDInception

    torch.manual_seed(0)
    model = FIDInception()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model.train()(torch.from_numpy(_images(2, seed=9)))
    path = _WORLD / "pt_inception-random.pth"
    torch.save(model.state_dict(), path)
    return path


def evaluator(tmp: Path, ref: np.ndarray | dict, sample: np.ndarray, *extra: object) -> list[object]:
    np.savez(tmp / "ref.npz", **(ref if isinstance(ref, dict) else {"arr_0": ref}))
    np.savez(tmp / "sample.npz", arr_0=sample)
    return ["evaluator.py", tmp / "ref.npz", tmp / "sample.npz", "--inception-weights", fid_inception(),
            "--device", "cpu", "--cache-dir", tmp / "cache", "--json-out", tmp / "results.json", *extra]  # fmt: skip


def nothing_written(tmp: Path, result: Result) -> None:
    assert not (tmp / "results.json").exists() and not (tmp / "cache").exists()


def stats(d: int = 2048, ds: int = 2023, bad: str | None = None) -> dict[str, np.ndarray]:
    out = {"mu": np.zeros(d), "sigma": np.eye(d), "mu_s": np.zeros(ds), "sigma_s": np.eye(ds)}
    if bad is not None:
        out[bad].flat[3] = np.nan
    return out


def cache_file(tmp: Path, name: str) -> Path:
    """Where evaluator.py caches the activations of ``tmp/name`` with the shared weights."""
    from diffcompress.adm_eval import _cache_file
    from diffcompress.downloads import file_digest

    class Identity:
        def identity(self) -> str:
            return f"torch:{file_digest(fid_inception())}"

    return _cache_file(tmp / name, Identity(), tmp / "cache")


def broken_cache(how: str):
    def prepare(tmp: Path) -> list[object]:
        # the reference's own statistics (identity covariances) keep the 2048-d Frechet distances cheap
        argv = evaluator(tmp, {"arr_0": _images(5, seed=1), **stats()}, _images(5, seed=2))
        cached = cache_file(tmp, "ref.npz")
        cached.parent.mkdir(parents=True)
        if how == "garbage":
            cached.write_bytes(b"PK\x03\x04 not really a zip")
        else:
            np.savez(cached, pool=np.full((5, 2048), np.nan, np.float32), spatial=np.zeros((5, 2023), np.float32))
        return argv

    return prepare


def cache_rebuilt(tmp: Path, result: Result) -> None:
    assert "activation cache" in result.out and "recomputing it" in result.out, result.out
    results = json.loads((tmp / "results.json").read_text())
    assert all(np.isfinite(results[k]) for k in ("fid", "sfid", "inception_score"))
    with np.load(cache_file(tmp, "ref.npz")) as z:  # rebuilt in place
        assert z["pool"].shape == (5, 2048) and np.isfinite(z["pool"]).all()


def truncated_sample(tmp: Path) -> list[object]:
    argv = evaluator(tmp, _images(5, seed=1), _images(5, seed=2))
    data = (tmp / "sample.npz").read_bytes()
    (tmp / "sample.npz").write_bytes(data[: len(data) // 2])
    return argv


# ------------------------------------------------------------------------------------------- sample_ddp.py

SAMPLE_FLAGS = ["--model", "DiT-Ti/8", "--image-size", "16", "--vae", "none", "--num-classes", "10",
                "--num-sampling-steps", "2", "--sampler", "ddim", "--num-fid-samples", "3", "--per-proc-batch-size",
                "3", "--device", "cpu", "--random-init"]  # fmt: skip


def sampled(tmp: Path) -> tuple[list[object], Path, dict[str, np.ndarray]]:
    """sample_ddp.py run once into ``tmp/samples``: its command, folder and each PNG's pixels."""
    import sample_ddp

    argv = ["sample_ddp.py", *SAMPLE_FLAGS, "--sample-dir", tmp / "samples"]
    npz = sample_ddp.main(sample_ddp.parse_args([str(a) for a in argv[1:]]))
    folder = npz.parent / npz.name.removesuffix(".npz")
    return argv, folder, {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def broken_pngs(how: str):
    def prepare(tmp: Path) -> list[object]:
        argv, folder, pixels = sampled(tmp)
        np.savez(tmp / "pixels.npz", **{k.removesuffix(".png"): v for k, v in pixels.items()})
        if how == "corrupt":
            data = (folder / "000001.png").read_bytes()
            (folder / "000001.png").write_bytes(data[: len(data) // 2])  # truncated
            flipped = bytearray((folder / "000002.png").read_bytes())
            flipped[len(flipped) // 2] ^= 0xFF  # one byte of the image data: a checksum mismatch
            (folder / "000002.png").write_bytes(bytes(flipped))
        elif how == "size":
            Image.fromarray(_images(1, size=8)[0]).save(folder / "000000.png")
            (folder / "000001.png").write_bytes(b"")
        else:  # a half-written temporary PNG of a killed process
            (folder / ".000001.png.tmp").write_bytes(b"\x89PNG half")
        (folder.parent / f"{folder.name}.npz").unlink()
        return argv

    return prepare


def pngs_remade(count: int):
    def check(tmp: Path, result: Result) -> None:
        if count:
            assert f"note: {count} existing PNG(s)" in result.out and "making them again" in result.out, result.out
        (npz,) = (tmp / "samples").glob("*.npz")
        folder = npz.parent / npz.name.removesuffix(".npz")
        with np.load(npz) as z, np.load(tmp / "pixels.npz") as original:
            assert z["arr_0"].shape == (3, 16, 16, 3)
            for i in range(3):  # the same images as before: each index's noise and label are fixed
                assert np.array_equal(z["arr_0"][i], original[f"{i:06d}"]), i
        assert not list(folder.glob(".*.tmp"))

    return check


# ------------------------------------------------------------------------------------------- aptp.prune resume


@functools.cache
def pruning_run() -> tuple[list[str], Path]:
    """The tiny world and a 1-step pruning run with its checkpoint-1 (accelerate's files, router.pt, state.json)."""
    from aptp import prune
    from aptp.make_tiny import build_world
    from tests.aptp_helpers import reset_accelerate

    root = _WORLD / "aptp"
    tiny = build_world(root, train_rows=8, val_rows=1, size=32)
    args = ["--config", str(ROOT / "configs/aptp/pruning/tiny.yaml"), f"pretrained_model_name_or_path={tiny['sd']}",
            f"data.data_dir={tiny['cc3m']}", f"model.prompt_encoder={tiny['encoder']}",
            "data.dataloader_num_workers=0", f"data.embedding_cache_dir={root / 'cache'}", "training.pretrain_steps=1",
            "logging.logging_steps=1", "logging.checkpointing_steps=1000"]  # fmt: skip
    reset_accelerate()
    prune.main([*args, f"output_dir={root / 'run'}", "training.max_train_steps=1"])
    reset_accelerate()
    return args, root / "run"


class RunsCode:
    marker: Path = _WORLD / "pwned"

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def tampered(name: str, how: str):
    def prepare(tmp: Path) -> list[object]:
        from tests.aptp_helpers import reset_accelerate

        args, run = pruning_run()
        reset_accelerate()
        shutil.copytree(run, tmp / "run")
        path = tmp / "run/checkpoints/checkpoint-1" / name
        if how == "garbage":
            path.write_bytes(path.read_bytes()[:50])
        elif how == "code":
            torch.save({"random_state": RunsCode()}, path)
        elif how == "missing":
            path.unlink()
        elif how == "wrong-optimizer":  # a readable optimizer state of another model
            opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
            opt.step()
            torch.save(opt.state_dict(), path)
        elif how == "not-json":
            path.write_text('{"step": 1, "budget"')
        elif how == "bad-step":
            state = json.loads(path.read_text())
            path.write_text(json.dumps({**state, "step": "one"}))
        elif how == "bad-rng":
            states = {"random_state": (3, (1, 2), None), "numpy_random_seed": ("MT19937", np.zeros(3, np.uint32), 0, 0,
                      0.0), "torch_manual_seed": torch.zeros(5, dtype=torch.uint8)}  # fmt: skip
            torch.save(states, path)
        return ["aptp.prune", *args, f"output_dir={tmp / 'run'}", "logging.resume_from_checkpoint=latest",
                "training.max_train_steps=2"]  # fmt: skip

    return prepare


def checkpoint_kept(tmp: Path, result: Result) -> None:
    from tests.aptp_helpers import reset_accelerate

    reset_accelerate()
    assert not RunsCode.marker.exists()
    assert not (tmp / "run/checkpoints/checkpoint-2").exists()  # nothing trained or written past the refusal
    assert [json.loads(line)["step"] for line in (tmp / "run/metrics.jsonl").read_text().splitlines()] == [1]


def resumed_with_note(tmp: Path, result: Result) -> None:
    from tests.aptp_helpers import reset_accelerate

    reset_accelerate()
    assert "random_states_0.pkl is missing" in result.err, result.err[-2000:]
    assert (tmp / "run/checkpoints/checkpoint-2/state.json").is_file()


# ------------------------------------------------------------------------------------------- aptp.evaluate


@functools.cache
def cleanfid_inception() -> Path:
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = _WORLD / "cleanfid-inception.pth"
    torch.save(net.state_dict(), path)
    return path


def png_folder(folder: Path, n: int, seed: int) -> Path:
    folder.mkdir(parents=True)
    for i, image in enumerate(_images(n, size=24, seed=seed)):
        Image.fromarray(image).save(folder / f"{i}.png")
    return folder


def aptp_fid(tmp: Path, *extra: object) -> list[object]:
    return ["aptp.evaluate", png_folder(tmp / "gen", 3, 1), "--metrics", "fid", "--inception-weights",
            cleanfid_inception(), "--device", "cpu", "--out", tmp / "metrics.json", *extra]  # fmt: skip


def nan_ref_stats(tmp: Path) -> list[object]:
    mu, sigma = np.zeros(2048), np.eye(2048)
    mu[5] = np.nan
    np.savez(tmp / "stats.npz", mu=mu, sigma=sigma)
    return aptp_fid(tmp, "--ref-stats", tmp / "stats.npz")


def corrupt_ref_stats_cache(tmp: Path) -> list[object]:
    (tmp / "stats.npz").write_bytes(b"PK\x03\x04 garbage")
    return aptp_fid(tmp, "--ref-dir", png_folder(tmp / "ref", 3, 2), "--ref-stats", tmp / "stats.npz")


def ref_stats_rebuilt(tmp: Path, result: Result) -> None:
    assert "is not usable" in result.err + result.out and "recomputing it" in result.err + result.out
    with np.load(tmp / "stats.npz") as z:
        assert z["mu"].shape == (2048,) and np.isfinite(z["sigma"]).all()
    assert np.isfinite(json.loads((tmp / "metrics.json").read_text())["fid"]["value"])


CASES: list[Case] = [
    # evaluator.py: batches that cannot be compared are refused before any network runs
    Case("eval-size-mismatch", SILENT, lambda t: evaluator(t, _images(5), _images(5, size=32)),
         words=("ref.npz", "16x16", "sample.npz", "32x32"), check=nothing_written),
    Case("eval-four-channels", SILENT, lambda t: evaluator(t, _images(5), _images(5, channels=4)),
         words=("sample.npz", "uint8 [N, H, W, 3]", "[5, 16, 16, 4]"), check=nothing_written),
    Case("eval-float-images", SILENT, lambda t: evaluator(t, _images(5), _images(5, dtype=np.float32)),
         words=("sample.npz", "uint8", "float32"), check=nothing_written),
    Case("eval-empty-arr0", SILENT, lambda t: evaluator(t, _images(0), _images(5)),
         words=("ref.npz", "holds no images"), check=nothing_written),
    Case("eval-too-few-images", NAMED, lambda t: evaluator(t, _images(5), _images(2)),
         words=("sample.npz", "2 image(s)", "at least 4"), check=nothing_written),
    Case("eval-truncated-sample", NAMED, truncated_sample, words=("sample.npz", "not a readable npz"),
         check=nothing_written),
    Case("eval-nan-ref-mu", NAMED, lambda t: evaluator(t, {"arr_0": _images(5), **stats(bad="mu")}, _images(5)),
         words=("ref.npz", "mu", "NaN"), check=nothing_written),
    Case("eval-nan-ref-sigma-s", NAMED,
         lambda t: evaluator(t, {"arr_0": _images(5), **stats(bad="sigma_s")}, _images(5)),
         words=("ref.npz", "sigma_s", "NaN", "--recompute-ref-stats"), check=nothing_written),
    Case("eval-misshapen-ref-stats", NAMED,
         lambda t: evaluator(t, {"arr_0": _images(5), **stats(), "sigma": np.eye(7)}, _images(5)),
         words=("ref.npz", "covariance"), check=nothing_written),
    # evaluator.py: a broken activation cache is said and rebuilt
    # (end to end with 2048-d Frechet distances on one thread: ~20 s each, so slow; every variant of a broken cache
    # is also tested fast in tests/test_evaluator.py::test_a_broken_activation_cache_is_said_and_rebuilt)
    Case("eval-cache-garbage", TRACEBACK, broken_cache("garbage"), code=0, check=cache_rebuilt,
         marks=(pytest.mark.slow,)),
    Case("eval-cache-nan", SILENT, broken_cache("nan"), code=0, check=cache_rebuilt, marks=(pytest.mark.slow,)),
    # sample_ddp.py: existing PNGs are checked before they are skipped
    Case("sample-corrupt-pngs", TRACEBACK, broken_pngs("corrupt"), code=0, check=pngs_remade(2)),
    Case("sample-png-of-another-size", SILENT, broken_pngs("size"), code=0, check=pngs_remade(2)),
    Case("sample-stale-tmp-png", LEFTOVERS, broken_pngs("tmp"), code=0, check=pngs_remade(0)),
    # aptp.prune resumed from a tampered training state
    Case("aptp-resume-truncated-optimizer", TRACEBACK, tampered("optimizer.bin", "garbage"),
         words=("optimizer.bin", "truncated or corrupt"), check=checkpoint_kept),
    Case("aptp-resume-optimizer-of-another-model", TRACEBACK, tampered("optimizer.bin", "wrong-optimizer"),
         words=("optimizer.bin", "does not fit"), check=checkpoint_kept),
    Case("aptp-resume-rng-with-code", MALICIOUS, tampered("random_states_0.pkl", "code"),
         words=("random_states_0.pkl", "holds code", "refused"), check=checkpoint_kept),
    Case("aptp-resume-truncated-rng", TRACEBACK, tampered("random_states_0.pkl", "garbage"),
         words=("random_states_0.pkl", "truncated or corrupt"), check=checkpoint_kept),
    Case("aptp-resume-invalid-rng", SILENT, tampered("random_states_0.pkl", "bad-rng"),
         words=("random_states_0.pkl", "invalid RNG state"), check=checkpoint_kept),
    Case("aptp-resume-missing-rng-is-said", SILENT, tampered("random_states_0.pkl", "missing"), code=0,
         check=resumed_with_note),
    Case("aptp-resume-state-not-json", NAMED, tampered("state.json", "not-json"), words=("state.json", "JSON"),
         check=checkpoint_kept),
    Case("aptp-resume-state-bad-step", NAMED, tampered("state.json", "bad-step"),
         words=("state.json", "step", "'one'"), check=checkpoint_kept),
    # aptp.evaluate: reference statistics and their cache
    Case("aptp-eval-nan-ref-stats", NAMED, nan_ref_stats, words=("--ref-stats", "stats.npz", "NaN")),
    Case("aptp-eval-corrupt-ref-stats-cache", TRACEBACK, corrupt_ref_stats_cache, code=0, check=ref_stats_rebuilt,
         marks=(pytest.mark.slow,)),  # ~30 s on one thread; fast in tests/test_evaluator.py
]  # fmt: skip
