"""COCO-30k evaluation on a miniature COCO 2014 tree: the drawn set (first caption of distinct val2014 images, seed 42),
the authors' resizing (cv2.resize's bilinear arithmetic, against real cv2 output and an independent float computation)
and `aptp.evaluate --coco30k` with both preprocessings. Routed generation of the set: tests/test_aptp_generate.py."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from aptp import evaluate
from aptp.data import coco30k, resize_like_cv2
from aptp.metrics import FidTransform, list_images, load_npz, load_prompts
from diffcompress.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = [(30, 40), (40, 30), (36, 36), (24, 50)]  # (height, width) of the images, in turn


def write_coco(root, captions, per_image=(1, 2, 3), missing=(), seed=0):
    """``root/annotations/captions_val2014.json`` and ``root/images/val2014/COCO_val2014_%012d.jpg``: image ids
    10, 20, 30, ... with 1-3 captions each (taken in turn from ``captions``, suffixed ``#j``), annotations shuffled;
    the ids in ``missing`` have captions but no file. Returns ``{image id: captions in file order}``."""
    rng = np.random.RandomState(seed)
    folder = root / "images" / "val2014"
    folder.mkdir(parents=True)
    annotations = []
    for i, caption in enumerate(captions):
        image_id = 10 * (i + 1)
        if image_id not in missing:
            h, w = SIZES[i % len(SIZES)]
            pixels = rng.randint(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"COCO_val2014_{image_id:012d}.jpg", quality=95)
        for j in range(per_image[i % len(per_image)]):
            annotations.append({"image_id": image_id, "id": 1000 * (i + 1) + j, "caption": f" {caption} #{j} "})
    rng.shuffle(annotations)
    (root / "annotations").mkdir()
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps({"annotations": annotations}))
    first = {}
    for a in annotations:
        first.setdefault(a["image_id"], []).append(a["caption"].strip())
    return first


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    captions = write_coco(root, [f"caption of image {i}" for i in range(40)], missing=(70,))
    return root, captions


def expected_draw(root, captions, count, seed=42):
    """The COCO-30k rule computed afresh from the annotation file: the images with a file, in the order their first
    caption appears; RandomState(seed).permutation of them (what pandas' DataFrame.sample(n, random_state) draws),
    the first ``count``; each with its first caption."""
    annotations = json.loads((root / "annotations/captions_val2014.json").read_text())["annotations"]
    order = []
    for a in annotations:
        path = root / "images/val2014" / f"COCO_val2014_{a['image_id']:012d}.jpg"
        if a["image_id"] not in order and path.is_file():
            order.append(a["image_id"])
    picked = [order[i] for i in np.random.RandomState(seed).permutation(len(order))[:count]]
    return picked, [captions[i][0] for i in picked]


# ----------------------------------------------------------------------------------------------------
# The drawn set


def test_coco30k_is_the_first_caption_of_distinct_images(coco):
    root, captions = coco
    table = coco30k(root, count=25)
    ids, first = expected_draw(root, captions, 25)
    assert len(table) == 25 and len(set(table.paths)) == 25
    assert [int(p[-16:-4]) for p in table.paths] == ids  # COCO_val2014_<12-digit id>.jpg
    assert list(table.captions) == first
    assert not all(c.endswith("#0") for c in table.captions)  # the first caption in file order, not the lowest id
    assert 70 not in ids  # an image without a file is never drawn
    # deterministic, and a smaller count is a prefix of a larger one (--max_samples N = the first N of the draw)
    again = coco30k(root, count=39)
    assert list(again.paths)[:25] == list(table.paths) and list(again.captions)[:25] == first
    assert coco30k(root, count=25, seed=1).ids.tolist() != table.ids.tolist()


# ----------------------------------------------------------------------------------------------------
# The authors' resizing

# cv2.resize(x, (4, 3)) and cv2.resize(y, (5, 7)) printed by opencv-python-headless 4.10.0.84 (INTER_LINEAR default)
CV2_DOWN = [[[140, 172, 172], [106, 83, 51], [205, 70, 191], [84, 122, 198]],
            [[140, 139, 40], [79, 107, 90], [62, 30, 122], [117, 199, 64]],
            [[174, 168, 136], [190, 143, 97], [163, 138, 139], [91, 105, 131]]]  # fmt: skip
CV2_UP = [[195, 124, 17, 98, 153], [205, 139, 41, 97, 134], [221, 164, 79, 94, 105], [220, 149, 43, 120, 171],
          [206, 131, 19, 152, 241], [123, 136, 156, 209, 245], [71, 139, 242, 245, 247]]  # fmt: skip


def bilinear(pixels, width, height):
    """Bilinear resampling in float64, pixel by pixel: sample centres aligned ((d + 0.5) * src / dst - 0.5), the
    source coordinate clamped to the image."""
    h, w = pixels.shape[:2]
    out = np.zeros((height, width, *pixels.shape[2:]))
    x = pixels.astype(np.float64)
    for i in range(height):
        for j in range(width):
            sy = min(max((i + 0.5) * h / height - 0.5, 0), h - 1)
            sx = min(max((j + 0.5) * w / width - 0.5, 0), w - 1)
            y0, x0 = int(sy), int(sx)
            y1, x1, fy, fx = min(y0 + 1, h - 1), min(x0 + 1, w - 1), sy - y0, sx - x0
            top = (1 - fx) * x[y0, x0] + fx * x[y0, x1]
            out[i, j] = (1 - fy) * top + fy * ((1 - fx) * x[y1, x0] + fx * x[y1, x1])
    return out


def test_authors_resize_is_cv2_bilinear():
    x = np.random.RandomState(7).randint(0, 256, (5, 7, 3), dtype=np.uint8)
    y = np.random.RandomState(8).randint(0, 256, (4, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_like_cv2(x, 4, 3), np.array(CV2_DOWN, dtype=np.uint8))
    np.testing.assert_array_equal(resize_like_cv2(y, 5, 7), np.array(CV2_UP, dtype=np.uint8))

    # cv2's 11-bit fixed point is bilinear resampling up to one level of rounding
    rng = np.random.RandomState(0)
    for (h, w), (height, width) in [((11, 13), (5, 4)), ((9, 8), (16, 20)), ((20, 30), (7, 7))]:
        image = rng.randint(0, 256, (h, w, 3), dtype=np.uint8)
        diff = resize_like_cv2(image, width, height).astype(int) - np.round(bilinear(image, width, height))
        assert np.abs(diff).max() <= 1 and (diff == 0).mean() > 0.8, (h, w)

    # SD2.1's 768 -> 256 (any integer factor): the middle pixel of each 3 x 3 block, exactly
    image = rng.randint(0, 256, (24, 24, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_like_cv2(image, 8, 8), image[1::3, 1::3])
    np.testing.assert_array_equal(resize_like_cv2(image, 8, 8), np.round(bilinear(image, 8, 8)))
    # exactly half on both axes: cv2 switches to INTER_AREA, the 2 x 2 mean rounded half up
    blocks = image.astype(int).reshape(12, 2, 12, 2, 3).sum(axis=(1, 3))
    np.testing.assert_array_equal(resize_like_cv2(image, 12, 12), (blocks + 2) // 4)
    with pytest.raises(ValueError, match="uint8"):
        resize_like_cv2(image.astype(np.float32), 8, 8)


# ----------------------------------------------------------------------------------------------------
# python -m aptp.evaluate --coco30k


def pooled(x):
    """A 12-d stand-in for Inception (2x2 average pools of clean-fid's 299x299 input, as tests/test_aptp_metrics.py):
    2048-d statistics of a few images would make each Frechet distance seconds of eigendecompositions."""
    return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


def features(paths, transform):
    return np.stack([pooled(transform(Image.open(p).convert("RGB"))[None])[0].numpy() for p in paths])


def test_evaluate_against_coco30k(coco, tmp_path, monkeypatch, capsys):
    root, _ = coco
    monkeypatch.setattr("aptp.evaluate.inception_extractor", lambda weights, device: (pooled, "test: 2x2 pools"))
    drawn = coco30k(root, count=20)
    gen = tmp_path / "gen"  # what aptp.generate --coco30k writes: 256 px PNGs named after the images, prompts.json
    gen.mkdir()
    rng = np.random.RandomState(1)
    names = [p.rsplit("/", 1)[1].replace(".jpg", ".png") for p in drawn.paths][:6]
    for name in names:
        Image.fromarray(rng.randint(0, 256, (256, 256, 3), dtype=np.uint8)).save(gen / name)
    (gen / "prompts.json").write_text(json.dumps(dict(zip(names, drawn.captions))))
    prompts = dict(zip(names, drawn.captions))
    assert load_prompts(gen / "prompts.json", list_images(gen)) == [prompts[p.name] for p in list_images(gen)]
    common = ["--metrics", "fid", "--num-workers", "0", "--device", "cpu", "--batch-size", "8"]

    ours = evaluate.main([str(gen), "--coco30k", str(root), "--max_samples", "20", *common])
    stats, meta = load_npz(gen / "fid-reference-coco30k-20.npz", "stats")
    assert meta["num_images"] == 20 and meta["preprocess"] == "ours" and meta["source"].endswith("val2014")
    np.testing.assert_allclose(stats["mu"], features(drawn.paths, FidTransform(256)).mean(0), rtol=1e-5)
    assert ours["fid"]["num_reference"] == 20 and ours["fid"]["preprocess"] == "ours" and ours["fid"]["value"] > 0

    authors = evaluate.main([str(gen), "--coco30k", str(root), "--max-samples", "20", *common,
                             "--reference_preprocess", "authors"])  # fmt: skip
    stats, meta = load_npz(gen / "fid-reference-coco30k-20-authors.npz", "stats")
    assert meta["preprocess"] == "authors" and authors["fid"]["preprocess"] == "authors"

    def cv2_then_cleanfid(image):  # the whole image to 256 x 256 (cv2 bilinear), then clean-fid's own resize
        return FidTransform(None)(Image.fromarray(resize_like_cv2(np.asarray(image), 256, 256)))

    np.testing.assert_allclose(stats["mu"], features(drawn.paths, cv2_then_cleanfid).mean(0), rtol=1e-5)
    assert not np.allclose(stats["mu"], features(drawn.paths, FidTransform(256)).mean(0), rtol=1e-3)
    # 256 px generated images are left as they are by both preprocessings: only the references differ
    mine = features(list_images(gen), FidTransform(None))
    np.testing.assert_allclose(mine, features(list_images(gen), cv2_then_cleanfid), rtol=1e-6)
    assert authors["fid"]["value"] != pytest.approx(ours["fid"]["value"], rel=1e-6)
    capsys.readouterr()
    again = evaluate.main([str(gen), "--coco30k", str(root), "--max_samples", "20", *common])  # cached statistics
    assert "read from" in capsys.readouterr().out
    assert again["fid"]["value"] == pytest.approx(ours["fid"]["value"], rel=1e-9)

    cases = [
        (["--coco30k", str(root), "--ref-dir", str(gen)], "--ref-dir and --coco30k both"),
        (["--ref-dir", str(gen), "--max_samples", "3"], "applies only with --coco30k"),
        (["--coco30k", str(root), "--max_samples", "40"], "only 39 images"),
        (["--coco30k", str(root), "--reference_preprocess", "authors", "--resolution", "0"], "cannot be 0"),
    ]
    for extra, message in cases:
        with pytest.raises(UserError, match=message):
            evaluate.main([str(gen), *extra, *common])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # counts are checked by the argument parser
        evaluate.main([str(gen), "--coco30k", str(root), "--max_samples", "0", *common])
    assert e.value.code == 2 and "argument --max-samples/--max_samples: expected a positive" in capsys.readouterr().err
