"""The tf backend (the ADM evaluator's frozen Inception graph) on a tiny frozen graph with the real tensor names,
checked against the same arithmetic in numpy, and evaluator.py --backend tf end to end."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from diffcompress.errors import UserError

from .conftest import ROOT

SIZE = 12  # the tiny graph's resize target (299 in the real one)
C1, C6, D, K = 8, 9, 10, 5  # stem, mixed_6/conv, pool_3 and class counts
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="module")
def tf():
    try:
        import tensorflow
    except ImportError as e:
        if os.environ.get("DIFFCOMPRESS_REQUIRE_TF") == "1":
            pytest.fail(f"DIFFCOMPRESS_REQUIRE_TF=1 but tensorflow does not import ({e})")
        pytest.skip("tensorflow not installed (pip install -r requirements-tf.txt)")
    return tensorflow


@pytest.fixture(scope="module")
def weights():
    rng = np.random.default_rng(0)
    return {
        "conv": rng.normal(0, 0.3, (3, 3, 3, C1)).astype(np.float32),
        "conv_b": rng.normal(0, 0.1, C1).astype(np.float32),
        "mixed_6": rng.normal(0, 0.5, (1, 1, C1, C6)).astype(np.float32),
        "mixed_10": rng.normal(0, 0.5, (1, 1, C6, D)).astype(np.float32),
        "softmax_w": rng.normal(0, 1.0, (D, K)).astype(np.float32),
        "softmax_b": np.linspace(-3, 3, K).astype(np.float32),  # in the graph, ignored by ADM's softmax
    }


@pytest.fixture(scope="module")
def graph_file(tf, weights, tmp_path_factory):
    """A frozen GraphDef shaped like classify_image_graph_def.pb: a single uint8 image expanded to batch 1 (so the
    recorded shapes have batch 1), a legacy bilinear resize, (x - 128) / 128, convs, pool_3 and a bias-added softmax."""
    v1, w = tf.compat.v1, weights
    g = tf.Graph()
    with g.as_default():
        image = v1.placeholder(tf.uint8, [None, None, 3], name="DecodeJpeg")
        x = tf.expand_dims(tf.cast(image, tf.float32, name="Cast"), 0, name="ExpandDims")
        x = tf.raw_ops.ResizeBilinear(images=x, size=tf.constant([SIZE, SIZE]), name="ResizeBilinear")  # TF1 legacy
        x = tf.multiply(tf.subtract(x, 128.0, name="Sub"), 1 / 128, name="Mul")
        x = tf.nn.conv2d(x, tf.constant(w["conv"]), 1, "VALID", name="conv/Conv2D")
        x = tf.nn.relu(tf.nn.bias_add(x, tf.constant(w["conv_b"]), name="conv/batchnorm"), name="conv")
        x = tf.nn.conv2d(x, tf.constant(w["mixed_6"]), 1, "VALID", name="mixed_6/conv/Conv2D")
        x = tf.nn.relu(x, "mixed_6/conv")
        x = tf.nn.relu(tf.nn.conv2d(x, tf.constant(w["mixed_10"]), 1, "VALID", name="mixed_10/conv"), "mixed_10/join")
        x = tf.nn.avg_pool2d(x, SIZE - 2, 1, "VALID", name="pool_3")
        x = tf.reshape(x, tf.constant([1, D]), name="pool_3/_reshape")  # batch 1 baked in, as in the real graph
        x = tf.matmul(x, tf.constant(w["softmax_w"], name="softmax/weights"), name="softmax/logits/MatMul")
        x = tf.nn.bias_add(x, tf.constant(w["softmax_b"], name="softmax/biases"), name="softmax/logits")
        tf.nn.softmax(x, name="softmax")
    path = tmp_path_factory.mktemp("graph") / "tiny_graph_def.pb"
    path.write_bytes(g.as_graph_def(add_shapes=True).SerializeToString())
    return path


def legacy_resize(n_in: int, n_out: int) -> np.ndarray:
    """TF1 ResizeBilinear weights (no corner alignment, no half-pixel offset) as an [n_out, n_in] matrix."""
    src = np.arange(n_out) * (n_in / n_out)
    lo = np.floor(src).astype(int)
    hi, frac = np.minimum(lo + 1, n_in - 1), src - lo
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m


def conv_valid(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    kh, kw = k.shape[:2]
    h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    return sum(np.einsum("nhwc,co->nhwo", x[:, a : a + h, b : b + w], k[a, b]) for a in range(kh) for b in range(kw))


def reference(images: np.ndarray, w: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    relu = lambda t: np.maximum(t, 0)
    x = images.astype(np.float64)
    x = np.einsum("oh,nhwc,pw->nopc", legacy_resize(x.shape[1], SIZE), x, legacy_resize(x.shape[2], SIZE))
    x = (x - 128) / 128
    x = relu(conv_valid(x, w["conv"]) + w["conv_b"])
    mixed_6 = relu(conv_valid(x, w["mixed_6"]))
    pool = relu(conv_valid(mixed_6, w["mixed_10"])).mean(axis=(1, 2))
    spatial = mixed_6[..., :7].reshape(len(images), -1)  # NHWC order, as ADM's reshape of the TF tensor
    logits = pool @ w["softmax_w"]  # no bias, as ADM
    probs = np.exp(logits - logits.max(1, keepdims=True))
    return pool, spatial, probs / probs.sum(1, keepdims=True)


@pytest.fixture(scope="module")
def backend(graph_file):
    from diffcompress.inception_tf import TFInception

    return TFInception(str(graph_file))


@pytest.mark.parametrize("n", [1, 5])
def test_matches_numpy_reference(backend, weights, n):
    images = np.random.default_rng(n).integers(0, 256, (n, 20, 14, 3), dtype=np.uint8)
    pool, spatial = backend.activations(images)
    ref_pool, ref_spatial, ref_probs = reference(images, weights)
    assert pool.dtype == spatial.dtype == np.float32
    assert pool.shape == (n, D) and spatial.shape == (n, (SIZE - 2) ** 2 * 7)
    np.testing.assert_allclose(pool, ref_pool, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(spatial, ref_spatial, rtol=1e-4, atol=1e-5)
    probs = backend.softmax(pool)
    assert probs.shape == (n, K)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-4, atol=1e-6)


def test_batch_independent(backend):
    images = np.random.default_rng(7).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    pool, spatial = backend.activations(images)
    one = [backend.activations(images[i : i + 1]) for i in range(4)]
    np.testing.assert_allclose(pool, np.concatenate([p for p, _ in one]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(spatial, np.concatenate([s for _, s in one]), rtol=1e-5, atol=1e-6)


def test_identity_is_graph_digest(backend, graph_file):
    assert backend.name == "tf"
    assert backend.identity() == "tf:" + hashlib.sha256(graph_file.read_bytes()).hexdigest()[:16]


def test_bad_graph_files(tf, tmp_path):
    from diffcompress.inception_tf import TFInception

    with pytest.raises(UserError, match="--inception-graph .*no such file"):
        TFInception(str(tmp_path / "missing.pb"))
    (tmp_path / "junk.pb").write_bytes(b"\xff" * 64)
    with pytest.raises(UserError, match="not a TensorFlow GraphDef"):
        TFInception(str(tmp_path / "junk.pb"))
    g = tf.Graph()
    with g.as_default():
        tf.constant(1.0, name="ExpandDims")
    (tmp_path / "other.pb").write_bytes(g.as_graph_def().SerializeToString())
    with pytest.raises(UserError, match="not the ADM Inception graph"):
        TFInception(str(tmp_path / "other.pb"))


def test_missing_tensorflow_is_a_user_error(monkeypatch):
    from diffcompress.inception_tf import TFInception

    monkeypatch.setitem(sys.modules, "tensorflow", None)  # makes `import tensorflow` raise ImportError
    with pytest.raises(UserError, match=r"pip install -r requirements-tf\.txt, or use --backend torch"):
        TFInception()


@pytest.mark.slow
def test_evaluator_tf_backend(graph_file, tmp_path):
    rng = np.random.default_rng(0)
    ref, sample, out = tmp_path / "ref.npz", tmp_path / "sample.npz", tmp_path / "out.json"
    np.savez(ref, arr_0=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8))
    np.savez(sample, arr_0=rng.integers(64, 192, (20, 32, 32, 3), dtype=np.uint8))
    flags = ["--backend", "tf", "--inception-graph", str(graph_file), "--device", "cpu", "--no-cache"]
    cmd = [sys.executable, str(ROOT / "evaluator.py"), str(ref), str(sample), *flags, "--json-out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(out.read_text())
    for key in ("inception_score", "fid", "sfid", "precision", "recall"):
        assert np.isfinite(metrics[key]), (key, metrics)
    assert metrics["fid"] > 1e-3 and metrics["sfid"] > 1e-3

    from evaluator import main, parse_args  # in process: tensorflow is already loaded here

    same = main(parse_args([str(ref), str(ref), *flags]))
    # ~0 up to float32 features and the square root of a rank-deficient (20 images) covariance
    assert abs(same["fid"]) < 1e-6 * metrics["fid"] and abs(same["sfid"]) < 1e-4 * metrics["sfid"]
    assert same["precision"] == same["recall"] == 1.0
