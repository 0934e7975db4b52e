"""The authors' metrics scripts (scripts/metrics/*.py) run in-process on tiny data: COCO-30k sampling against the draw
computed afresh, the cv2 resize against its integer-factor rule and a float bilinear, FID against clean-fid's own
resizer and scipy (an injected 12-d feature function stands in for Inception), CLIP features and score against a
tiny CLIP's own outputs and a numpy cosine; bad input ends in one line (exit 2)."""

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from aptp.authors_metrics import clip_source, features_dir_name
from aptp.data import coco30k

pytestmark = pytest.mark.usefixtures("one_thread")

FID = "scripts/metrics/fid.py"
CLIP_FEATURES, CLIP_SCORE = "scripts/metrics/clip_features.py", "scripts/metrics/clip_score.py"
RESIZE, SAMPLE = "scripts/metrics/resize_and_save_images.py", "scripts/metrics/sample_coco_30k.py"
CAPTIONS = ["a red cat", "a blue dog on the beach", "a green house", "a yellow car in the city", "a man running"]


def pooled(x: torch.Tensor) -> torch.Tensor:
    """The stand-in for Inception: 2 x 2 average pools of clean-fid's [N, 3, 299, 299] input, 12 features."""
    return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


def independent_fid(gen: list[np.ndarray], ref: list[np.ndarray]) -> float:
    """clean-fid's legacy_pytorch resize (its own code), the pooled features, and the Frechet distance by scipy."""
    from cleanfid.resize import build_resizer

    resize = build_resizer("legacy_pytorch")

    def stats(images):
        x = torch.stack([torch.from_numpy(resize(im).transpose(2, 0, 1).copy()) for im in images])
        f = pooled(x).double().numpy()
        return f.mean(0), np.cov(f, rowvar=False)

    (m1, s1), (m2, s2) = stats(gen), stats(ref)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))


def write_coco(root, n, seed=0):
    """A COCO 2014 folder with ``n`` val2014 images (ids 10, 20, ...; sizes vary) of 1-3 captions each, annotations
    shuffled. Returns the annotation list."""
    rng = np.random.RandomState(seed)
    images = root / "images" / "val2014"
    images.mkdir(parents=True)
    annotations = []
    for i in range(n):
        h, w = (30, 40) if i % 2 else (44, 36)
        pixels = rng.randint(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"COCO_val2014_{10 * (i + 1):012d}.png")
        for j in range(1 + i % 3):
            annotations.append({"image_id": 10 * (i + 1), "id": 100 * (i + 1) + j, "caption": f"image {i} caption {j}"})
    rng.shuffle(annotations)
    (root / "annotations").mkdir()
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps({"annotations": annotations}))
    for p in images.iterdir():  # our loader expects COCO's .jpg names; PNG content keeps the pixels exact
        p.rename(p.with_suffix(".jpg"))
    return annotations


def noise_images(folder, names, size, seed):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    arrays = []
    for name in names:
        arrays.append(rng.randint(0, 256, (*size, 3), dtype=np.uint8))
        Image.fromarray(arrays[-1]).save(folder / name)
    return arrays


def one_error_line(result, *parts):
    assert result.code == 2, (result.out, result.err)
    assert result.last_line.startswith(("error: ", "usage: ")) or ": error: " in result.last_line, result.err
    for part in parts:
        assert part in result.last_line, result.last_line


# ---------------------------------------------------------------------------------------------------------------
# sample_coco_30k.py and fid.py


def test_sample_coco_30k_then_fid(tmp_path, script, monkeypatch):
    root = tmp_path / "coco"
    annotations = write_coco(root, 20)
    res = script(SAMPLE, "--data_dir", root, "--num_samples", 16)
    assert res.code == 0, res.err

    # the draw, afresh: images in the order of their first caption, RandomState(42).permutation, first 16
    order, first = [], {}
    for a in annotations:
        if a["image_id"] not in first:
            order.append(a["image_id"])
            first[a["image_id"]] = a["caption"]
    picked = [order[i] for i in np.random.RandomState(42).permutation(len(order))[:16]]
    saved = json.loads((root / "annotations" / "captions_val2014_30k.json").read_text())
    assert [a["image_id"] for a in saved["annotations"]] == picked
    assert [a["caption"] for a in saved["annotations"]] == [first[i] for i in picked]
    assert [im["file_name"] for im in saved["images"]] == [f"COCO_val2014_{i:012d}.npy" for i in picked]
    # ... which is the draw of aptp.generate/evaluate --coco30k
    assert [p.split("/")[-1][:-4] for p in coco30k(root, 16).paths] == [f"COCO_val2014_{i:012d}" for i in picked]
    out = root / "images" / "val2014_30k"
    refs = [np.load(out / f"COCO_val2014_{i:012d}.npy") for i in picked]
    assert sorted(p.name for p in out.iterdir()) == sorted(im["file_name"] for im in saved["images"])
    assert all(r.shape == (256, 256, 3) and r.dtype == np.uint8 for r in refs)
    with Image.open(root / "images" / "val2014" / f"COCO_val2014_{picked[0]:012d}.jpg") as img:
        src = np.asarray(img.convert("RGB"))
    assert np.abs(refs[0].astype(int) - float_bilinear(src, 256, 256)).max() <= 1

    # FID against the COCO folder = the authors' flow: clean-fid statistics of the .npy arrays just written
    monkeypatch.setattr("aptp.evaluate.inception_extractor", lambda weights, device: (pooled, "test: 2x2 pools"))
    gen = noise_images(tmp_path / "gen", [f"{i}.png" for i in range(16)], (256, 256), seed=1)
    common = ["--gen_dir", tmp_path / "gen", "--result_dir", tmp_path / "res", "--num_workers", 0, "--device", "cpu"]
    res = script(FID, *common, "--dataset", "coco-30k", "--mode", "legacy_pytorch", "--coco30k", root,
                 "--num_samples", 16)  # fmt: skip
    assert res.code == 0, res.err
    assert res.out.count("equivalent: python -m aptp.evaluate") == 1 and "--reference_preprocess authors" in res.out
    expected = independent_fid(gen, refs)
    value = json.loads((tmp_path / "res" / "fid_metrics.json").read_text())["fid"]["value"]
    assert value == pytest.approx(expected, rel=1e-4) and value > 1
    line = (tmp_path / "res" / "fid.txt").read_text().splitlines()
    assert len(line) == 1 and line[0].startswith(f"FID {value:.4f}  gen_dir=") and "images=16" in line[0]
    assert line[0] in res.out

    # no reference flag: clean-fid's own custom statistics named --dataset, where make_custom_stats keeps them
    stats_dir = tmp_path / "cleanfid_stats"
    monkeypatch.setattr("aptp.authors_metrics.cleanfid_stats_dir", lambda: stats_dir)
    res = script(FID, *common)
    one_error_line(res, "--dataset coco-30k", "--coco30k COCO_DIR", "--ref_dir", "--ref_stats")
    from cleanfid.resize import build_resizer

    resize = build_resizer("legacy_pytorch")
    f = pooled(torch.stack([torch.from_numpy(resize(r).transpose(2, 0, 1).copy()) for r in refs])).double().numpy()
    stats_dir.mkdir()
    np.savez(stats_dir / "coco-30k_legacy_pytorch_custom_na.npz", mu=f.mean(0), sigma=np.cov(f, rowvar=False))
    res = script(FID, *common)
    assert res.code == 0, res.err
    lines = (tmp_path / "res" / "fid.txt").read_text().splitlines()
    assert len(lines) == 2 and "coco-30k_legacy_pytorch_custom_na.npz" in lines[1]
    assert float(lines[1].split()[1]) == pytest.approx(expected, abs=1e-3)

    # a reference folder of images, as they are
    res = script(FID, *common, "--ref_dir", tmp_path / "gen")
    assert res.code == 0, res.err
    assert float((tmp_path / "res" / "fid.txt").read_text().splitlines()[2].split()[1]) == pytest.approx(0, abs=1e-3)

    # mistakes: one line each
    one_error_line(script(FID, *common, "--mode", "clean"), "--mode clean", "legacy_pytorch")
    # the authors' arrays (.npy, as their generate_fid_images.py and this sample_coco_30k.py write) read as images
    res = script(FID, "--gen_dir", out, "--result_dir", tmp_path / "res", "--ref_dir", tmp_path / "gen",
                 "--num_workers", 0, "--device", "cpu")  # fmt: skip
    assert res.code == 0, res.err
    npy_value = json.loads((tmp_path / "res" / "fid_metrics.json").read_text())["fid"]["value"]
    assert npy_value == pytest.approx(expected, rel=1e-4)  # FID is symmetric in its two sets
    one_error_line(script(FID, *common, "--coco30k", root, "--ref_dir", tmp_path / "gen"), "--coco30k and --ref_dir")
    one_error_line(script(FID, "--gen_dir", tmp_path / "gen"), "--result_dir")
    one_error_line(script(SAMPLE, "--data_dir", root, "--num_samples", 21), "COCO-21", "only 20 images")
    one_error_line(script(SAMPLE, "--data_dir", tmp_path / "nowhere"), "captions_val2014.json")

    # a smaller draw reuses the arrays and names the ones outside it
    res = script(SAMPLE, "--data_dir", root, "--num_samples", 10)
    assert res.code == 0 and "6 .npy file(s) outside this draw" in res.err, res.err
    assert len(json.loads((root / "annotations" / "captions_val2014_30k.json").read_text())["annotations"]) == 10


# ---------------------------------------------------------------------------------------------------------------
# resize_and_save_images.py


def float_bilinear(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Half-pixel-centred bilinear interpolation with edge clamping (cv2's INTER_LINEAR geometry), in float."""

    def taps(src, dst):
        pos = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0, src - 1)
        lo = np.floor(pos).astype(int)
        return lo, np.minimum(lo + 1, src - 1), pos - lo

    (y0, y1, fy), (x0, x1, fx) = taps(img.shape[0], height), taps(img.shape[1], width)
    img = img.astype(np.float64)
    fx, fy = fx[None, :, None], fy[:, None, None]
    top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
    bottom = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
    return np.rint(top * (1 - fy) + bottom * fy)


def test_resize_and_save_images(tmp_path, script):
    src = tmp_path / "refs"
    a, b = noise_images(src, ["a.png", "b.jpg"], (48, 72), seed=2)
    b = np.asarray(Image.open(src / "b.jpg").convert("RGB"))  # JPEG is lossy: the decoded pixels
    Image.fromarray(a[:, :, 0]).save(src / "gray.png")  # one channel: saved as RGB
    (src / "notes.txt").write_text("not an image")
    res = script(RESIZE, "--data_dir", src, "--output_dir", tmp_path / "out", "--size", 24, 16)
    assert res.code == 0, res.err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.npy", "b.npy", "gray.npy"]
    out = {n: np.load(tmp_path / "out" / f"{n}.npy") for n in ("a", "b", "gray")}
    assert all(v.shape == (16, 24, 3) and v.dtype == np.uint8 for v in out.values())  # --size is (width, height)
    # 72 x 48 -> 24 x 16 is a factor of 3: cv2's bilinear takes every 3rd pixel from the 2nd
    np.testing.assert_array_equal(out["a"], a[1::3, 1::3])
    np.testing.assert_array_equal(out["b"], b[1::3, 1::3])
    np.testing.assert_array_equal(out["gray"], np.repeat(a[1::3, 1::3, :1], 3, axis=2))

    res = script(RESIZE, "--data_dir", src, "--output_dir", tmp_path / "out2", "--size", 31, 53)  # up and down
    assert res.code == 0, res.err
    got = np.load(tmp_path / "out2" / "a.npy")
    assert got.shape == (53, 31, 3)
    assert np.abs(got.astype(int) - float_bilinear(a, 31, 53)).max() <= 1

    one_error_line(script(RESIZE, "--data_dir", tmp_path / "none", "--output_dir", tmp_path / "o"), "--data_dir")
    zero = script(RESIZE, "--data_dir", src, "--output_dir", tmp_path / "o", "--size", 0, 8)
    one_error_line(zero, "argument --size", "positive integer")
    one_error_line(script(RESIZE, "--data_dir", src, "--output_dir", tmp_path / "o", "--size", 8), "--size")


# ---------------------------------------------------------------------------------------------------------------
# clip_features.py and clip_score.py


def projected(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_clip_features_then_clip_score(tmp_path, script, tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    captions = tmp_path / "data" / "captions"
    captions.mkdir(parents=True)
    names = [f"img_{i:02d}" for i in range(len(CAPTIONS))]
    for name, caption in zip(names, CAPTIONS):
        (captions / f"{name}.txt").write_text(caption + "\n")
    res = script(CLIP_FEATURES, "--dataset_path", captions, "--clip_model", tiny_clip, "--batch_size", 2,
                 "--num_workers", 3, "--device", "cpu")  # fmt: skip
    assert res.code == 0, res.err
    assert "ignored --num_workers" in res.err
    features_dir = tmp_path / "data" / "tiny-clip_clip_features"  # beside --dataset_path
    assert sorted(p.name for p in features_dir.iterdir()) == [f"{n}.npy" for n in names]
    text = np.stack([np.load(features_dir / f"{n}.npy") for n in names])

    # independently: the saved model's own projected features
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        tokens = processor.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
        expected_text = projected(model.get_text_features(**tokens)).double().numpy()
    assert text.shape == (5, 16) and text.dtype == np.float32
    np.testing.assert_allclose(text, expected_text, rtol=1e-4, atol=1e-5)

    gen = tmp_path / "gen"
    noise_images(gen, [f"{n}.png" for n in names], (40, 40), seed=3)
    (gen / "prompts.json").write_text("{}")  # not an image: not paired
    args = ["--gen_images_dir", gen, "--text_features_dir", features_dir, "--result_dir", tmp_path / "res",
            "--dataset_name", "coco", "--clip_model", tiny_clip, "--batch_size", 2, "--num_workers", 0,
            "--device", "cpu"]  # fmt: skip
    res = script(CLIP_SCORE, *args)
    assert res.code == 0, res.err
    with torch.no_grad():
        pixels = processor(images=[Image.open(gen / f"{n}.png") for n in names], return_tensors="pt")["pixel_values"]
        img = projected(model.get_image_features(pixel_values=pixels)).double().numpy()
    cos = (img * text).sum(1) / np.linalg.norm(img, axis=1) / np.linalg.norm(text, axis=1)
    expected = np.mean(100 * np.maximum(cos, 0))  # aptp.evaluate's score: a negative cosine counts as 0
    line = (tmp_path / "res" / "clip_score.txt").read_text().splitlines()
    assert len(line) == 1 and line[0].startswith("CLIP score ") and "dataset=coco" in line[0] and "pairs=5" in line[0]
    assert float(line[0].split()[2]) == pytest.approx(expected, abs=1e-3)
    assert line[0] in res.out
    assert (cos < 0).any() and (cos > 0).any()  # the random CLIP gives both: the clip at 0 matters
    assert f"{(cos < 0).sum()} pair(s) have a negative cosine" in res.err and f"{np.mean(100 * cos):.4f}" in res.err

    # mistakes: one line each
    (tmp_path / "few").mkdir()
    for n in names[:3]:
        np.save(tmp_path / "few" / f"{n}.npy", text[0])
    bad = [*args[:2], "--text_features_dir", tmp_path / "few", *args[4:]]
    one_error_line(script(CLIP_SCORE, *bad), "5 images", "3 features", "counts must match")
    np.save(tmp_path / "few" / "x.npy", np.zeros(7, np.float32))
    np.save(tmp_path / "few" / "y.npy", np.zeros(7, np.float32))
    one_error_line(script(CLIP_SCORE, *bad), "features of different lengths")
    one_error_line(script(CLIP_SCORE, *args[:6], *args[8:]), "--dataset_name")
    one_error_line(script(CLIP_FEATURES, "--dataset_path", tmp_path / "gen"), "--dataset_path", "no caption .txt")
    one_error_line(script(CLIP_FEATURES, "--dataset_path", captions, "--clip_model", "RN50"), "--clip_model RN50")


def test_clip_model_names():
    assert clip_source("ViT-B/32") == "openai/clip-vit-base-patch32"
    assert clip_source("models/my-clip") == "models/my-clip"
    assert features_dir_name("ViT-B/32") == "ViT-B-32_clip_features"
    assert features_dir_name("openai/clip-vit-base-patch32") == "ViT-B-32_clip_features"
    assert features_dir_name("models/clip-vit-large-patch14-336/") == "ViT-L-14@336px_clip_features"
    assert features_dir_name("models/my-clip") == "my-clip_clip_features"
