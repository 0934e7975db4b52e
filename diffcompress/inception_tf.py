"""The ADM evaluator's own Inception: the frozen TensorFlow graph ``classify_image_graph_def.pb``, run by TensorFlow.

This is ``evaluator.py --backend tf``, for numbers bit-for-bit comparable with guided-diffusion's
``evaluations/evaluator.py``. It does what that evaluator does: uint8 images are fed as float32 in [0, 255] in
place of the graph's ``ExpandDims:0`` (the graph resizes to 299 and normalises itself); features are ``pool_3:0``
(2048-d) and the first 7 channels of ``mixed_6/conv:0`` flattened in NHWC order (17 * 17 * 7 = 2023-d, sFID);
class probabilities are ``softmax(pool_3 @ W)`` with W the weight of ``softmax/logits/MatMul`` and no bias.

TensorFlow is optional (``requirements-tf.txt``) and imported only when this backend is built.
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

from .downloads import fetch_weights, file_digest
from .errors import UserError

GRAPH_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/classify_image_graph_def.pb"
GRAPH_FILE = "classify_image_graph_def.pb"
INPUT_NAME = "ExpandDims:0"
POOL_NAME = "pool_3:0"
SPATIAL_NAME = "mixed_6/conv:0"
LOGITS_OP = "softmax/logits/MatMul"
SPATIAL_CHANNELS = 7


# Printed by TF's C++ at import whatever TF_CPP_MIN_LOG_LEVEL says; everything else it prints is passed on.
_IMPORT_NOISE = ("absl::InitializeLog()", "oneDNN custom operations are on")


def _import_tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before the import: hide TF's C++ info and warnings
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile("w+b") as captured:
            os.dup2(captured.fileno(), 2)  # C++ writes to fd 2 directly, so sys.stderr cannot intercept it
            try:
                import tensorflow as tf
            finally:
                os.dup2(saved, 2)
                captured.seek(0)
                lines = captured.read().decode(errors="replace").splitlines(keepends=True)
                sys.stderr.write("".join(x for x in lines if not any(n in x for n in _IMPORT_NOISE)))
    except ImportError as e:
        raise UserError(
            f"--backend tf needs tensorflow ({e}): pip install -r requirements-tf.txt, or use --backend torch"
        ) from e
    finally:
        os.close(saved)
    tf.get_logger().setLevel("ERROR")
    return tf


class TFInception:
    """``activations`` (pool_3, sFID features) and ``softmax`` of pool_3, computed by the original frozen graph."""

    name = "tf"

    def __init__(self, graph_path: str | os.PathLike | None = None):
        tf = _import_tf()
        path = fetch_weights(graph_path, GRAPH_FILE, GRAPH_URL, "ADM Inception graph", "--inception-graph")
        graph_def = tf.compat.v1.GraphDef()
        try:
            graph_def.ParseFromString(path.read_bytes())
        except Exception as e:  # protobuf's DecodeError: a truncated download or not a GraphDef at all
            raise UserError(f"--inception-graph {path}: not a TensorFlow GraphDef ({type(e).__name__})") from e
        # The graph was frozen with batch size 1 and records that in `_output_shapes` hints, which TF 2 imports as
        # static shapes; dropping them lets shape inference start from the batch-agnostic input below instead
        # (what ADM's `_update_shapes` patches after the import).
        for node in graph_def.node:
            if "_output_shapes" in node.attr:
                del node.attr["_output_shapes"]

        self.graph = tf.Graph()
        with self.graph.as_default():
            self._images = tf.compat.v1.placeholder(tf.float32, [None, None, None, 3], name="images")
            try:
                pool, spatial, matmul = tf.compat.v1.import_graph_def(
                    graph_def,
                    input_map={INPUT_NAME: self._images},
                    return_elements=[POOL_NAME, SPATIAL_NAME, LOGITS_OP],
                    name="inception",
                )
            except (ValueError, KeyError) as e:
                raise UserError(f"--inception-graph {path}: not the ADM Inception graph ({e})") from e
            self._pool, self._spatial = pool, spatial[..., :SPATIAL_CHANNELS]
            w = matmul.inputs[1]
            self._pool_in = tf.compat.v1.placeholder(tf.float32, [None, w.shape[0]], name="pool")
            self._probs = tf.nn.softmax(tf.matmul(self._pool_in, w))

        # Threads follow OMP_NUM_THREADS when set (0 = TF's default); a GPU build takes memory as it needs it.
        threads = int(os.environ.get("OMP_NUM_THREADS") or 0)
        config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=threads, inter_op_parallelism_threads=threads)
        config.gpu_options.allow_growth = True
        self.session = tf.compat.v1.Session(graph=self.graph, config=config)
        self._identity = f"tf:{file_digest(path)}"

    def identity(self) -> str:
        return self._identity

    def activations(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"need [N, H, W, 3] images, got shape {images.shape}")
        pool, spatial = self.session.run([self._pool, self._spatial], {self._images: images.astype(np.float32)})
        n = len(images)  # flattened in NHWC order, as ADM does
        return pool.reshape(n, -1).astype(np.float32), spatial.reshape(n, -1).astype(np.float32)

    def softmax(self, pool: np.ndarray) -> np.ndarray:
        return self.session.run(self._probs, {self._pool_in: np.asarray(pool, np.float32)})
