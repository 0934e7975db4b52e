"""evaluator.py and the torch Inception backend: the architecture against torchvision's, the graph's resize, and
end-to-end runs on small npz batches with a randomly initialised Inception of the real architecture."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.models.inception as tvi
from PIL import Image

from diffcompress.adm_eval import NpzImages, batch_activations, evaluate, reference_statistics
from diffcompress.downloads import fetch_weights
from diffcompress.errors import UserError
from diffcompress.fid_metrics import activation_statistics, inception_score, precision_recall
from diffcompress.inception import FIDInception, TorchInception, legacy_resize_matrix

from .conftest import ROOT


def random_images(n, seed, size=32, smooth=False):
    rng = np.random.default_rng(seed)
    if smooth:  # a different image distribution: low-frequency blobs
        small = rng.integers(0, 256, size=(n, 4, 4, 3)).astype(np.float32)
        return np.clip(np.kron(small, np.ones((1, size // 4, size // 4, 1))), 0, 255).astype(np.uint8)
    return rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random FID Inception whose BatchNorm statistics are calibrated on images, so that activations neither
    vanish nor explode through ~90 layers, saved like the released weights file (a plain state dict)."""
    torch.manual_seed(0)
    model = FIDInception()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # running stats = the calibration batch's statistics
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.2, 0.2)
    with torch.no_grad():
        model.train()(torch.from_numpy(random_images(6, 0)))
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    d = tmp_path_factory.mktemp("batches")
    ref, sample = d / "ref.npz", d / "sample.npz"
    np.savez(ref, arr_0=random_images(10, 1))
    np.savez_compressed(sample, arr_0=random_images(8, 2, smooth=True))  # deflated members stream too
    return ref, sample


@pytest.fixture(scope="module")
def activations(weights, batches):
    """The backend and its (pool, spatial) activations of the reference and the sample batch, computed once."""
    backend = TorchInception(weights, "cpu")
    ref, sample = (backend.activations(np.load(path)["arr_0"]) for path in batches)
    return backend, ref, sample


def test_state_dict_is_torchvision_inception_with_1008_classes():
    ours = {k: v.shape for k, v in FIDInception().state_dict().items()}
    theirs = tvi.Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()
    assert ours == {k: v.shape for k, v in theirs.items()}


def test_taps_match_torchvision_inception_with_the_graph_quirks(weights, monkeypatch):
    state = torch.load(weights, weights_only=True)
    ours = FIDInception().eval()
    ours.load_state_dict(state)
    images = torch.from_numpy(random_images(2, 3, size=40))
    with torch.inference_mode():
        out = ours(images)
        x = ours.preprocess(images).contiguous()

    # torchvision's blocks, made to pool as the TF graph does: padding excluded from average pools, and a max
    # pool in the last block's pool branch.
    tv = tvi.Inception3(num_classes=1008, aux_logits=False, init_weights=False).eval()
    tv.load_state_dict(state)
    avg, in_last = F.avg_pool2d, [False]

    def graph_pool(x, kernel_size, stride=None, padding=0, *args, **kwargs):
        if in_last[0]:
            return F.max_pool2d(x, kernel_size, stride, padding)
        return avg(x, kernel_size, stride, padding, count_include_pad=False)

    monkeypatch.setattr(tvi.F, "avg_pool2d", graph_pool)
    tv.Mixed_7c.register_forward_pre_hook(lambda *_: in_last.__setitem__(0, True))
    tv.Mixed_7c.register_forward_hook(lambda *_: in_last.__setitem__(0, False))
    taps = {}
    tv.avgpool.register_forward_hook(lambda m, i, o: taps.__setitem__("pool", o.flatten(1)))
    tv.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: taps.__setitem__("spatial", o))
    with torch.inference_mode():
        tv(x)
    assert out["pool_3"].abs().mean() > 1e-3  # calibrated: the features are not vanishing
    # float32 through ~90 layers in a different memory layout: agreement to ~1e-5 of the feature scale
    scale = out["pool_3"].abs().max().item()
    assert scale < 1e3
    torch.testing.assert_close(out["pool_3"], taps["pool"], rtol=1e-3, atol=1e-5 * scale)
    spatial = taps["spatial"][:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # ADM: [..., :7] of NHWC, flattened
    assert spatial.shape == (2, 17 * 17 * 7)
    torch.testing.assert_close(out["mixed_6/conv"], spatial, rtol=1e-3, atol=1e-5 * spatial.abs().max().item())
    logits = taps["pool"] @ tv.fc.weight.detach().T  # no bias, as ADM's softmax
    torch.testing.assert_close(out["logits"], logits, rtol=1e-3, atol=1e-4 * logits.abs().max().item())


def test_legacy_resize_is_tf1_resize_bilinear():
    # TF1 (align_corners=False, no half-pixel centres) doubling: even outputs copy, odd ones average neighbours,
    # the last one repeats the edge.
    x = torch.tensor([1.0, 3.0, 7.0, 15.0], dtype=torch.float64)
    expected = torch.tensor([1, 2, 3, 5, 7, 11, 15, 15], dtype=torch.float64)
    torch.testing.assert_close(legacy_resize_matrix(4, 8) @ x, expected)
    torch.testing.assert_close(legacy_resize_matrix(299, 299), torch.eye(299, dtype=torch.float64))
    m = legacy_resize_matrix(256, 299)
    torch.testing.assert_close(m.sum(1), torch.ones(299, dtype=torch.float64))  # convex weights per row
    model = FIDInception()
    x = model.preprocess(torch.full((1, 20, 30, 3), 200, dtype=torch.uint8))
    assert x.shape == (1, 3, 299, 299)
    torch.testing.assert_close(x, torch.full_like(x, (200 - 128) / 128))


def test_npz_images_stream_in_order(batches):
    ref, sample = batches
    for path in batches:
        full = np.load(path)["arr_0"]
        got = np.concatenate(list(NpzImages(path).batches(3)))
        np.testing.assert_array_equal(got, full)


@pytest.mark.slow
def test_evaluator_script_end_to_end(weights, batches, activations, tmp_path):
    ref, sample = batches
    out = tmp_path / "results.json"
    cmd = [sys.executable, "evaluator.py", str(ref), str(sample), "--inception-weights", str(weights)]
    cmd += ["--device", "cpu", "--batch-size", "4", "--cache-dir", str(tmp_path / "cache"), "--json-out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for line in ("Inception Score:", "FID:", "sFID:", "Precision:", "Recall:"):
        assert line in proc.stdout
    results = json.loads(out.read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-2]) == results  # the printed JSON line

    # the same numbers from the backend's activations, with FID by the low-rank closed form (N < D here):
    # tr sqrt(S1 S2) is the nuclear norm of B A^T for S1 = A^T A, S2 = B^T B
    backend, (ref_pool, ref_sp), (pool, sp) = activations
    assert sp.shape == (8, 2023) and pool.shape == (8, 2048)
    assert results["fid"] == pytest.approx(low_rank_fid(pool, ref_pool), rel=1e-4)
    assert results["sfid"] == pytest.approx(low_rank_fid(sp, ref_sp), rel=1e-4)
    assert results["fid"] > 0 and results["sfid"] > 0
    assert results["inception_score"] == pytest.approx(inception_score(backend.softmax(pool)), rel=1e-5)
    assert (results["precision"], results["recall"]) == pytest.approx(precision_recall(ref_pool, pool))
    assert results["num_ref"] == 10 and results["num_sample"] == 8

    # both batches' activations are cached, and a later call reads them back instead of running the network
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
    fresh = TorchInception(weights, "cpu")
    fresh.activations = None  # would raise if called
    cached_pool, _ = batch_activations(sample, fresh, cache=tmp_path / "cache", progress=False)
    np.testing.assert_allclose(cached_pool, pool, rtol=1e-5, atol=1e-6)


def low_rank_fid(x1, x2):
    a = (x1 - x1.mean(0)) / np.sqrt(len(x1) - 1)
    b = (x2 - x2.mean(0)) / np.sqrt(len(x2) - 1)
    diff = x1.mean(0) - x2.mean(0)
    a, b, diff = (np.asarray(v, np.float64) for v in (a, b, diff))
    return diff @ diff + (a * a).sum() + (b * b).sum() - 2 * np.linalg.svd(b @ a.T, compute_uv=False).sum()


@pytest.mark.slow  # a whole pipeline end to end
def test_precomputed_reference_statistics_are_used(batches, activations, tmp_path):
    # an ADM-format reference carrying mu/sigma/mu_s/sigma_s: those are used unless told otherwise. Here they are
    # the sample's own statistics, so FID and sFID are ~0 and precision/recall (from the images) stay exact.
    ref, sample = batches
    backend, (ref_pool, ref_sp), (pool, sp) = activations
    (mu, sigma), (mu_s, sigma_s) = activation_statistics(pool), activation_statistics(sp)
    with_stats = tmp_path / "ref_with_stats.npz"
    np.savez(with_stats, arr_0=np.load(sample)["arr_0"], mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    used = evaluate(with_stats, sample, backend, batch_size=5, cache=tmp_path / "cache", progress=False)
    assert used["ref_statistics"].startswith("precomputed")
    assert abs(used["fid"]) < 1e-6 * np.trace(sigma) and abs(used["sfid"]) < 1e-6 * np.trace(sigma_s)
    assert (used["precision"], used["recall"]) == (1.0, 1.0)
    (mu_r, _), _, source = reference_statistics(with_stats, ref_pool, ref_sp, recompute=True)
    assert source.startswith("computed") and np.allclose(mu_r, ref_pool.mean(0))


def test_bad_inputs_fail_with_one_line(weights, batches, tmp_path, script):
    ref, _ = batches
    floats = tmp_path / "floats.npz"
    np.savez(floats, arr_0=np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(UserError, match=r"uint8 \[N, H, W, 3\]"):
        NpzImages(floats)
    np.savez(tmp_path / "other.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(UserError, match="it has: images"):
        NpzImages(tmp_path / "other.npz")
    result = script("evaluator.py", ref, tmp_path / "missing.npz", "--inception-weights", weights)
    assert result.code == 2 and result.err.strip().startswith("error:") and "no such batch file" in result.err


def test_missing_weights_offline_say_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFCOMPRESS_CACHE", str(tmp_path))
    url = "http://127.0.0.1:9/pt_inception.pth"  # nothing listens on the discard port: fails at once
    with pytest.raises(UserError) as e:
        fetch_weights(None, "pt_inception.pth", url, "FID Inception weights", "--inception-weights")
    assert url in str(e.value) and str(tmp_path / "pt_inception.pth") in str(e.value)
    assert not list(tmp_path.iterdir())  # no partial file left behind
    with pytest.raises(UserError, match="no such file"):
        fetch_weights(tmp_path / "nope.pth", "x", url, "FID Inception weights", "--inception-weights")
    (tmp_path / "pt_inception.pth").write_bytes(b"cached")
    assert fetch_weights(None, "pt_inception.pth", url, "w", "--w") == tmp_path / "pt_inception.pth"


class StubBackend:
    """Features without a network: pool [N, 6] and spatial [N, 5] from the pixels; counts its calls."""

    name = "stub"

    def __init__(self):
        self.calls = 0

    def identity(self) -> str:
        return "stub:1"

    def activations(self, images):
        self.calls += 1
        x = np.asarray(images, np.float32).reshape(len(images), -1)
        return x[:, :6] / 255, x[:, 6:11] / 255

    def softmax(self, pool):
        e = np.exp(pool)
        return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize("how", ["garbage", "empty", "nan", "keys", "count", "ints"])
def test_a_broken_activation_cache_is_said_and_rebuilt(tmp_path, capsys, how):
    from diffcompress.adm_eval import _cache_file

    path = tmp_path / "batch.npz"
    np.savez(path, arr_0=random_images(5, 1, size=8))
    backend, cache = StubBackend(), tmp_path / "cache"
    pool, spatial = batch_activations(path, backend, cache=cache, progress=False)
    cached = _cache_file(path, backend, cache)
    if how == "garbage":
        cached.write_bytes(b"PK\x03\x04 garbage")
    elif how == "empty":
        cached.write_bytes(b"")
    elif how == "nan":
        np.savez(cached, pool=np.full_like(pool, np.nan), spatial=spatial)
    elif how == "keys":
        np.savez(cached, features=pool)
    elif how == "count":
        np.savez(cached, pool=pool[:3], spatial=spatial[:3])
    else:
        np.savez(cached, pool=pool.astype(np.int64), spatial=spatial)
    capsys.readouterr()
    again, _ = batch_activations(path, backend, cache=cache, progress=False)
    out = capsys.readouterr().out
    assert f"activation cache {cached} is not usable" in out and "recomputing it" in out
    assert backend.calls == 2 and np.array_equal(again, pool)
    batch_activations(path, backend, cache=cache, progress=False)  # rebuilt: read back, the network not run
    assert backend.calls == 2 and "reusing activations" in capsys.readouterr().out


def test_non_finite_activations_and_results_are_refused(tmp_path):
    path = tmp_path / "batch.npz"
    np.savez(path, arr_0=random_images(5, 1, size=8))
    backend = StubBackend()
    backend.activations = lambda images: (np.full((len(images), 6), np.nan, np.float32), np.zeros((len(images), 5)))
    with pytest.raises(UserError, match="batch.npz: the stub Inception gave NaN or inf activations"):
        batch_activations(path, backend, progress=False)
    assert not (tmp_path / "cache").exists()


def test_mismatched_batches_and_bad_reference_statistics_are_named(tmp_path):
    from diffcompress.adm_eval import check_batches, precomputed_statistics

    ref, other = tmp_path / "ref.npz", tmp_path / "sample.npz"
    np.savez(ref, arr_0=random_images(5, 1, size=8), mu=np.zeros(6), sigma=np.eye(6), mu_s=np.zeros(5),
             sigma_s=np.eye(5))  # fmt: skip
    np.savez(other, arr_0=random_images(5, 2, size=16))
    with pytest.raises(UserError, match=r"ref.npz holds 8x8 images but sample .*sample.npz holds 16x16"):
        check_batches(NpzImages(ref), NpzImages(other))
    assert precomputed_statistics(ref)[0][0].shape == (6,)
    bad = dict(np.load(ref))
    bad["sigma"] = np.full((6, 6), np.inf)
    np.savez(ref, **bad)
    with pytest.raises(UserError, match="ref.npz: precomputed statistic sigma holds NaN or inf"):
        precomputed_statistics(ref)
    # the stub's statistics are used (no network): an honest run gives finite numbers, identical sets FID ~ 0
    np.savez(ref, arr_0=random_images(6, 1, size=8))
    results = evaluate(ref, ref, StubBackend(), progress=False)
    assert abs(results["fid"]) < 1e-9 and results["num_ref"] == 6


def test_aptp_reference_cache_is_rebuilt_and_a_given_file_checked(tmp_path):
    from aptp.evaluate import embeddings_problem, reference, stats_problem
    from aptp.metrics import save_npz

    ref_files = [tmp_path / "a.png"]
    Image.new("RGB", (4, 4)).save(ref_files[0])
    computed = []

    def compute(files):
        computed.append(len(files))
        return {"mu": np.zeros(3), "sigma": np.eye(3)}, {"num_images": len(files)}

    notes = []
    cache = tmp_path / "stats.npz"
    for broken in (b"PK\x03\x04 garbage", b""):
        cache.write_bytes(broken)
        arrays, _ = reference("FID", cache, "--ref-stats", ref_files, {"mode": "x"}, compute, notes.append,
                              stats_problem)  # fmt: skip
        assert "is not usable (unreadable" in notes[-2] and "recomputing it" in notes[-2]
    save_npz(cache, {"mu": np.array([np.nan, 0, 0]), "sigma": np.eye(3)}, {"mode": "x"})
    reference("FID", cache, "--ref-stats", ref_files, {"mode": "x"}, compute, notes.append, stats_problem)
    assert "mu holds NaN or inf values" in notes[-2] and len(computed) == 3
    assert np.isfinite(np.load(cache)["mu"]).all()
    np.savez(cache, mu=np.zeros(3), sigma=np.eye(4))  # clean-fid's format, given alone: checked, not rebuilt
    with pytest.raises(UserError, match=r"--ref-stats .*stats.npz: mu \[3\] and sigma \[4, 4\] are not"):
        reference("FID", cache, "--ref-stats", None, {}, compute, notes.append, stats_problem)
    np.savez(cache, embeddings=np.full((2, 3), np.inf))
    with pytest.raises(UserError, match="--ref-embeddings .*embeddings hold NaN or inf"):
        reference("CMMD", cache, "--ref-embeddings", None, {}, compute, notes.append, embeddings_problem)
