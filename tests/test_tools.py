"""The helper scripts: save_npz.py (PNG folder -> evaluator npz), draw_decision.py (decisions of a pruning run over
training) and visualize_activations.py (massive activations per block). Each writes a real PNG / npz, and the
numbers behind it are checked against independent computations."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import draw_decision
import prune_by_learning as pbl
import save_npz
import visualize_activations as va
from diffcompress.adm_eval import NpzImages
from diffcompress.checkpoint import load_file, save_checkpoint
from diffcompress.data import FeatureDataset
from diffcompress.errors import UserError
from models_with_layer_pruning import DiT, create_model
from train_masked_kd import mask_massive

from .conftest import CPU, ROOT, TOY_DIT, TOY_FLAGS
from .test_model import randomized
from .test_train import make_features


def assert_png(path, min_size=(200, 150)):
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.verify()
    with Image.open(path) as img:
        assert img.size[0] >= min_size[0] and img.size[1] >= min_size[1]
        pixels = np.asarray(img.convert("L"))
    assert pixels.std() > 5  # something is drawn, not a blank canvas


# ------------------------------------------------------------------------------------------- save_npz


def write_pngs(folder, n, size=(6, 5), name="{:06d}.png", seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images = rng.integers(0, 256, (n, size[1], size[0], 3), dtype=np.uint8)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / name.format(i))
    return images


def test_npz_round_trips_exactly_in_index_order(tmp_path):
    folder = tmp_path / "samples" / "DiT-S-2-cfg-1.5-seed-0"  # a name with dots: the npz is <name>.npz, not .5.npz
    images = write_pngs(folder, 12, name="{}.png")  # 0.png ... 11.png: directory order puts 10 before 2
    (folder / "notes.txt").write_text("not an image")
    out = save_npz.main(save_npz.parse_args([str(folder)]))
    assert out == tmp_path / "samples" / "DiT-S-2-cfg-1.5-seed-0.npz"
    with np.load(out) as data:
        assert list(data.keys()) == ["arr_0"]
        arr = data["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (12, 5, 6, 3)
    np.testing.assert_array_equal(arr, images)
    streamed = np.concatenate(list(NpzImages(out).batches(5)))  # what evaluator.py reads
    np.testing.assert_array_equal(streamed, images)


def test_npz_subset_other_names_and_modes(tmp_path):
    folder = tmp_path / "s"
    images = write_pngs(folder, 4)
    out = save_npz.main(save_npz.parse_args(["--sample-dir", str(folder), "--num-fid-samples", "3",
                                             "--output", str(tmp_path / "o" / "x.npz")]))  # fmt: skip
    np.testing.assert_array_equal(np.load(out)["arr_0"], images[:3])
    grey = np.arange(30, dtype=np.uint8).reshape(5, 6)
    Image.fromarray(grey, mode="L").save(folder / "000004.png")
    arr = np.load(save_npz.main(save_npz.parse_args([str(folder)])))["arr_0"]
    np.testing.assert_array_equal(arr[4], np.repeat(grey[..., None], 3, axis=2))  # L -> RGB copies the channel
    named = tmp_path / "named"
    images = write_pngs(named, 11, name="img{}.png")
    arr = np.load(save_npz.main(save_npz.parse_args([str(named), "--any-names"])))["arr_0"]
    np.testing.assert_array_equal(arr, images)  # natural order: img2 before img10


def test_npz_errors_name_the_problem(tmp_path):
    def error(*argv):
        with pytest.raises(UserError) as e:
            save_npz.main(save_npz.parse_args([str(a) for a in argv]))
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "does not exist" in error(tmp_path / "nope")
    folder = tmp_path / "s"
    write_pngs(folder, 5)
    (folder / "000002.png").unlink()
    assert "000002.png" in error(folder) and "lacks 1" in error(folder)
    assert "lacks 2 of indices 0..5: 000002.png, 000005.png" in error(folder, "--num-fid-samples", "6")
    Image.fromarray(np.zeros((7, 6, 3), np.uint8)).save(folder / "000002.png")
    assert "000002.png is 6x7, the first image 6x5" in error(folder)
    named = tmp_path / "named"
    write_pngs(named, 2, name="a{}.png")
    assert "--any-names" in error(named)
    assert not list(tmp_path.rglob("*.npz"))  # nothing half-written


# -------------------------------------------------------------------------------------- draw_decision


@pytest.fixture(scope="module")
def pruning_run(tmp_path_factory):
    """A short prune_by_learning run on the toy set: its experiment folder and what it printed."""
    root = tmp_path_factory.mktemp("prune")
    features = make_features(root / "features", n=32)
    args = pbl.parse_args(["--data-path", str(features), "--results-dir", str(root / "results"), *TOY_FLAGS,
                           "--groups", "1:2", "--max-steps", "8", "--log-every", "2", "--ckpt-every", "4",
                           "--lr", "1e-2", "--ema-decay", "0.5"])  # fmt: skip
    torch.manual_seed(0)
    model = randomized(DiT(**TOY_DIT, depth=6, groups=[[1, 2]] * 3))
    summary = pbl.learn_pruning(args, CPU, model, FeatureDataset(features))
    (exp,) = {path.parent for path in (root / "results").glob("*/decisions.json")}  # the run's experiment folder
    return exp, summary


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_decision_plot_from_a_finished_run(pruning_run, tmp_path):
    exp, summary = pruning_run
    result = draw_decision.main(draw_decision.parse_args([str(exp), "--out", str(tmp_path / "d.png")]))
    assert_png(tmp_path / "d.png")
    history = summary["history"]
    assert result["steps"].tolist() == [2, 4, 6, 8]
    np.testing.assert_array_equal(result["confidence"], np.array([h["confidence"] for h in history]))
    kept = np.zeros((6, 4), np.int8)
    for j, h in enumerate(history):
        kept[h["kept"], j] = 1
    np.testing.assert_array_equal(result["kept"], kept)
    # Independently: the final confidences are the softmax of the final EMA gate logits x scaling (100).
    ema = load_file(exp / "checkpoints" / "0000008.pt")["ema"]
    for g in range(3):
        probs = softmax(100.0 * ema[f"gate_logits.{g}"].double().numpy())
        assert result["confidence"][-1, g] == pytest.approx(probs.max(), abs=1e-6)
        assert summary["decisions"][g] == [int(np.argmax(probs))]  # 1:2 patterns: [1,0] keeps 0, [0,1] keeps 1
    assert result["groups"] == [[1, 2]] * 3
    assert len(result["legend"]) == 3  # one legend entry per confidence curve, naming layers and the decision
    for g, label in enumerate(result["legend"]):
        keeps = 2 * g + summary["decisions"][g][0]
        assert label.startswith(f"g{g} 1:2 layers {2 * g}-{2 * g + 1}: keeps {keeps} (")


def test_decision_plot_from_a_checkpoint_and_a_log(pruning_run, tmp_path, capsys):
    exp, summary = pruning_run
    result = draw_decision.main(draw_decision.parse_args([str(exp / "checkpoints" / "0000004.pt")]))
    assert result["output"] == exp / "decision.png" and result["groups"] == [[1, 2]] * 3
    assert_png(result["output"])
    assert result["steps"].tolist() == [2, 4]  # the history up to that checkpoint
    np.testing.assert_array_equal(result["confidence"], [h["confidence"] for h in summary["history"][:2]])
    log = tmp_path / "run.out"
    log.write_text(
        "\n".join(
            f"(step={h['step']:07d}) tau={h['tau']:.3f} kept={h['kept']} decisions/confidence "
            + " ".join(f"{d}:{c:.2f}" for d, c in zip(h["decisions"], h["confidence"]))
            for h in summary["history"]
        )
        + "\nsome other line\n"
    )
    result = draw_decision.main(draw_decision.parse_args([str(log), "--groups", "1:2"]))
    assert_png(tmp_path / "decision.png")
    np.testing.assert_allclose(result["confidence"], [h["confidence"] for h in summary["history"]], atol=0.005)
    assert result["final"]["kept"] == summary["kept_indices"] and result["groups"] == [[1, 2]] * 3
    assert "wrote " + str(tmp_path / "decision.png") in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="decisions.json nor checkpoints"):
        draw_decision.main(draw_decision.parse_args([str(tmp_path / "empty")]))


# ------------------------------------------------------------------------------ visualize_activations


def reference_block_outputs(model, x, t, y):
    """Block outputs by running the blocks one after another by hand (no hooks)."""
    with torch.no_grad():
        c = model.t_embedder(t) + model.y_embedder(y, torch.zeros_like(y, dtype=torch.bool))
        h = model.x_embedder(x) + model.pos_embed
        outs = []
        for block in model.blocks:
            h = block(h, c)
            outs.append(h.numpy().astype(np.float64))
    return outs


def test_massive_activation_numbers_match_numpy(tmp_path):
    torch.manual_seed(0)
    model = randomized(create_model("DiT-S/2", input_size=8, num_classes=4), seed=3).eval()
    with torch.no_grad():  # one channel of block 1's output made huge, as in DiT (a massive activation)
        model.blocks[1].mlp.fc2.bias[7] = 40.0
    g = torch.Generator().manual_seed(5)
    latents, labels = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0, 3, 1])
    ks, steps = [0.5, 2.0, 4.0], [10, 900]
    stats = va.activation_stats(model, latents, labels, steps, ks, seed=11)
    # The same noised latents, from the closed form with numpy's linear schedule.
    alphas_bar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    noise_gen = torch.Generator().manual_seed(11)
    per_block = [[] for _ in model.blocks]
    for step in steps:
        noise = torch.randn(latents.shape, generator=noise_gen)
        x = (math.sqrt(alphas_bar[step]) * latents.double() + math.sqrt(1 - alphas_bar[step]) * noise.double()).float()
        for i, h in enumerate(reference_block_outputs(model, x, torch.full((3,), step), labels)):
            per_block[i].append(h)
    for i, hs in enumerate(per_block):
        h = np.concatenate(hs)  # [6, 16, 384]
        assert stats["max_abs"][i] == pytest.approx(np.abs(h).max(), rel=1e-4)
        assert stats["median_abs"][i] == pytest.approx(np.quantile(np.abs(h), 0.5, method="lower"), rel=1e-3)
        mean, std = h.mean(axis=(1, 2), keepdims=True), h.std(axis=(1, 2), ddof=1, keepdims=True)
        for k in ks:
            share = (np.abs(h - mean) >= k * std).mean(axis=(1, 2)).mean()
            assert stats["masked_share"][str(k)][i] == pytest.approx(share, abs=1e-3 / h[0].size)
            zeroed = (mask_massive(torch.from_numpy(h).float(), k) == 0).double().mean().item()
            assert stats["masked_share"][str(k)][i] == pytest.approx(zeroed, abs=2e-3)  # what Masked KD drops
    assert min(stats["max_abs"][1:]) > 4 * stats["max_abs"][0]  # the huge channel appears at block 1 and stays
    assert stats["masked_share"]["4.0"][1] > 0 and stats["masked_share"]["0.5"][0] > 0.3


def test_activation_script_writes_png_and_numbers(tmp_path, capsys):
    model = randomized(create_model("DiT-S/2", input_size=8, num_classes=4), seed=1)
    ckpt = save_checkpoint(model.state_dict(), tmp_path / "s.pt")
    out = tmp_path / "fig" / "act.png"
    stats = va.main(va.parse_args(["--model", "DiT-S/2", "--ckpt", str(ckpt), "--image-size", "64",
                                   "--num-classes", "4", "--num-samples", "2", "--timesteps", "500",
                                   "--out", str(out)]))  # fmt: skip
    assert_png(out)
    saved = json.loads(out.with_name("act.png.json").read_text())
    assert saved["max_abs"] == stats["max_abs"] and len(saved["max_abs"]) == 12
    assert saved["masked_share"].keys() == {"2.0", "4.0"}
    assert f"wrote {out}" in capsys.readouterr().out
    with pytest.raises(UserError, match="pruning model"):
        va.main(va.parse_args(["--model", "DiT-XL-1-2", "--random-init", "--image-size", "16"]))


@pytest.mark.slow
def test_scripts_report_errors_in_one_line(tmp_path):
    for script, argv in [("save_npz.py", [str(tmp_path / "none")]), ("draw_decision.py", [str(tmp_path / "x.pt")])]:
        r = subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
