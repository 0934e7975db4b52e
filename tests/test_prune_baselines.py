"""prune_by_score.py (ShortGPT block influence) and prune_by_index.py (list, oracle, random) on a tiny DiT."""

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import prune_by_index
import prune_by_score
from diffcompress.checkpoint import load_file, model_hint, read_metadata
from diffcompress.cli import run
from diffcompress.data import center_crop_arr, to_model_range
from diffusion import create_diffusion
from models_with_layer_pruning import DiT, create_model, keep_patterns, parse_groups

from .conftest import ROOT

MODEL = "DiT-Ti/4"  # 12 blocks x 192; 8x8 latents -> 4 tokens
DEPTH = 12
IDENTITY = [2, 5, 8, 11]  # blocks whose adaLN is zeroed: they return their input exactly (11 is the last one)
BK_SDM_D14 = [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27]


def tiny_model(identity=(), in_channels=4, seed=0):
    """Random non-zero weights everywhere (the default init zeroes adaLN: every block would be an identity)."""
    model = create_model(MODEL, input_size=8, num_classes=4, in_channels=in_channels)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for i in identity:  # gates = 0: x + 0 * attn(...) + 0 * mlp(...) == x
            model.blocks[i].adaLN_modulation[-1].weight.zero_()
            model.blocks[i].adaLN_modulation[-1].bias.zero_()
    return model.eval()


def write_features(root, n=40, classes=4, size=8, seed=0):
    """Per-file layout of extract_features.py: [x, flip(x)] per sample and its label."""
    rng = np.random.default_rng(seed)
    (root / "imagenet64_features").mkdir(parents=True)
    (root / "imagenet64_labels").mkdir()
    for i in range(n):
        x = rng.standard_normal((4, size, size)).astype(np.float32)
        np.save(root / "imagenet64_features" / f"{i}.npy", np.stack([x, x[..., ::-1]]))
        np.save(root / "imagenet64_labels" / f"{i}.npy", np.array([i % classes]))
    return root


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(checkpoint path, model): a training checkpoint whose EMA holds the model with identity blocks."""
    root = tmp_path_factory.mktemp("source")
    model = tiny_model(IDENTITY)
    decoy = tiny_model(seed=1).state_dict()  # 'model' entry: must not be the one scored (EMA is preferred)
    torch.save({"model": decoy, "ema": model.state_dict(), "train_steps": 1}, root / "ckpt.pt")
    return root / "ckpt.pt", model


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return write_features(tmp_path_factory.mktemp("features"))


def run_script(name, *args):
    return subprocess.run(
        [sys.executable, str(ROOT / name), *map(str, args)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def user_error(capsys, module, argv):
    """Run a script in-process the way its __main__ does; return the one-line error it prints."""
    with pytest.raises(SystemExit) as e:
        run(lambda: module.main(module.parse_args(argv)))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def assert_shallow_matches(path, model, kept, removed_identities=False):
    """The pruned file loads strictly into a depth-k DiT that computes what the source computes on the kept blocks."""
    shallow = DiT(**{**model.config, "depth": len(kept)})
    shallow.load_state_dict(load_file(path), strict=True)
    shallow.eval()
    g = torch.Generator().manual_seed(5)
    x, t, y = torch.randn(6, 4, 8, 8, generator=g), torch.randint(0, 1000, (6,), generator=g), torch.arange(6) % 4
    mask = torch.zeros(model.depth)
    mask[kept] = 1
    with torch.no_grad():
        expected, got = model(x, t, y, layer_mask=mask), shallow(x, t, y)
        full = model(x, t, y)
    assert torch.allclose(got, expected, atol=1e-6)
    if removed_identities:  # removing blocks that return their input changes nothing
        assert torch.allclose(got, full, atol=1e-6)
    else:  # the removed blocks did something: the comparison above has teeth
        assert not torch.allclose(got, full, atol=1e-4)
    for j, i in enumerate(kept):
        assert torch.equal(shallow.blocks[j].mlp.fc1.weight, model.blocks[i].mlp.fc1.weight)


# ------------------------------------------------------------------------------------------ prune_by_score


def test_select_blocks_lowest_bi_never_last():
    scores = [0.5, 0.1, 0.3, 0.0, 0.2, 0.0]
    assert prune_by_score.select_blocks(scores, 2) == ([0, 2, 4, 5], [1, 3])
    assert prune_by_score.select_blocks(scores, 3) == ([0, 2, 5], [1, 3, 4])  # 5 has the lowest BI but is last
    assert prune_by_score.select_blocks(scores, 5) == ([5], [0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="--n-pruned 6 does not fit a model of depth 6"):
        prune_by_score.select_blocks(scores, 6)


@pytest.mark.slow
def test_bi_removes_identity_blocks_and_saves_a_loadable_model(source, features, tmp_path):
    ckpt, model = source
    out = tmp_path / "bi.pt"
    result = run_script("prune_by_score.py", "--model", MODEL, "--ckpt", ckpt, "--data-path", features,
                    "--num-classes", 4, "--nsamples", 24, "--batch-size", 10, "--n-pruned", 3,
                    "--save-model", out, "--device", "cpu")  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"^\s*(\d+)\s+(\d+\.\d+)\s+(kept|removed)", result.stdout, flags=re.M)
    assert [int(r[0]) for r in rows] == list(range(DEPTH))
    printed = [float(r[1]) for r in rows]
    assert [int(r[0]) for r in rows if r[2] == "removed"] == [2, 5, 8]
    assert "kept indices: [0, 1, 3, 4, 6, 7, 9, 10, 11]" in result.stdout
    assert re.search(r"^\s*11\s+\S+\s+kept \(last block", result.stdout, flags=re.M)  # an identity, yet kept
    for i, bi in enumerate(printed):
        assert (bi < 1e-6) if i in IDENTITY else (bi > 1e-3), (i, bi)
    meta = read_metadata(out)
    assert meta["kept_indices"] == [0, 1, 3, 4, 6, 7, 9, 10, 11] and meta["removed_indices"] == [2, 5, 8]
    assert meta["source_model"] == MODEL and meta["method"] == "bi-score" and meta["depth"] == 9
    assert meta["legacy_bi"] is False and meta["nsamples"] == 24
    assert np.allclose(meta["scores"], printed, atol=1e-6)
    assert max(meta["scores"][i] for i in IDENTITY) < 1e-12  # exact identities: cos = 1 in float64
    assert f"saved the pruned model to {out}" in result.stdout
    assert "params 8.20M -> 6.20M" in result.stdout
    assert_shallow_matches(out, model, meta["kept_indices"], removed_identities=True)


def record_inputs(monkeypatch, module):
    """Make the script's model record every (x, t, y) it is called with."""
    seen = []
    real = create_model  # the original, also when a test patches twice

    def create_and_record(*args, **kwargs):
        model = real(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, a: seen.append([v.clone() for v in a]))
        return model

    monkeypatch.setattr(module, "create_model", create_and_record)
    return seen


def manual_bi(model, inputs):
    """BI per block without hooks: the model's pieces run by hand, cosines in numpy."""
    sums, count = np.zeros(len(model.blocks)), 0
    with torch.no_grad():
        for x, t, y in inputs:
            c = model.t_embedder(t) + model.y_embedder(y, torch.zeros_like(y, dtype=torch.bool))
            h = model.x_embedder(x) + model.pos_embed
            for i, block in enumerate(model.blocks):
                out = block(h, c)
                a, b = h.double().numpy(), out.double().numpy()
                cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
                sums[i] += cos.sum()
                h = out
            count += cos.size
    return 1 - sums / count


def test_bi_inputs_noised_by_default_clean_under_legacy_flag(source, features, monkeypatch, capsys):
    ckpt, model = source
    clean = torch.stack([torch.from_numpy(np.load(f)[0]) for f in sorted(
        (features / "imagenet64_features").glob("*.npy"), key=lambda f: int(f.stem))])  # fmt: skip
    argv = ["--model", MODEL, "--ckpt", str(ckpt), "--data-path", str(features), "--num-classes", "4",
            "--nsamples", "12", "--batch-size", "5", "--n-pruned", "2", "--seed", "7"]  # fmt: skip
    runs = {}
    for legacy in (True, False):
        seen = record_inputs(monkeypatch, prune_by_score)
        result = prune_by_score.main(prune_by_score.parse_args(argv + ["--legacy-bi"] * legacy))
        runs[legacy] = (seen, result)
        assert [len(x) for x, _, _ in seen] == [5, 5, 2]  # 12 samples in batches of 5
    capsys.readouterr()

    seen, _ = runs[True]
    x = torch.cat([s[0] for s in seen])
    t_legacy = torch.cat([s[1] for s in seen])
    rows = [int(torch.nonzero((clean == xi).flatten(1).all(1))[0]) for xi in x]  # every input IS a clean latent
    assert len(set(rows)) == 12  # 12 distinct samples (view 0, un-flipped)
    assert torch.equal(torch.cat([s[2] for s in seen]), torch.tensor(rows) % 4)  # with their real labels
    assert t_legacy.max() < 250 and t_legacy.min() >= 0

    seen, result = runs[False]
    t = torch.cat([s[1] for s in seen])
    assert t.max() >= 250 and t.max() < 1000  # the whole diffusion, not the authors' first quarter
    assert torch.equal(torch.cat([s[2] for s in seen]), torch.tensor(rows) % 4)  # same subset for the same seed
    x_t, x0 = torch.cat([s[0] for s in seen]), clean[rows]
    diffusion = create_diffusion("")
    a = torch.from_numpy(diffusion.sqrt_alphas_cumprod).float()[t].view(-1, 1, 1, 1)
    b = torch.from_numpy(diffusion.sqrt_one_minus_alphas_cumprod).float()[t].view(-1, 1, 1, 1)
    noise = (x_t - a * x0) / b  # x_t = q_sample(x0, t, noise): the recovered noise is standard normal
    assert abs(noise.mean().item()) < 0.1 and abs(noise.std().item() - 1) < 0.1
    assert np.allclose(result.scores, manual_bi(model, seen), atol=1e-9)  # hooks == the BI computed by hand
    assert result.removed == [2, 5] and result.path is None


def test_bi_on_an_image_folder_encoded_on_the_fly(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    expected = {}
    for c in range(2):
        (tmp_path / "images" / f"class{c}").mkdir(parents=True)
        for k in range(3):
            arr = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            path = tmp_path / "images" / f"class{c}" / f"{k}.png"
            Image.fromarray(arr).save(path)
            expected[path.name, c] = to_model_range(center_crop_arr(Image.open(path), 8))
    model = tiny_model([0, 3], in_channels=3)
    torch.save(model.state_dict(), tmp_path / "pix.pt")
    seen = record_inputs(monkeypatch, prune_by_score)
    result = prune_by_score.main(prune_by_score.parse_args([
        "--model", MODEL, "--ckpt", str(tmp_path / "pix.pt"), "--data-path", str(tmp_path / "images"),
        "--vae", "none", "--image-size", "8", "--num-classes", "4", "--n-pruned", "2", "--num-workers", "0",
        "--legacy-bi", "--save-model", str(tmp_path / "out.pt")]))  # fmt: skip
    assert "kept indices: [1, 2, 4, 5, 6, 7, 8, 9, 10, 11]" in capsys.readouterr().out
    assert result.removed == [0, 3]
    x, y = seen[0][0], seen[0][2]
    assert len(x) == 6  # --nsamples 128 > 6 images: all of them
    for xi, yi in zip(x, y):  # every input is one of the center-cropped images, with its class as label
        assert any(torch.equal(xi, img) and yi == c for (_, c), img in expected.items())
    shallow = DiT(**{**model.config, "depth": 10})
    shallow.load_state_dict(load_file(tmp_path / "out.pt"), strict=True)  # a 3-channel (pixel) model


def test_bi_user_errors(source, features, capsys, tmp_path):
    ckpt, _ = source
    base = ["--model", MODEL, "--data-path", str(features), "--num-classes", "4"]
    err = user_error(capsys, prune_by_score, base + ["--n-pruned", "2"])
    assert "--ckpt is required" in err
    err = user_error(capsys, prune_by_score, base + ["--ckpt", str(ckpt), "--n-pruned", "12"])
    assert "--n-pruned 12 does not fit a model of depth 12" in err
    bad = write_features(tmp_path / "bad", n=3, classes=8)
    np.save(bad / "imagenet64_labels" / "2.npy", np.array([7]))
    err = user_error(capsys, prune_by_score, base + ["--data-path", str(bad), "--ckpt", str(ckpt), "--n-pruned", "2"])
    assert "the data holds label 7, beyond --num-classes 4" in err
    err = user_error(capsys, prune_by_score, base + ["--model", "DiT-Ti/2", "--ckpt", str(ckpt), "--n-pruned", "2"])
    assert "does not fit the model" in err


# ------------------------------------------------------------------------------------------ prune_by_index


def test_parse_index_list():
    for text in ("[0,2,4]", "0,2,4", "0 2 4", "(0, 2, 4)", " [0, 2,4] "):
        assert prune_by_index.parse_index_list(text) == [0, 2, 4]
    for text in ("0,x", "", "[]", "1.5,2", "oracles"):
        with pytest.raises(ValueError, match="not a list of block indices"):
            prune_by_index.parse_index_list(text)


def test_oracle_rule():
    assert prune_by_index.oracle_indices(28, 14) == BK_SDM_D14
    assert prune_by_index.oracle_indices(14, 7) == [0, 2, 4, 7, 9, 11, 13]
    assert prune_by_index.oracle_indices(12, 6) == [0, 2, 4, 7, 9, 11]
    assert prune_by_index.oracle_indices(28, 7) == [0, 5, 9, 14, 18, 23, 27]  # 4.5 rounds up
    for depth in range(3, 30):
        for k in range(2, depth):
            kept = prune_by_index.oracle_indices(depth, k)
            assert len(kept) == k and kept[0] == 0 and kept[-1] == depth - 1
            assert all(b > a for a, b in zip(kept, kept[1:]))
            gaps = np.diff(kept)
            assert gaps.max() - gaps.min() <= 1  # evenly spread
    for k in (1, 28, 29):
        with pytest.raises(ValueError, match=f"--target-depth {k} does not fit a model of depth 28"):
            prune_by_index.oracle_indices(28, k)


def test_random_patterns_keep_n_of_each_m_uniformly():
    groups = parse_groups("[[2,4],[1,2],[3,4],[1,2]]", 12)
    draws = [prune_by_index.random_indices(groups, seed) for seed in range(3000)]
    for kept in draws[:50]:
        assert len(kept) == 7 and kept == sorted(kept)
        assert [sum(lo <= i < lo + m for i in kept) for lo, m in ((0, 4), (4, 2), (6, 4), (10, 2))] == [2, 1, 3, 1]
    assert prune_by_index.random_indices(groups, 11) == draws[11]  # reproducible by seed
    assert len({tuple(d) for d in draws[:10]}) > 5  # and different across seeds
    first = [tuple(i for i in kept if i < 4) for kept in draws]  # the 2:4 group: C(4, 2) = 6 patterns
    patterns = {tuple(p.nonzero().flatten().tolist()) for p in keep_patterns(2, 4)}
    assert set(first) == patterns
    freq = np.array([first.count(p) for p in sorted(patterns)]) / len(first)
    assert np.abs(freq - 1 / 6).max() < 0.03  # uniform over the patterns
    d28 = prune_by_index.random_indices(parse_groups("1:2", 28), 0)
    assert len(d28) == 14 and all(d28[j] in (2 * j, 2 * j + 1) for j in range(14))


def test_model_hint_names_the_shallow_xl_config():
    def fake_xl(depth):  # only the shapes infer_dit_config reads; no 675M-parameter model needed
        sd = {"x_embedder.proj.weight": torch.empty(1152, 4, 2, 2), "pos_embed": torch.empty(1, 256, 1152),
              "y_embedder.embedding_table.weight": torch.empty(1001, 1152),
              "final_layer.linear.weight": torch.empty(32, 1152)}  # fmt: skip
        sd.update({f"blocks.{i}.mlp.fc1.bias": torch.empty(1) for i in range(depth)})
        return sd

    assert model_hint(fake_xl(14), "DiT-XL/2") == "the pruned model is a --model DiT-D14/2"
    assert model_hint(fake_xl(7), "DiT-XL/2") == "the pruned model is a --model DiT-D7/2"
    assert model_hint(fake_xl(9), "DiT-XL/2") == "the pruned model is a --model DiT-XL/2 --depth 9"


@pytest.mark.slow
def test_index_explicit_list_round_trip(source, tmp_path):
    ckpt, model = source
    out = tmp_path / "list.pt"
    result = run_script("prune_by_index.py", "--model", MODEL, "--ckpt", ckpt, "--kept-indices", "[0, 5,3,11]",
                    "--save-model", out)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "note: sorted the kept indices to [0, 3, 5, 11]" in result.stdout
    assert "kept indices (index): [0, 3, 5, 11]" in result.stdout
    assert "12 -> 4 blocks, params 8.20M -> 2.87M" in result.stdout
    assert f"saved the pruned model to {out}" in result.stdout
    meta = read_metadata(out)
    assert meta["kept_indices"] == [0, 3, 5, 11] and meta["source_model"] == MODEL and meta["method"] == "index"
    assert meta["groups"] is None
    assert_shallow_matches(out, model, [0, 3, 5, 11])


def test_index_oracle_and_random_end_to_end(source, tmp_path, capsys, script):
    ckpt, model = source
    out = tmp_path / "oracle.safetensors"
    result = script("prune_by_index.py", "--model", MODEL, "--ckpt", ckpt, "--kept-indices", "oracle",
                    "--save-model", out)  # fmt: skip
    assert result.code == 0, result.err
    assert "kept indices (oracle): [0, 2, 4, 7, 9, 11]" in result.out
    meta = read_metadata(out)
    assert meta["kept_indices"] == [0, 2, 4, 7, 9, 11] and meta["method"] == "oracle"
    assert_shallow_matches(out, model, [0, 2, 4, 7, 9, 11])

    argv = ["--model", MODEL, "--ckpt", str(ckpt), "--kept-indices", "random", "--groups", "2:4"]
    runs = {}
    for seed in (3, 3, 4):
        path = tmp_path / f"random{seed}.pt"
        runs.setdefault(seed, []).append(prune_by_index.main(prune_by_index.parse_args(
            argv + ["--seed", str(seed), "--save-model", str(path)])))  # fmt: skip
    assert runs[3][0] == runs[3][1] == prune_by_index.random_indices([[2, 4]] * 3, 3)
    assert runs[3][0] != runs[4][0]
    meta = read_metadata(tmp_path / "random3.pt")
    assert meta["method"] == "random" and meta["groups"] == [[2, 4]] * 3 and meta["seed"] == 3
    assert meta["kept_indices"] == runs[3][0]
    assert_shallow_matches(tmp_path / "random3.pt", model, runs[3][0])
    assert f"kept indices (random, groups [[2, 4], [2, 4], [2, 4]], seed 3): {runs[3][0]}" in capsys.readouterr().out


def test_index_bad_list_is_one_line_exit_2(source, tmp_path, script):
    ckpt, _ = source
    result = script("prune_by_index.py", "--model", MODEL, "--ckpt", ckpt, "--kept-indices", "0,4,12",
                    "--save-model", tmp_path / "x.pt")  # fmt: skip
    assert result.code == 2
    assert result.err.count("\n") == 1
    assert "kept indices [12] are out of range for a model of depth 12" in result.err
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--kept-indices", "0,3,3,5"], "kept indices contain duplicates: [3]"),
        (["--kept-indices=-1,3"], "kept indices [-1] are out of range"),
        (["--kept-indices", "0;3"], "--kept-indices '0;3' is not a list of block indices"),
        (["--kept-indices", "oracle", "--target-depth", "12"], "--target-depth 12 does not fit a model of depth 12"),
        (["--kept-indices", "random", "--groups", "1:5"], "group 1:5 does not tile a depth of 12"),
        (["--kept-indices", "random", "--target-depth", "4"], "keeps 6 blocks, --target-depth says 4"),
        (["--kept-indices", str(list(range(12)))], "keeps all 12 blocks: nothing to prune"),
        (["--kept-indices", "0,1", "--model", "DiT-S/4"], "the file holds a DiT of depth 12, width 192"),
    ],
)
def test_index_user_errors(source, capsys, extra, message):
    argv = ["--model", MODEL, "--ckpt", str(source[0]), *extra]
    assert message in user_error(capsys, prune_by_index, argv)


def test_paper_oracle_is_the_readme_list_and_oracle_bk_sdm():
    args = prune_by_index.parse_args(["--ckpt", "x", "--kept-indices", "paper-oracle"])
    assert prune_by_index.select_indices(args, 28)[0] == [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27]
    args.kept_indices = "oracle"
    assert prune_by_index.select_indices(args, 28)[0] == BK_SDM_D14
    args.kept_indices = "paper-oracle"
    with pytest.raises(ValueError, match="28 -> 14 blocks, not for a model of depth 12: use oracle"):
        prune_by_index.select_indices(args, 12)


def test_the_authors_defaults_and_flags(source, capsys, tmp_path, monkeypatch):
    score = prune_by_score.parse_args(["--n-pruned", "2"])
    assert (score.data_path, score.num_classes, score.vae) == ("data/imagenet/train", 1000, "ema")
    monkeypatch.chdir(tmp_path)  # no data/imagenet/train here: the error says what to pass
    err = user_error(capsys, prune_by_score, ["--model", MODEL, "--ckpt", str(source[0]), "--n-pruned", "2"])
    assert "--data-path data/imagenet/train (the default) is not a folder: pass --data-path with" in err
    argv = ["--model", MODEL, "--ckpt", str(source[0]), "--kept-indices", "oracle", "--vae", "ema", "--cfg-scale",
            "4.0", "--num-sampling-steps", "250", "--pruner", "x", "--nsamples", "8", "--batch-size", "2"]  # fmt: skip
    assert prune_by_index.main(prune_by_index.parse_args(argv)) == [0, 2, 4, 7, 9, 11]
    assert "--vae, --cfg-scale, --num-sampling-steps, --pruner, --nsamples, --batch-size have no effect" in (
        capsys.readouterr().out
    )
    err = user_error(capsys, prune_by_index, [*argv, "--num-classes", "1000"])
    assert "--num-classes 1000 does not fit" in err and "its model has 4 classes" in err
