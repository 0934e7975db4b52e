"""APTP metrics: FID through clean-fid's legacy_pytorch path (a random Inception-v3 of the real architecture, and an
injected feature function with known features), CMMD against a double loop, CLIP score against the model's own
embeddings, and ``python -m aptp.evaluate`` end to end with its errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from aptp.evaluate import main
from aptp.metrics import (
    FID_MODE,
    clip_image_embeddings,
    clip_score,
    clip_text_embeddings,
    cmmd,
    fid_features,
    inception_extractor,
    list_images,
    load_clip,
    load_npz,
    load_prompts,
    mmd,
)
from diffcompress.errors import UserError
from diffcompress.fid_metrics import activation_statistics, frechet_distance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red cat", "a blue dog on the beach", "a green house", "a yellow car in the city", "a man running"]


def noise_images(folder, n, seed, size=48):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    for i in range(n):
        Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """Random weights for torchvision's Inception3 (1008 classes, no aux head: the FID Inception's keys), with
    He-initialised convolutions so that features neither vanish nor explode over 48 layers."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# FID


def test_fid_path_with_known_features(tmp_path):
    """Constant-colour images: clean-fid's resize keeps them constant, so a mean-colour feature function must
    return the colours exactly, in natural file order, and the FID is the closed form on those colours."""
    rng = np.random.RandomState(0)
    gen_colors, ref_colors = rng.randint(0, 256, (12, 3)), rng.randint(0, 256, (8, 3))
    for folder, colors, size in ((tmp_path / "gen", gen_colors, (40, 30)), (tmp_path / "ref", ref_colors, (20, 20))):
        folder.mkdir()
        for i, c in enumerate(colors):
            Image.new("RGB", size, tuple(int(v) for v in c)).save(folder / f"{i}.png")
    (tmp_path / "gen" / "broken.png").write_bytes(b"not a png")

    def mean_colour(x):
        assert x.shape[1:] == (3, 299, 299)
        return x.mean(dim=(2, 3))

    gen = fid_features(list_images(tmp_path / "gen"), mean_colour, resolution=16)
    ref = fid_features(list_images(tmp_path / "ref"), mean_colour, resolution=None, batch_size=3)
    assert gen.skipped.keys() == {"broken.png"} and gen.kept == list(range(12))  # 0..11 come before "broken"
    np.testing.assert_allclose(gen.values, gen_colors, atol=1e-3)
    np.testing.assert_allclose(ref.values, ref_colors, atol=1e-3)

    fid = frechet_distance(*activation_statistics(gen.values), *activation_statistics(ref.values))
    mu1, mu2 = gen_colors.mean(0), ref_colors.mean(0)
    s1, s2 = np.cov(gen_colors, rowvar=False), np.cov(ref_colors, rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert fid == pytest.approx(expected, rel=1e-5) and fid > 100

    with pytest.raises(UserError, match="broken.png"):
        fid_features(list_images(tmp_path / "gen"), mean_colour, strict=True)


def test_fid_features_match_cleanfid(tmp_path, inception_weights):
    """Our reader feeds clean-fid's legacy_pytorch network exactly what clean-fid's own folder reader does."""
    from cleanfid.fid import get_folder_features

    folder = noise_images(tmp_path / "imgs", 4, seed=1, size=37)
    feature_fn, extractor = inception_extractor(inception_weights, "cpu")
    assert extractor.startswith(f"{FID_MODE} inception ")
    ours = fid_features(list_images(folder), feature_fn, resolution=None)
    theirs = get_folder_features(str(folder), feature_fn, num_workers=0, device=torch.device("cpu"), mode=FID_MODE)
    assert ours.values.shape == (4, 2048) and ours.values.std(axis=0).mean() > 1e-4  # not a degenerate network
    np.testing.assert_allclose(ours.values, theirs, rtol=1e-5, atol=1e-7)


def test_inception_weight_errors(tmp_path):
    with pytest.raises(UserError, match="--inception-weights .*no such file"):
        inception_extractor(tmp_path / "missing.pth")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match="not the FID Inception-v3 weights"):
        inception_extractor(tmp_path / "wrong.pth")


# ---------------------------------------------------------------------------------------------------------------
# CMMD


def mmd_double_loop(x, y, sigma, unbiased):
    k = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * sigma**2))
    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if not (unbiased and i == j))
    kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if not (unbiased and i == j))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n))
    pairs = (m * (m - 1), n * (n - 1)) if unbiased else (m * m, n * n)
    return kxx / pairs[0] + kyy / pairs[1] - 2 * kxy / (m * n)


@pytest.mark.parametrize("unbiased", [False, True])
def test_mmd_against_double_loop(unbiased):
    rng = np.random.RandomState(0)
    x, y = rng.randn(7, 5) * 3, rng.randn(9, 5) * 3 + 1.5
    for sigma in (10.0, 2.0):
        expected = mmd_double_loop(x, y, sigma, unbiased)
        assert mmd(x, y, sigma=sigma, scale=1.0, unbiased=unbiased, block=4) == pytest.approx(expected, rel=1e-9)
    assert mmd(x, y, unbiased=unbiased) == pytest.approx(1000 * mmd_double_loop(x, y, 10.0, unbiased), rel=1e-9)
    # sigma is respected: a narrower kernel gives another value
    assert abs(mmd(x, y, sigma=2.0, unbiased=unbiased) - mmd(x, y, unbiased=unbiased)) > 1.0


def test_cmmd_normalises_and_is_zero_for_identical_sets():
    rng = np.random.RandomState(1)
    x, y = rng.randn(6, 8), rng.randn(5, 8)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    assert cmmd(x, y) == pytest.approx(1000 * mmd_double_loop(unit(x), unit(y), 10.0, False), rel=1e-9)
    assert cmmd(x, 3.0 * y) == pytest.approx(cmmd(x, y), rel=1e-12)  # only directions count
    assert cmmd(x, x.copy()) == pytest.approx(0.0, abs=1e-9)
    assert cmmd(x, y) > 0.1


# ---------------------------------------------------------------------------------------------------------------
# CLIP score


def test_clip_score_formula():
    img = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    txt = np.array([[3.0, 0.0], [1.0, np.sqrt(3.0)], [0.0, -1.0]])  # cosines 1, 0.5, -1 (clipped to 0)
    assert clip_score(img, txt) == pytest.approx(100 * (1 + 0.5 + 0) / 3)


def test_clip_score_against_model_embeddings(tmp_path, tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    files = list_images(noise_images(tmp_path / "imgs", len(PROMPTS), seed=2))
    model, processor = load_clip(str(tiny_clip), "cpu")
    feats = clip_image_embeddings(files, model, processor, batch_size=2)
    text = clip_text_embeddings(PROMPTS, model, processor, batch_size=2)
    ours = clip_score(feats.values, text)

    # independently: the saved model's own projected features of the processed images and captions
    ref_model, ref_proc = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        pixels = ref_proc(images=[Image.open(f).convert("RGB") for f in files], return_tensors="pt")["pixel_values"]
        tokens = ref_proc.tokenizer(PROMPTS, padding=True, return_tensors="pt")
        img = ref_model.get_image_features(pixel_values=pixels).pooler_output.numpy().astype(np.float64)
        txt = ref_model.get_text_features(**tokens).pooler_output.numpy().astype(np.float64)
    cos = (img * txt).sum(1) / np.linalg.norm(img, axis=1) / np.linalg.norm(txt, axis=1)
    assert (cos < 0).any() and (cos > 0).any()  # the clip at 0 matters here
    np.testing.assert_allclose(feats.values, img, rtol=1e-4, atol=1e-5)
    assert ours == pytest.approx(np.mean(100 * np.maximum(cos, 0)), rel=1e-4)
    assert ours != pytest.approx(np.mean(100 * cos), rel=1e-2)


@pytest.mark.slow
def test_clip_model_offline_error(tmp_path):
    """A hub id that is not cached, offline: one line naming the model, the download command and the flag."""
    folder = noise_images(tmp_path / "imgs", 2, seed=3)
    (folder / "prompts.json").write_text(json.dumps({"0.png": "a cat", "1.png": "a dog"}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "aptp.evaluate", str(folder), "--cmmd-model", "openai/clip-vit-large-patch14-336",
         "--ref-dir", str(folder), "--metrics", "cmmd", "--num-workers", "0", "--device", "cpu"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for part in ("openai/clip-vit-large-patch14-336", "hf download", "--cmmd-model"):
        assert part in lines[0]


# ---------------------------------------------------------------------------------------------------------------
# The command


def test_evaluate_end_to_end(tmp_path, tiny_clip, capsys, monkeypatch):
    """The command with the tiny CLIP for both CLIP metrics and, for FID, an injected 12-d feature function (2x2
    average pools of clean-fid's 299x299 input; the real network's path is checked above): 2048-d statistics of a
    few images make every Frechet distance seconds of eigendecompositions."""
    pooled = lambda x: torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
    monkeypatch.setattr("aptp.evaluate.inception_extractor", lambda weights, device: (pooled, "test: 2x2 pools"))
    gen, ref = noise_images(tmp_path / "gen", 4, seed=4), noise_images(tmp_path / "ref", 4, seed=5, size=64)
    (gen / "3.png").write_bytes(b"\x89PNG truncated")  # unreadable: skipped and counted
    prompts = {f"{i}.png": p for i, p in enumerate(PROMPTS[:4])}
    (gen / "prompts.json").write_text(json.dumps(prompts))
    common = ["--clip-model", str(tiny_clip), "--cmmd-model", str(tiny_clip), "--num-workers", "0", "--device", "cpu",
              "--batch-size", "2"]  # fmt: skip

    first = main([str(gen), "--ref-dir", str(ref), *common])
    table = capsys.readouterr().out
    assert "| metric | value | images | model |" in table and f"metrics written to {gen / 'metrics.json'}" in table
    saved = json.loads((gen / "metrics.json").read_text())
    assert saved["skipped"].keys() == {"3.png"} and saved["num_files"] == 4
    for key, name in (("fid", "FID"), ("clip", "CLIP score"), ("cmmd", "CMMD")):
        assert np.isfinite(saved[key]["value"]) and saved[key]["num_images"] == 3
        assert f"| {name} | {saved[key]['value']:.4f} | 3 |" in table
    assert saved["fid"]["value"] > 0 and saved["cmmd"]["value"] > 0 and saved["cmmd"]["num_reference"] == 4
    stats, meta = load_npz(gen / "fid-reference-ref.npz", "stats")
    assert meta["mode"] == FID_MODE and meta["extractor"] == "test: 2x2 pools" and meta["num_images"] == 4
    np.testing.assert_allclose(stats["mu"], fid_features(list_images(ref), pooled, 256).values.mean(0), rtol=1e-6)

    # the CLIP score is the one of the readable images with their prompts
    model, processor = load_clip(str(tiny_clip))
    feats = clip_image_embeddings(list_images(gen), model, processor)
    text = clip_text_embeddings([prompts[f"{i}.png"] for i in feats.kept], model, processor)
    assert saved["clip"]["value"] == pytest.approx(clip_score(feats.values, text), rel=1e-6)

    # the saved references give the same numbers without the reference folder
    again = main([str(gen), "--ref-stats", str(gen / "fid-reference-ref.npz"), "--ref-embeddings",
                  str(gen / "cmmd-reference-ref.npz"), "--metrics", "fid", "cmmd", *common])  # fmt: skip
    assert again["fid"]["value"] == pytest.approx(first["fid"]["value"], rel=1e-9)
    assert again["cmmd"]["value"] == pytest.approx(first["cmmd"]["value"], rel=1e-9)
    capsys.readouterr()
    monkeypatch.setattr("aptp.evaluate.inception_extractor", lambda weights, device: (pooled, "other weights"))
    with pytest.raises(UserError, match="was made with another extractor .*recompute it with --ref-dir"):
        main([str(gen), "--ref-stats", str(gen / "fid-reference-ref.npz"), "--metrics", "fid", *common])

    # a folder against itself (the cache of another folder is not reused)
    out = tmp_path / "self" / "metrics.json"
    itself = main([str(gen), "--ref-dir", str(gen), "--metrics", "fid", "cmmd", "--out", str(out), *common])
    assert "read from" not in capsys.readouterr().out
    assert abs(itself["fid"]["value"]) < 1e-6 * first["fid"]["value"]
    assert itself["cmmd"]["value"] == pytest.approx(0.0, abs=1e-9)
    assert json.loads(out.read_text())["fid"]["num_reference"] == 3


def test_evaluate_input_errors(tmp_path):
    gen = noise_images(tmp_path / "gen", 3, seed=6, size=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no images"):
        main([str(tmp_path / "empty"), "--ref-dir", str(gen)])
    with pytest.raises(UserError, match="nothing to evaluate"):
        main([str(gen)])
    with pytest.raises(UserError, match="--metrics fid: FID needs --ref-dir or --ref-stats"):
        main([str(gen), "--metrics", "fid"])
    (tmp_path / "list.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(UserError, match="2 prompts for 3 images"):
        main([str(gen), "--prompts", str(tmp_path / "list.json")])
    (gen / "prompts.json").write_text(json.dumps({"0.png": "a", "2.png": "c"}))
    with pytest.raises(UserError, match="no prompt for 1 of the 3 images .*first: 1.png"):
        main([str(gen)])
    (tmp_path / "extra.json").write_text(json.dumps({"0.png": "a", "1.png": "b", "2.png": "c", "9.png": "d"}))
    with pytest.raises(UserError, match="name no image there .*first: 9.png"):
        load_prompts(tmp_path / "extra.json", list_images(gen))
    with pytest.raises(UserError, match="--ref-stats .*missing.npz does not exist"):
        main([str(gen), "--metrics", "fid", "--ref-stats", str(tmp_path / "missing.npz")])
