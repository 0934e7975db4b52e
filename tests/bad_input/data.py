"""Rows of tests/test_bad_input.py: data (images of any mode, labels, empty classes and captions, errors raised in
DataLoader workers, unreadable manifests, arrays, JSON and TSV files).

extract_features.py runs with ``--vae none`` on 8-pixel images (the features are the pixels), train.py on toy latents
that fail before or at the first step, aptp.prune on a tiny Stable Diffusion built once per process (the captions
are read, and refused, before any training)."""

from __future__ import annotations

import functools
import io
import json
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from tests.bad_input import NAMED, ROOT, SILENT, TRACEBACK, Case, Result

_WORLD = Path(tempfile.mkdtemp(prefix="bad-input-data-"))
PIXELS = (np.arange(8 * 8 * 3).reshape(8, 8, 3) * 7 % 256).astype(np.uint8)  # known 8-bit pixels
TINY = ["--model", "DiT-Ti/4", "--num-classes", "4", "--global-batch-size", "8", "--log-every", "1",
        "--ckpt-every", "1000", "--max-steps", "1"]  # fmt: skip


# ------------------------------------------------------------------------------------------- images


def png16(path: Path, arr: np.ndarray) -> Path:
    """A 16-bit PNG written byte by byte (PIL cannot write 16-bit RGB): gray [H, W] or RGB [H, W, 3] uint16."""
    h, w = arr.shape[:2]
    color = 0 if arr.ndim == 2 else {3: 2, 4: 6, 2: 4}[arr.shape[2]]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, color, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )
    return path


def image_pair(write):
    """Class ``a`` holds the odd image (written by ``write(path_stem)``), class ``b`` the expected 8-bit RGB PNG of
    the same pixels (``write`` returns them): extraction must give both the same features."""

    def prepare(tmp: Path) -> list[object]:
        for c in ("a", "b"):
            (tmp / "images" / c).mkdir(parents=True)
        expected = write(tmp / "images" / "a" / "odd")
        Image.fromarray(expected, "RGB").save(tmp / "images" / "b" / "ref.png")
        return ["extract_features.py", "--data-path", tmp / "images", "--features-path", tmp / "features",
                "--vae", "none", "--image-size", "8", "--num-workers", "0", "--device", "cpu"]  # fmt: skip

    return prepare


def same_features(tmp: Path, result: Result) -> None:
    feats = tmp / "features" / "imagenet8_features"
    a, b = np.load(feats / "0.npy"), np.load(feats / "1.npy")
    assert np.array_equal(a, b), f"the converted image differs by up to {np.abs(a - b).max() * 127.5:.1f} levels"
    assert "skipped" not in result.out


def gray16(stem: Path) -> np.ndarray:
    gray = PIXELS[..., 0]
    Image.fromarray(gray.astype(np.uint16) * 257).save(stem.with_suffix(".png"))  # mode I;16
    return np.repeat(gray[..., None], 3, axis=2)


def rgb16(stem: Path) -> np.ndarray:
    png16(stem.with_suffix(".png"), PIXELS.astype(np.uint16) * 257)
    return PIXELS


def gray16_shifted(stem: Path) -> np.ndarray:  # the other 8 -> 16-bit convention: v << 8
    gray = PIXELS[..., 1]
    png16(stem.with_suffix(".png"), gray.astype(np.uint16) << 8)
    return np.repeat(gray[..., None], 3, axis=2)


def pgm16(stem: Path) -> np.ndarray:  # mode I in Pillow
    gray = PIXELS[..., 2]
    stem.with_suffix(".pgm").write_bytes(b"P5\n8 8\n65535\n" + (gray.astype(">u2") * 257).tobytes())
    return np.repeat(gray[..., None], 3, axis=2)


def tiff16(stem: Path) -> np.ndarray:
    gray = PIXELS[..., 0]
    Image.fromarray(gray.astype(np.uint16) * 257).save(stem.with_suffix(".tif"))
    return np.repeat(gray[..., None], 3, axis=2)


def gray_alpha(stem: Path) -> np.ndarray:  # LA: the alpha is dropped, the gray kept
    gray = PIXELS[..., 0]
    Image.fromarray(np.stack([gray, 255 - gray], axis=2), "LA").save(stem.with_suffix(".png"))
    return np.repeat(gray[..., None], 3, axis=2)


def palette_transparent(stem: Path) -> np.ndarray:  # P with a transparent entry: its colour kept
    img = Image.fromarray(PIXELS).quantize(16)
    img.info["transparency"] = 0
    img.save(stem.with_suffix(".png"), transparency=0)
    return np.asarray(img.convert("RGB"))


def one_bit(stem: Path) -> np.ndarray:
    bits = PIXELS[..., 0] > 100
    Image.fromarray(bits).convert("1").save(stem.with_suffix(".png"))
    return np.repeat((bits * 255).astype(np.uint8)[..., None], 3, axis=2)


def extract_refuses(write, *flags: str):
    def prepare(tmp: Path) -> list[object]:
        (tmp / "images" / "a").mkdir(parents=True)
        Image.fromarray(PIXELS).save(tmp / "images" / "a" / "good.png")
        write(tmp / "images" / "a")
        return ["extract_features.py", "--data-path", tmp / "images", "--features-path", tmp / "features",
                "--vae", "none", "--image-size", "8", "--num-workers", "0", "--device", "cpu", *flags]  # fmt: skip

    return prepare


def float_tiff(folder: Path) -> None:
    Image.fromarray(PIXELS[..., 0].astype(np.float32) / 255).save(folder / "float.tif")  # mode F


def int32_tiff(folder: Path) -> None:
    Image.fromarray(PIXELS[..., 0].astype(np.int32) * 1000).save(folder / "wide.tif")  # mode I, beyond 16 bits


def skipped_and_named(name: str):
    def check(tmp: Path, result: Result) -> None:
        assert "skipped 1 unreadable images" in result.out and name in result.out, result.out
        manifest = json.loads((tmp / "features" / "manifest.json").read_text())
        assert manifest["skipped"] == 1 and manifest["skipped_paths"][0].endswith(name)

    return check


# ------------------------------------------------------------------------------------------- empty class folders


def empty_class(*flags: str):
    def prepare(tmp: Path) -> list[object]:
        for c in ("a", "b", "c"):
            (tmp / "images" / c).mkdir(parents=True)
        for c in ("a", "c"):
            Image.fromarray(PIXELS).save(tmp / "images" / c / "x.png")
        return ["extract_features.py", "--data-path", tmp / "images", "--features-path", tmp / "features",
                "--vae", "none", "--image-size", "8", "--num-workers", "0", "--device", "cpu", *flags]  # fmt: skip

    return prepare


def empty_class_reported(tmp: Path, result: Result) -> None:
    assert "1 of the 3 class folders" in result.out and "(e.g. b)" in result.out, result.out
    manifest = json.loads((tmp / "features" / "manifest.json").read_text())
    assert manifest["empty_classes"] == ["b"] and manifest["num_classes"] == 3
    labels = [int(np.load(tmp / "features" / "imagenet8_labels" / f"{i}.npy")[0]) for i in range(2)]
    assert labels == [0, 2], "the labels of the other classes must not shift"


def nothing_extracted(tmp: Path, result: Result) -> None:
    assert not (tmp / "features").exists()


# ------------------------------------------------------------------------------------------- features and labels


def packed(tmp: Path, labels=None, features=None, manifest=None) -> Path:
    root = tmp / "features"
    root.mkdir(exist_ok=True)
    x = np.random.default_rng(0).standard_normal((8, 2, 4, 8, 8)).astype(np.float32)
    np.save(root / "features.npy", x if features is None else features)
    if isinstance(labels, bytes):
        (root / "labels.npy").write_bytes(labels)
    else:
        np.save(root / "labels.npy", np.arange(8) % 4 if labels is None else labels, allow_pickle=True)
    if manifest is not None:
        (root / "manifest.json").write_text(manifest)
    return root


def files_layout(tmp: Path, label_of=None, feature_of=None) -> Path:
    """8 feature/label file pairs; ``label_of(i)`` / ``feature_of(i)`` may replace a file's content (bytes or array)."""
    root = tmp / "features"
    (root / "imagenet64_features").mkdir(parents=True)
    (root / "imagenet64_labels").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        for sub, value in (
            ("imagenet64_features", (feature_of or (lambda i: None))(i)),
            ("imagenet64_labels", (label_of or (lambda i: None))(i)),
        ):
            file = root / sub / f"{i}.npy"
            if value is None:
                value = rng.standard_normal((2, 4, 8, 8)).astype(np.float32) if "features" in sub else np.array([i % 4])
            if isinstance(value, bytes):
                file.write_bytes(value)
            else:
                np.save(file, value)
    return root


def train_on(make, *flags: str):
    """train.py on the features ``make(tmp)`` builds; the default --num-workers (4) unless ``flags`` say otherwise."""
    return lambda tmp: ["train.py", *TINY, "--data-path", make(tmp), "--device", "cpu", *flags]


def no_run(tmp: Path, result: Result) -> None:
    assert not (tmp / "outputs").exists() or not any((tmp / "outputs").rglob("*.pt")), "a refused run saved"


# ------------------------------------------------------------------------------------------- APTP captions


@functools.cache
def tiny_sd() -> Path:
    from aptp.make_tiny import build_tiny_sd

    build_tiny_sd(_WORLD / "sd", 0)
    return _WORLD / "sd"


def cc3m(tmp: Path, captions: list[bytes]) -> Path:
    """A CC3M-layout folder whose TSV lines have the given caption bytes, each with an 8-pixel JPEG."""
    from aptp.make_tiny import cc3m_image_name

    root = tmp / "cc3m"
    (root / "training").mkdir(parents=True)
    (root / "validation").mkdir()
    lines = []
    for row, caption in enumerate(captions):
        url = f"http://images.example.com/training/{row}.jpg"
        lines.append(caption + b"\t" + url.encode() + b"\n")
        Image.fromarray(PIXELS).save(root / "training" / cc3m_image_name(row, url), format="JPEG")
    (root / "Train_GCC-training.tsv").write_bytes(b"".join(lines))
    (root / "Validation_GCC-1.1.0-Validation.tsv").write_bytes(b"")
    return root


def coco(tmp: Path, annotations: str | bytes) -> Path:
    root = tmp / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "images" / "train2014").mkdir(parents=True)
    Image.fromarray(PIXELS).save(root / "images" / "train2014" / "COCO_train2014_000000000001.jpg")
    file = root / "annotations" / "captions_train2014.json"
    file.write_bytes(annotations if isinstance(annotations, bytes) else annotations.encode())
    return root


def aptp_prune(make_data, dataset: str = "cc3m", *overrides: str):
    def prepare(tmp: Path) -> list[object]:
        data = make_data(tmp)
        return ["aptp.prune", "--config", ROOT / "configs/aptp/pruning/tiny.yaml",
                f"pretrained_model_name_or_path={tiny_sd()}", f"data.dataset_name={dataset}", f"data.data_dir={data}",
                f"output_dir={tmp / 'run'}", f"model.prompt_encoder={tmp / 'no-encoder'}",
                f"data.embedding_cache_dir={tmp / 'cache'}", "data.dataloader_num_workers=0", *overrides]  # fmt: skip

    return prepare


def nothing_pruned(tmp: Path, result: Result) -> None:
    from tests.aptp_helpers import reset_accelerate

    reset_accelerate()
    assert not (tmp / "cache").exists(), "prompt embeddings computed for refused captions"
    assert not (tmp / "run" / "router.pt").exists() and not list(tmp.glob("run/checkpoints/*"))


GOOD = [b"a red square on the left", b"a blue circle", b"a green square"]
LATIN1_COCO = b'{"annotations": [{"id": 1, "image_id": 1, "caption": "caf\xe9"}]}'


def truncated_npy() -> bytes:
    """A float32 [2, 4, 8, 8] .npy file cut in the middle of its data (a copy killed mid-way)."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2, 4, 8, 8), np.float32))
    return buffer.getvalue()[:300]


def label_file(index: int, value):
    return lambda t: files_layout(t, label_of=lambda i: value if i == index else None)


def feature_file(index: int, value):
    return lambda t: files_layout(t, feature_of=lambda i: value if i == index else None)


def packed_then(edit):
    """Packed features, then ``edit(folder)`` breaks a file."""

    def make(tmp: Path) -> Path:
        root = packed(tmp)
        edit(root)
        return root

    return make


def npz_as_labels(root: Path) -> None:
    np.savez(root / "x.npz", a=np.arange(8))
    (root / "x.npz").replace(root / "labels.npy")


def truncate_features(root: Path) -> None:
    (root / "features.npy").write_bytes((root / "features.npy").read_bytes()[:300])


def corrupt_manifest_before_extract(tmp: Path) -> list[object]:
    argv = empty_class()(tmp)
    (tmp / "features").mkdir()
    (tmp / "features" / "manifest.json").write_bytes(b"\xff\xfe{")
    return argv


CASES: list[Case] = [
    # 16-bit and other non-8-bit images: the same features as the 8-bit image, or refused with the file named
    Case("data-image-16bit-gray-png", SILENT, image_pair(gray16), code=0, check=same_features),
    Case("data-image-16bit-rgb-png", SILENT, image_pair(rgb16), code=0, check=same_features),
    Case("data-image-16bit-gray-shifted", SILENT, image_pair(gray16_shifted), code=0, check=same_features),
    Case("data-image-16bit-pgm-mode-I", SILENT, image_pair(pgm16), code=0, check=same_features),
    Case("data-image-16bit-tiff", SILENT, image_pair(tiff16), code=0, check=same_features),
    Case("data-image-gray-alpha", SILENT, image_pair(gray_alpha), code=0, check=same_features),
    Case("data-image-palette-transparency", SILENT, image_pair(palette_transparent), code=0, check=same_features),
    Case("data-image-1-bit", SILENT, image_pair(one_bit), code=0, check=same_features),
    Case(
        "data-image-float-skipped-and-named",
        SILENT,
        extract_refuses(float_tiff),
        code=0,
        check=skipped_and_named("float.tif"),
    ),  # fmt: skip
    Case(
        "data-image-float-strict",
        NAMED,
        extract_refuses(float_tiff, "--strict"),
        words=("float.tif", "float", "--strict"),
    ),
    Case("data-image-int32-strict", NAMED, extract_refuses(int32_tiff, "--strict"), words=("wide.tif", "0..65535")),
    # labels: integers (or whole floats) in 0..num_classes-1, else refused with the file named
    Case(
        "data-label-float-packed",
        SILENT,
        train_on(lambda t: packed(t, labels=np.arange(8) % 4 + 0.7)),
        words=("labels.npy", "0.7", "integer"),
    ),  # fmt: skip
    Case(
        "data-label-out-of-range-packed",
        SILENT,
        train_on(lambda t: packed(t, labels=np.arange(8) % 5)),
        words=("labels.npy", "4", "--num-classes 4"),
        check=no_run,
    ),  # fmt: skip
    Case(
        "data-label-negative-packed",
        SILENT,
        train_on(lambda t: packed(t, labels=np.arange(8) % 4 - 1)),
        words=("labels.npy", "-1", ">= 0"),
    ),  # fmt: skip
    Case(
        "data-label-null-class-file",
        SILENT,
        train_on(label_file(5, np.array([4]))),
        words=("imagenet64_labels/5.npy", "0..3", "--num-classes 4", "DataLoader worker"),
        check=no_run,
    ),  # fmt: skip
    Case(
        "data-label-float-file",
        SILENT,
        train_on(label_file(2, np.array([1.5])), "--num-workers", "0"),
        words=("imagenet64_labels/2.npy", "1.5"),
    ),  # fmt: skip
    Case(
        "data-label-beyond-manifest",
        SILENT,
        train_on(lambda t: packed(t, labels=np.arange(8) % 4, manifest=json.dumps({"num_classes": 3}))),
        words=("labels.npy", "manifest.json"),
    ),  # fmt: skip
    Case(
        "data-label-text-packed",
        NAMED,
        train_on(lambda t: packed(t, labels=np.array(["cat"] * 8))),
        words=("labels.npy", "integer"),
    ),  # fmt: skip
    # empty class folders: counted and reported, or refused by --on-empty fail
    Case("data-empty-class-reported", SILENT, empty_class(), code=0, check=empty_class_reported),
    Case(
        "data-empty-class-fail",
        SILENT,
        empty_class("--on-empty", "fail"),
        words=("1 of the 3 class folders", "--on-empty"),
        check=nothing_extracted,
    ),  # fmt: skip
    # errors raised inside DataLoader workers (label-null-class-file above runs the default --num-workers 4): one line
    # naming the file; the other broken files read in the main process (each worker row costs torch's 5 s shutdown)
    Case(
        "data-worker-garbage-label-file",
        TRACEBACK,
        train_on(label_file(3, b"\x93NUMPY garbage"), "--num-workers", "1"),
        words=("imagenet64_labels/3.npy", "DataLoader worker"),
    ),  # fmt: skip
    Case(
        "data-truncated-features-file",
        TRACEBACK,
        train_on(feature_file(6, truncated_npy()), "--num-workers", "0"),
        words=("imagenet64_features/6.npy", "not a readable .npy"),
    ),  # fmt: skip
    Case(
        "data-nan-features-file",
        TRACEBACK,
        train_on(feature_file(1, np.full((2, 4, 8, 8), np.nan, np.float32)), "--num-workers", "0"),
        words=("imagenet64_features/1.npy", "NaN"),
    ),  # fmt: skip
    Case(
        "data-wrong-shape-features-file",
        TRACEBACK,
        train_on(feature_file(7, np.zeros((2, 4, 4, 4), np.float32)), "--num-workers", "0"),
        words=("imagenet64_features/7.npy", "view(s)"),
    ),  # fmt: skip
    Case(
        "data-pickled-label-file",
        TRACEBACK,
        train_on(label_file(4, np.array([{"label": 1}], dtype=object)), "--num-workers", "0"),
        words=("imagenet64_labels/4.npy", "pickle"),
    ),  # fmt: skip
    # one line naming the file and what was expected: JSON, np.load, dtypes and shapes, TSV encodings
    Case(
        "data-manifest-not-json",
        NAMED,
        train_on(lambda t: packed(t, manifest='{"num_classes": 4,')),
        words=("manifest.json", "JSON"),
    ),  # fmt: skip
    Case(
        "data-manifest-a-list",
        NAMED,
        train_on(lambda t: packed(t, manifest="[1, 2]")),
        words=("manifest.json", "object"),
    ),
    Case(
        "data-manifest-num-classes-text",
        NAMED,
        train_on(lambda t: packed(t, manifest='{"num_classes": "four"}')),
        words=("manifest.json", "num_classes"),
    ),  # fmt: skip
    Case(
        "data-manifest-corrupt-on-re-extract", NAMED, corrupt_manifest_before_extract, words=("manifest.json", "JSON")
    ),  # fmt: skip
    Case(
        "data-labels-npy-garbage",
        NAMED,
        train_on(lambda t: packed(t, labels=b"not an array")),
        words=("labels.npy", "not a readable .npy"),
    ),  # fmt: skip
    Case(
        "data-labels-npz-in-disguise", NAMED, train_on(packed_then(npz_as_labels)), words=("labels.npy", ".npz")
    ),  # fmt: skip
    Case(
        "data-features-npy-truncated",
        NAMED,
        train_on(packed_then(truncate_features)),
        words=("features.npy", "not a readable .npy"),
    ),  # fmt: skip
    Case(
        "data-features-int-dtype",
        NAMED,
        train_on(lambda t: packed(t, features=np.zeros((8, 2, 4, 8, 8), np.int32))),
        words=("features.npy", "int32", "float"),
    ),  # fmt: skip
    Case(
        "data-features-wrong-rank",
        NAMED,
        train_on(lambda t: packed(t, features=np.zeros((8, 4, 8, 8), np.float32))),
        words=("features.npy", "[N, V, C, H, W]"),
    ),  # fmt: skip
    Case(
        "data-labels-2d",
        NAMED,
        train_on(lambda t: packed(t, labels=np.zeros((8, 2), np.int64))),
        words=("labels.npy", "expected [N]"),
    ),  # fmt: skip
    Case(
        "data-cc3m-tsv-latin1",
        NAMED,
        aptp_prune(lambda t: cc3m(t, [*GOOD[:2], "café au lait".encode("latin1")])),
        words=("Train_GCC-training.tsv", "line 3", "UTF-8", "0xe9"),
        check=nothing_pruned,
    ),  # fmt: skip
    Case(
        "data-coco-json-truncated",
        NAMED,
        aptp_prune(lambda t: coco(t, '{"annotations": [{"id": 1'), "coco"),
        words=("captions_train2014.json", "COCO captions"),
        check=nothing_pruned,
    ),  # fmt: skip
    Case(
        "data-coco-annotation-without-image-id",
        NAMED,
        aptp_prune(lambda t: coco(t, json.dumps({"annotations": [{"id": 1, "caption": "x"}]})), "coco"),
        words=("captions_train2014.json", "annotation 0", "image_id"),
        check=nothing_pruned,
    ),  # fmt: skip
    Case(
        "data-coco-json-not-utf8",
        NAMED,
        aptp_prune(lambda t: coco(t, LATIN1_COCO), "coco"),
        words=("captions_train2014.json",),
        check=nothing_pruned,
    ),  # fmt: skip
    # empty APTP captions: reported (kept as the empty prompt), or refused by data.on_empty=fail
    Case(
        "data-empty-caption-fail",
        SILENT,
        aptp_prune(lambda t: cc3m(t, [GOOD[0], b"   ", GOOD[1], b""]), "cc3m", "data.on_empty=fail"),
        words=("2 of its 4 captions", "rows 1, 3", "data.on_empty=fail"),
        check=nothing_pruned,
    ),  # fmt: skip
    Case(
        "data-on-empty-unknown",
        NAMED,
        aptp_prune(lambda t: cc3m(t, GOOD), "cc3m", "data.on_empty=skip"),
        words=("data.on_empty",),
        check=nothing_pruned,
    ),  # fmt: skip
]
