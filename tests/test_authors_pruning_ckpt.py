"""A pruning run started with the authors' code continues or finishes here: their checkpoint (gates
``gumbel_gates.{g}`` [1, K], torchtune LoRA ``<layer>.lora_a.weight`` / ``lora_b.weight`` beside each
Linear's ``weight``/``bias``) loads into our prunable DiT, and the model then computes what their model
computes: every Linear W x + b + (alpha / r) B A x, the blocks of the argmax keep-pattern of each group."""

import argparse
import itertools
import json

import pytest
import torch
import torch.nn.functional as F

import prune_by_learning as pbl
from diffcompress.errors import UserError
from models_with_layer_pruning import DiT, create_model

from .conftest import TOY_DIT, TOY_FLAGS
from .test_model import randomized
from .test_train import make_features

GROUPS = [[1, 2], [2, 4]]  # depth 6; the 2:4 group has 6 patterns
RANK, ALPHA = 8, 16


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return make_features(tmp_path_factory.mktemp("features"), n=32)


def authors_state(plain: DiT, groups, seed: int, rank: int = RANK) -> dict[str, torch.Tensor]:
    """The state dict of the authors' prunable DiT with LoRA, by their key names: DiT's keys, a torchtune
    adapter on every nn.Linear, and one [1, C(M, N)] gate per group."""
    g = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in randomized(plain, seed).state_dict().items()}
    for name, module in plain.named_modules():
        if isinstance(module, torch.nn.Linear):
            out_f, in_f = module.weight.shape
            state[f"{name}.lora_a.weight"] = torch.randn(rank, in_f, generator=g) * 0.1
            state[f"{name}.lora_b.weight"] = torch.randn(out_f, rank, generator=g) * 0.1
    for i, (n, m) in enumerate(groups):
        state[f"gumbel_gates.{i}"] = torch.randn(1, len(list(itertools.combinations(range(m), n))), generator=g)
    return state


def their_checkpoint(path, model_state, ema_state):
    """Saved as their training loop saves (DiT's train.py layout)."""
    torch.save({"model": model_state, "ema": ema_state, "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(lora=True, delta_w=True)}, path)  # fmt: skip
    return path


def reference_mask(state, groups) -> torch.Tensor:
    """Kept blocks: per group, the lexicographic pattern of C(M, N) whose gate logit is largest."""
    mask = []
    for i, (n, m) in enumerate(groups):
        kept = list(itertools.combinations(range(m), n))[int(state[f"gumbel_gates.{i}"].argmax())]
        mask += [1.0 if j in kept else 0.0 for j in range(m)]
    return torch.tensor(mask)


def merged_reference(state, **config) -> DiT:
    """A plain DiT whose Linear weights are W + (alpha / r) B @ A, computed from the file's tensors."""
    model = DiT(**config)
    plain = {k: v for k, v in state.items() if "lora_" not in k and not k.startswith("gumbel_gates")}
    for key in [k for k in state if k.endswith(".lora_a.weight")]:
        layer = key[: -len(".lora_a.weight")]
        plain[f"{layer}.weight"] = state[f"{layer}.weight"] + (ALPHA / RANK) * (
            state[f"{layer}.lora_b.weight"] @ state[f"{layer}.lora_a.weight"]
        )
    model.load_state_dict(plain)
    return model.eval()


def lora_args(features, tmp_path, *extra):
    return pbl.parse_args(["--data-path", str(features), "--results-dir", str(tmp_path), *TOY_FLAGS, *extra])


def test_their_gates_and_adapters_load_and_compute_as_theirs(features, tmp_path):
    live = authors_state(DiT(**TOY_DIT, depth=6), GROUPS, seed=1)
    ema = authors_state(DiT(**TOY_DIT, depth=6), GROUPS, seed=2)
    path = their_checkpoint(tmp_path / "their.pt", live, ema)
    args = lora_args(features, tmp_path, "--lora", "--delta-w")
    model, _ = pbl.configure_trainable(DiT(**TOY_DIT, depth=6, groups=GROUPS), args)
    pbl.load_start_weights(model, str(path), args)

    ours = model.state_dict()  # the ema entry, as every loader of the project takes
    for i in range(len(GROUPS)):
        assert torch.equal(ours[f"gate_logits.{i}"], ema[f"gumbel_gates.{i}"][0])
    adapters = [k for k in ema if "lora_" in k]
    assert len(adapters) == 2 * (6 * 5 + 4)  # every Linear: 5 per block, timestep MLP 2, final layer 2
    assert all(torch.equal(ours[k], ema[k]) for k in adapters)
    assert all(torch.equal(ours[k], v) for k, v in ema.items() if "lora_" not in k and "gumbel" not in k)

    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([3, 400, 999]), torch.tensor([0, 2, 3])
    reference = merged_reference(ema, **TOY_DIT, depth=6)
    mask = reference_mask(ema, GROUPS)
    assert 0 < mask.sum() < 6
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, t, y), reference(x, t, y, layer_mask=mask), rtol=1e-5, atol=1e-5)
        soft = torch.tensor([[1.0, 0, 1, 1, 0, 0], [0, 1, 0, 1, 1, 0]])  # any per-sample mask (training's)
        torch.testing.assert_close(
            model(x[:2], t[:2], y[:2], layer_mask=soft), reference(x[:2], t[:2], y[:2], layer_mask=soft),
            rtol=1e-5, atol=1e-5,
        )  # fmt: skip
    model.set_gumbel(tau=1.0, scaling=100.0)
    want = [F.softmax(ema[f"gumbel_gates.{i}"][0] * 100.0, dim=0).max().item() for i in range(len(GROUPS))]
    assert model.confidences() == pytest.approx(want)


def test_finish_their_run_here(features, tmp_path):
    """prune_by_learning.py --load-weight their.pt with a vanishing lr (0 is refused): the decision and the merged
    shallow model are theirs."""
    groups = [[1, 2], [2, 4], [3, 6]]  # tiles DiT-Ti/4's 12 blocks
    config = dict(input_size=8, num_classes=4)
    state = authors_state(create_model("DiT-Ti/4", **config), groups, seed=3)
    path = their_checkpoint(tmp_path / "their.pt", state, state)
    out = tmp_path / "pruned.pt"
    flags = ["--model", "DiT-Ti/4", "--groups", json.dumps(groups), "--load-weight", str(path), "--lora", "--delta-w",
             "--lr", "1e-30", "--max-steps", "1", "--merge-weights", "--save-model", str(out)]  # fmt: skip
    summary = pbl.main(lora_args(features, tmp_path, *flags))
    mask = reference_mask(state, groups)
    assert summary["kept_indices"] == mask.nonzero().flatten().tolist()
    shallow = create_model("DiT-Ti/4", **config, depth=int(mask.sum()))
    shallow.load_state_dict(torch.load(out, weights_only=True))
    reference = merged_reference(state, **create_model("DiT-Ti/4", **config).config)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 700]), torch.tensor([1, 3])
    with torch.no_grad():
        torch.testing.assert_close(shallow.eval()(x, t, y), reference(x, t, y, layer_mask=mask), rtol=1e-5, atol=1e-5)


def test_their_adapters_need_the_matching_flags(features, tmp_path):
    state = authors_state(DiT(**TOY_DIT, depth=6), GROUPS, seed=4)
    prunable = DiT(**TOY_DIT, depth=6, groups=GROUPS)

    args = lora_args(features, tmp_path, "--lora")  # gates only: trained adapters cannot be dropped silently
    model, _ = pbl.configure_trainable(prunable, args)
    with pytest.raises(UserError, match=r"holds trained LoRA adapters: pass --delta-w --lora"):
        pbl.load_start_weights(model, dict(state), args)

    untrained = {k: (torch.zeros_like(v) if ".lora_b." in k else v) for k, v in state.items()}
    pbl.load_start_weights(model, untrained, args)  # B = 0: the adapters are no-ops, the gates load
    assert torch.equal(model.gate_logits[1].detach(), state["gumbel_gates.1"][0])

    args = lora_args(features, tmp_path, "--lora", "--delta-w", "--lora-rank", "4")
    model, _ = pbl.configure_trainable(DiT(**TOY_DIT, depth=6, groups=GROUPS), args)
    with pytest.raises(UserError, match=r"has LoRA rank 8: pass --lora-rank 8"):
        pbl.load_start_weights(model, dict(state), args)


def test_our_earlier_peft_keys_load(features, tmp_path):
    """Checkpoints of our peft-based versions (``base_layer``, ``lora_A.default``) map onto the same layout."""
    state = authors_state(DiT(**TOY_DIT, depth=6), GROUPS, seed=5)
    peft = {}
    for k, v in state.items():
        if k.endswith((".lora_a.weight", ".lora_b.weight")):
            layer, ab = k[: -len(".lora_a.weight")], k[-len("a.weight")]
            peft[f"{layer}.lora_{ab.upper()}.default.weight"] = v
        elif k.startswith("gumbel_gates"):
            peft[k.replace("gumbel_gates", "gate_logits")] = v[0]
        elif f"{k.rsplit('.', 1)[0]}.lora_a.weight" in state:
            layer, leaf = k.rsplit(".", 1)
            peft[f"{layer}.base_layer.{leaf}"] = v
        else:
            peft[k] = v
    args = lora_args(features, tmp_path, "--lora", "--delta-w")
    ours, _ = pbl.configure_trainable(DiT(**TOY_DIT, depth=6, groups=GROUPS), args)
    pbl.load_start_weights(ours, peft, args)
    theirs, _ = pbl.configure_trainable(DiT(**TOY_DIT, depth=6, groups=GROUPS), args)
    pbl.load_start_weights(theirs, state, args)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dense_start_keeps_fresh_gates_and_zero_adapters(features, tmp_path):
    dense = randomized(DiT(**TOY_DIT, depth=6), seed=6).state_dict()
    args = lora_args(features, tmp_path, "--lora", "--delta-w")
    model, _ = pbl.configure_trainable(DiT(**TOY_DIT, depth=6, groups=GROUPS), args)
    pbl.load_start_weights(model, dense, args)
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in dense.items())
    assert all(torch.all(g == 0.02) for g in model.gate_logits)
    assert all(torch.all(v == 0) for k, v in own.items() if ".lora_b." in k)
    mask = torch.tensor([1.0, 0, 1, 1, 0, 0])
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 700]), torch.tensor([1, 3])
    plain = DiT(**TOY_DIT, depth=6)
    plain.load_state_dict(dense)
    with torch.no_grad():  # a fresh adapter (B = 0) changes nothing
        torch.testing.assert_close(model.eval()(x, t, y, layer_mask=mask), plain.eval()(x, t, y, layer_mask=mask))
