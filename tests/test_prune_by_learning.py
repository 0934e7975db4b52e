"""prune_by_learning.py: the gates find the working layers, the output file is right, gradients and lrs
are confined to what was asked, resume keeps the decision history, and it runs under torchrun."""

import json
import os
import subprocess
import sys

import pytest
import torch

import prune_by_learning as pbl
from diffcompress.checkpoint import load_file, read_metadata
from diffcompress.data import FeatureDataset
from diffcompress.trainer import train
from models_with_layer_pruning import DiT, create_model

from .conftest import CPU, ROOT, TOY_DIT, TOY_FLAGS
from .test_model import randomized
from .test_train import fit_tiny_dit, free_port, make_features


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return make_features(tmp_path_factory.mktemp("features"), n=64)


def prune_args(features, results, *extra):
    return pbl.parse_args(["--data-path", str(features), "--results-dir", str(results), *TOY_FLAGS, *extra])


@pytest.fixture(scope="module")
def trained_pair(features, tmp_path_factory):
    """A 2-block DiT fitted to the toy set: its blocks do useful work."""
    torch.manual_seed(0)
    return fit_tiny_dit(DiT(**TOY_DIT, depth=2), features, tmp_path_factory.mktemp("r")).state_dict()


def with_identity_blocks(trained: dict) -> DiT:
    """Depth 4, groups 1:2: blocks 0 and 2 are exact identities (zero adaLN), 1 and 3 the trained blocks.
    (The working blocks sit second in each pair, so a decision left at the tie-break would be wrong.)"""
    torch.manual_seed(1)
    model = randomized(DiT(**TOY_DIT, depth=4, groups=[[1, 2], [1, 2]]))
    state = model.state_dict()
    for key, value in trained.items():
        state[key.replace("blocks.1.", "blocks.3.").replace("blocks.0.", "blocks.1.")] = value
    model.load_state_dict(state)
    with torch.no_grad():
        for i in (0, 2):
            model.blocks[i].adaLN_modulation[-1].weight.zero_()
            model.blocks[i].adaLN_modulation[-1].bias.zero_()
    return model


def test_learning_keeps_the_working_blocks(features, trained_pair, tmp_path):
    model = with_identity_blocks(trained_pair)
    x, c = torch.randn(2, 16, 64), torch.randn(2, 64)
    assert torch.equal(model.blocks[0](x, c), x) and not torch.allclose(model.blocks[1](x, c), x)
    args = prune_args(features, tmp_path, "--max-steps", "40", "--lr", "1e-3", "--ema-decay", "0.9",
                      "--log-every", "10")  # fmt: skip
    summary = pbl.learn_pruning(args, CPU, model, FeatureDataset(features))
    assert summary["kept_indices"] == [1, 3]
    assert summary["decisions"] == [[1], [1]]
    assert [h["step"] for h in summary["history"]] == [10, 20, 30, 40]
    exp = tmp_path / "prune-DiT-XL-1-2"
    assert (exp / "decisions.png").stat().st_size > 1000
    assert json.loads((exp / "decisions.json").read_text())["history"][-1]["kept"] == [1, 3]


def test_saved_file_matches_the_decision(features, trained_pair, tmp_path):
    model = with_identity_blocks(trained_pair)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    args = prune_args(features, tmp_path, "--max-steps", "3", "--log-every", "3")
    summary = pbl.learn_pruning(args, CPU, model, FeatureDataset(features))
    kept, path = summary["kept_indices"], tmp_path / "prune-DiT-XL-1-2" / "pruned.pt"
    shallow = DiT(**TOY_DIT, depth=2)
    shallow.load_state_dict(torch.load(path, weights_only=True))  # strict, a plain state dict
    assert read_metadata(path)["kept_indices"] == kept and read_metadata(path)["groups"] == [[1, 2], [1, 2]]
    reference = DiT(**TOY_DIT, depth=4, groups=[[1, 2], [1, 2]])
    reference.load_state_dict(original)
    mask = torch.zeros(4)
    mask[kept] = 1
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 990]), torch.tensor([0, 1, 3])
    with torch.no_grad():
        torch.testing.assert_close(shallow.eval()(x, t, y), reference.eval()(x, t, y, layer_mask=mask))
    assert summary["params_after"] == sum(p.numel() for p in shallow.parameters())


@pytest.mark.parametrize("merge", [False, True])
def test_lora_discard_or_merge(features, trained_pair, tmp_path, merge):
    model = with_identity_blocks(trained_pair)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    extra = ["--merge-weights"] if merge else []
    args = prune_args(features, tmp_path, "--max-steps", "3", "--lora", "--delta-w", "--lr", "1e-2", *extra)
    kept = pbl.learn_pruning(args, CPU, model, FeatureDataset(features))["kept_indices"]
    saved = torch.load(tmp_path / "prune-DiT-XL-1-2" / "pruned.pt", weights_only=True)
    ema = load_file(tmp_path / "prune-DiT-XL-1-2" / "checkpoints" / "0000003.pt")["ema"]
    pairs = [(f"blocks.{new}.{name}", f"blocks.{old}.{name}") for new, old in enumerate(kept)
             for name in ("attn.qkv", "mlp.fc2", "adaLN_modulation.1")]  # fmt: skip
    pairs += [(name, name) for name in ("t_embedder.mlp.0", "final_layer.linear", "final_layer.adaLN_modulation.1")]
    for new, old in pairs:  # adapters sit on every Linear, the embedder's and final layer's too
        weight, base = saved[f"{new}.weight"], original[f"{old}.weight"]
        if not merge:
            assert torch.equal(weight, base)  # the paper's choice: original weights
        else:  # W + (alpha / r) * B @ A of the EMA adapters (torchtune's key names), computed here independently
            a, b = ema[f"{old}.lora_a.weight"], ema[f"{old}.lora_b.weight"]
            assert b.abs().max() > 0
            torch.testing.assert_close(weight, base + (16 / 8) * b @ a)
    assert not any("lora" in k for k in saved)


@pytest.mark.parametrize("mode", ["frozen", "lora-only", "lora", "full"])
def test_only_requested_parameters_train_at_the_right_lr(features, tmp_path, mode, capsys):
    """The authors' semantics: --lora alone trains the gates only, --delta-w every parameter but the gates
    (our earlier versions read --lora as --delta-w --lora and --delta-w as the blocks' weights only)."""
    extra = {"frozen": [], "lora-only": ["--lora"], "lora": ["--lora", "--delta-w"], "full": ["--delta-w"]}[mode]
    args = prune_args(features, tmp_path, "--max-steps", "2", "--lr", "1e-3", *extra)
    model, groups = pbl.configure_trainable(randomized(DiT(**TOY_DIT, depth=4, groups=[[1, 2], [1, 2]])), args)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"gate_logits.0", "gate_logits.1"} <= trainable
    others = trainable - {"gate_logits.0", "gate_logits.1"}
    linears = [n for n, m in DiT(**TOY_DIT, depth=4).named_modules() if isinstance(m, torch.nn.Linear)]
    if mode in ("frozen", "lora-only"):
        assert not others and len(groups) == 1
        assert not any("lora" in n for n, _ in model.named_parameters())
    elif mode == "lora":
        assert others == {f"{n}.lora_{ab}.weight" for n in linears for ab in "ab"}
        assert {"t_embedder.mlp.0", "t_embedder.mlp.2", "final_layer.linear"} <= set(linears)
    else:
        assert others == {n for n, _ in model.named_parameters() if not n.startswith("gate_logits")} - {"pos_embed"}
        assert {"x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.bias"} <= others
    assert groups[0]["lr"] == pytest.approx(10 * args.lr) and all(g["lr"] == args.lr for g in groups[1:])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(args, CPU, model, pbl.pruning_objective(args, 2), FeatureDataset(features), groups)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed <= trainable and "gate_logits.0" in changed
    said = pbl.describe_trainable(model, groups, args)
    assert said.startswith("trains the gate logits (2 groups, 4 logits, lr 0.01)")
    assert ("only; the weights stay frozen" in said) == (mode in ("frozen", "lora-only"))
    assert ("add --delta-w to learn the LoRA update" in said) == (mode == "lora-only")


def test_lora_on_every_linear_of_xl2_counts_6001920():
    """DiT-XL/2 at rank 8 on the meta device: adapters on all 144 Linears (28 blocks x 5, the timestep
    MLP's 2, the final layer's 2), r * (in + out) each by the layer table of the official checkpoint."""
    with torch.device("meta"):
        model, groups = pbl.configure_trainable(
            create_model("DiT-XL-1-2"), pbl.parse_args(["--data-path", "-", "--lora", "--delta-w"])
        )
    block = (1152 + 3456) + (1152 + 1152) + (1152 + 4608) + (4608 + 1152) + (1152 + 6912)
    outside = (256 + 1152) + (1152 + 1152) + (1152 + 32) + (1152 + 2304)
    assert 8 * 28 * block == 5_935_104  # the blocks alone (our earlier choice)
    assert 8 * (28 * block + outside) == 6_001_920
    assert sum(p.numel() for p in groups[1]["params"]) == 6_001_920
    assert len(pbl.lora_layers(model)) == 144


def test_vae_flag_has_the_authors_choices(features):
    assert pbl.parse_args(["--data-path", str(features)]).vae == "ema"
    assert pbl.parse_args(["--data-path", str(features), "--vae", "mse"]).vae == "mse"
    with pytest.raises(SystemExit):
        pbl.parse_args(["--data-path", str(features), "--vae", "xl"])


def test_resume_continues_the_decision_history(features, trained_pair, tmp_path):
    args = prune_args(features, tmp_path / "a", "--max-steps", "8", "--log-every", "2", "--ckpt-every", "4",
                      "--lr", "1e-3")  # fmt: skip
    straight = pbl.learn_pruning(args, CPU, with_identity_blocks(trained_pair), FeatureDataset(features))
    middle = tmp_path / "a" / "prune-DiT-XL-1-2" / "checkpoints" / "0000004.pt"
    args = prune_args(features, tmp_path / "b", "--max-steps", "8", "--log-every", "2", "--lr", "1e-3",
                      "--resume", str(middle))  # fmt: skip
    resumed = pbl.learn_pruning(args, CPU, with_identity_blocks(trained_pair), FeatureDataset(features))
    assert [h["step"] for h in resumed["history"]] == [2, 4, 6, 8]
    assert resumed["history"] == straight["history"]


@pytest.mark.slow
def test_torchrun_two_processes(features, tmp_path):
    out = tmp_path / "d6.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(ROOT / "prune_by_learning.py"), "--model", "DiT-Ti/4",
           "--groups", "1:2", "--data-path", str(features), "--results-dir", str(tmp_path), *TOY_FLAGS,
           "--max-steps", "4", "--log-every", "2", "--lora", "--delta-w", "--vae", "mse",
           "--save-model", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kept 6/12 layers" in result.stdout
    meta = read_metadata(out)
    assert len(meta["kept_indices"]) == 6 and meta["groups"] == [[1, 2]] * 6 and meta["update"] == "lora"
    assert meta["vae"] == "mse" and "LoRA rank 8 alpha 16 on all 64 Linear layers" in result.stdout
    assert all(k // 2 == g for g, k in enumerate(meta["kept_indices"]))  # one block from each pair
    create_model("DiT-Ti/4", input_size=8, num_classes=4, depth=6).load_state_dict(torch.load(out, weights_only=True))
    assert (tmp_path / "prune-DiT-Ti-4" / "decisions.png").is_file()


@pytest.mark.slow
def test_plain_model_is_refused(features, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "prune_by_learning.py"), "--model", "DiT-Ti/4",
                             "--data-path", str(features), *TOY_FLAGS, "--max-steps", "1"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert result.returncode == 2 and "has no pruning groups" in result.stderr and "Traceback" not in result.stderr
