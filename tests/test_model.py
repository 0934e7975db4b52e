"""The DiT: parity with the official implementation, official layouts and sizes, and N:M pruning gates."""

import math

import pytest
import torch

from models_with_layer_pruning import (
    DiT,
    DiT_models,
    check_kept_indices,
    create_model,
    keep_patterns,
    parse_groups,
    pruned_state_dict,
)

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, num_heads=4, num_classes=10)


def randomized(model: DiT, seed: int = 0) -> DiT:
    """Random weights everywhere (the default init zeroes adaLN, which would hide most bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed" and not name.startswith("gate_logits"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


# ------------------------------------------------------------------------------------ parity


def test_forward_matches_official(reference, reference_model):
    with torch.no_grad():
        out = reference_model(reference["x"], reference["t"], reference["y"])
    assert (out - reference["out"]).abs().max().item() < 1e-5


def test_forward_with_cfg_matches_official(reference, reference_model):
    r = reference
    with torch.no_grad():
        out = reference_model.forward_with_cfg(r["cfg_x"], r["cfg_t"], r["cfg_y"], r["cfg_scale"])
    assert (out - r["cfg_out"]).abs().max().item() < 1e-5


def test_cfg_all_channels_guides_the_fourth_channel(reference, reference_model):
    r = reference
    with torch.no_grad():
        three = reference_model.forward_with_cfg(r["cfg_x"], r["cfg_t"], r["cfg_y"], 4.0)
        every = reference_model.forward_with_cfg(r["cfg_x"], r["cfg_t"], r["cfg_y"], 4.0, cfg_channels=None)
        plain = reference_model(torch.cat([r["cfg_x"][:2]] * 2), r["cfg_t"], r["cfg_y"])
    assert torch.equal(three[:, :3], every[:, :3])
    assert torch.equal(three[:, 3:], plain[:, 3:])  # the official default leaves channel 3 unguided
    cond, uncond = plain[:2, 3], plain[2:, 3]
    torch.testing.assert_close(every[:2, 3], uncond + 4.0 * (cond - uncond))


def test_init_positional_embedding_matches_official(reference):
    model = DiT(**reference["config"])
    torch.testing.assert_close(model.state_dict()["pos_embed"], reference["state_dict"]["pos_embed"], rtol=0, atol=1e-7)


def test_state_dict_keys_match_official(reference):
    ours = DiT(**reference["config"]).state_dict()
    assert list(ours) == list(reference["state_dict"])
    assert all(ours[k].shape == v.shape for k, v in reference["state_dict"].items())


# ------------------------------------------------------------------------------------ sizes


def official_xl2_shapes(depth: int = 28) -> dict:
    """The official DiT-XL/2 (256x256) layout, written out from its description."""
    h = 1152
    shapes = {
        "pos_embed": (1, 256, h),
        "x_embedder.proj.weight": (h, 4, 2, 2), "x_embedder.proj.bias": (h,),
        "t_embedder.mlp.0.weight": (h, 256), "t_embedder.mlp.0.bias": (h,),
        "t_embedder.mlp.2.weight": (h, h), "t_embedder.mlp.2.bias": (h,),
        "y_embedder.embedding_table.weight": (1001, h),
    }  # fmt: skip
    for i in range(depth):
        for name, shape in [("attn.qkv", (3 * h, h)), ("attn.proj", (h, h)), ("mlp.fc1", (4 * h, h)),
                            ("mlp.fc2", (h, 4 * h)), ("adaLN_modulation.1", (6 * h, h))]:  # fmt: skip
            shapes[f"blocks.{i}.{name}.weight"] = shape
            shapes[f"blocks.{i}.{name}.bias"] = (shape[0],)
    shapes.update({
        "final_layer.linear.weight": (32, h), "final_layer.linear.bias": (32,),
        "final_layer.adaLN_modulation.1.weight": (2 * h, h), "final_layer.adaLN_modulation.1.bias": (2 * h,),
    })  # fmt: skip
    return shapes


@pytest.mark.parametrize(
    "name,depth,params",
    [("DiT-XL/2", 28, 675_129_632), ("DiT-D19/2", 19, 459_983_264), ("DiT-D14/2", 14, 340_457_504),
     ("DiT-D7/2", 7, 173_121_440)],
)  # fmt: skip
def test_official_layout_and_parameter_counts(name, depth, params):
    with torch.device("meta"):
        model = create_model(name)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == official_xl2_shapes(depth)
    assert sum(math.prod(s) for s in shapes.values()) == params
    assert model.num_params() == params


def test_registry_has_every_name():
    expected = {f"DiT-{s}/{p}" for s in ("Ti", "S", "B", "L", "XL") for p in (2, 4, 8)}
    expected |= {"DiT-D19/2", "DiT-D14/2", "DiT-D7/2", "DiT-XL-1-2", "DiT-XL-2-4", "DiT-XL-7-14",
                 "DiT-XL-1-4", "DiT-D14-1-2", "DiT-D14-2-4", "DiT-Digits/2"}  # fmt: skip
    assert set(DiT_models) == expected
    kept = {"DiT-XL-1-2": 14, "DiT-XL-2-4": 14, "DiT-XL-7-14": 14, "DiT-XL-1-4": 7, "DiT-D14-1-2": 7, "DiT-D14-2-4": 7}
    for name, n_kept in kept.items():
        with torch.device("meta"):
            model = create_model(name)
        assert sum(n for n, _ in model.groups) == n_kept
        assert sum(m for _, m in model.groups) == model.depth
    with pytest.raises(ValueError, match="unknown model 'DiT-XXL/2'"):
        create_model("DiT-XXL/2")


def test_parse_groups():
    assert parse_groups("[[2,4],[3,4]]") == [[2, 4], [3, 4]]
    assert parse_groups("2:4, 3:4") == [[2, 4], [3, 4]]
    assert parse_groups("1:2", depth=8) == [[1, 2]] * 4
    custom = "[[2,4],[2,4],[3,4],[2,4],[3,4],[2,4],[2,4]]"
    with torch.device("meta"):
        model = create_model("DiT-XL/2", groups=custom)
    assert sum(n for n, _ in model.groups) == 16
    for bad, msg in [("[[3,2]]", "between 1 and M"), ("1:3", "does not tile"), ("[[1,2]]x", "cannot parse"),
                     ("[[1,2],[1,2]]", "cover 4 layers, the model has 8"), ("[]", "non-empty")]:  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            parse_groups(bad, depth=8)


# ------------------------------------------------------------------------------------ pruning


def test_keep_patterns_enumerate_every_choice():
    p = keep_patterns(2, 4)
    assert p.shape == (6, 4)
    assert (p.sum(1) == 2).all()
    assert len({tuple(r.tolist()) for r in p}) == 6
    assert keep_patterns(7, 14).shape == (math.comb(14, 7), 14)


def test_gates_initialised_to_constant():
    model = DiT(**TINY, depth=8, groups=[[1, 2], [2, 4], [1, 2]])
    assert [tuple(g.shape) for g in model.gate_logits] == [(2,), (6,), (2,)]
    assert all(torch.all(g == 0.02) for g in model.gate_logits)


@pytest.mark.parametrize("groups", [[[1, 2]] * 4, [[2, 4], [2, 4]], [[1, 4], [3, 4]], [[3, 8]]])
def test_forced_pattern_equals_shallow_model(groups):
    torch.manual_seed(0)
    model = randomized(DiT(**TINY, depth=8, groups=groups)).eval()
    with torch.no_grad():  # force a random pattern per group through the logits
        for g in model.gate_logits:
            g.copy_(torch.randn(g.shape))
    kept = model.kept_indices()
    assert len(kept) == sum(n for n, _ in groups)
    shallow = model.pruned()
    assert shallow.depth == len(kept) and not shallow.prunable
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 4, 9])
    with torch.no_grad():
        gated = model(x, t, y)
        mask = torch.zeros(8)
        mask[kept] = 1
        masked = model.train()(x, t, y, layer_mask=mask.expand(3, -1).clone(), force_drop_ids=torch.zeros(3))
        model.eval()
        reference = shallow(x, t, y)
    assert torch.equal(gated, reference)
    assert torch.equal(masked, reference)


def test_every_decision_keeps_n_of_m():
    torch.manual_seed(1)
    groups = [[1, 2], [2, 4], [3, 5], [7, 14]]
    model = DiT(**TINY, depth=25, groups=groups)
    for _ in range(20):
        with torch.no_grad():
            for g in model.gate_logits:
                g.copy_(torch.randn(g.shape))
        decisions = model.decisions()
        assert [len(d) for d in decisions] == [n for n, _ in groups]
        assert all(0 <= j < m for d, (_, m) in zip(decisions, groups) for j in d)
        masks = model.sample_layer_mask(16)
        start = 0
        for n, m in groups:
            assert torch.all(masks[:, start : start + m].sum(1) == n)
            start += m
    offsets = [0, 2, 6, 11]
    assert model.kept_indices() == [o + j for o, d in zip(offsets, model.decisions()) for j in d]


def test_gumbel_sampling_follows_the_logits():
    torch.manual_seed(0)
    model = DiT(**TINY, depth=2, groups=[[1, 2]])
    with torch.no_grad():
        model.gate_logits[0].copy_(torch.tensor([0.0, math.log(3.0)]))  # p(keep block 1) = 0.75
    model.set_gumbel(tau=1.0, scaling=1.0)
    masks = model.sample_layer_mask(20000)
    assert abs(masks[:, 1].mean().item() - 0.75) < 0.015
    model.set_gumbel(tau=1.0, scaling=100.0)  # sharpened: always the larger logit
    assert masks.shape == (20000, 2) and model.sample_layer_mask(1000)[:, 1].min().item() == 1.0
    assert model.confidences()[0] == pytest.approx(1.0)


def test_gradients_reach_gates_and_blocks():
    torch.manual_seed(0)
    model = randomized(DiT(**TINY, depth=4, groups=[[1, 2], [1, 2]])).train()
    model.set_gumbel(tau=1.0, scaling=1.0)
    out = model(torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,)))
    out.square().mean().backward()
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in model.gate_logits)
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_check_kept_indices_errors():
    check_kept_indices([0, 3], 4)
    with pytest.raises(ValueError, match=r"\[4\] are out of range for a model of depth 4"):
        check_kept_indices([0, 4], 4)
    with pytest.raises(ValueError, match=r"duplicates: \[1\]"):
        check_kept_indices([1, 1, 2], 4)
    with pytest.raises(ValueError, match="empty"):
        check_kept_indices([], 4)


def test_pruned_state_dict_renumbers_and_drops_gates():
    model = randomized(DiT(**TINY, depth=4, groups=[[1, 2], [1, 2]]))
    sd = pruned_state_dict(model.state_dict(), [1, 2])
    assert not any(k.startswith("gate_logits") for k in sd)
    assert torch.equal(sd["blocks.0.mlp.fc1.weight"], model.blocks[1].mlp.fc1.weight)
    assert torch.equal(sd["blocks.1.mlp.fc1.weight"], model.blocks[2].mlp.fc1.weight)
    assert "blocks.2.mlp.fc1.weight" not in sd
    DiT(**TINY, depth=2).load_state_dict(sd)  # strict


# ------------------------------------------------------------------------------------ labels, checkpointing


def test_label_drops_can_be_returned_and_forced():
    torch.manual_seed(0)
    model = randomized(DiT(**TINY, depth=2, class_dropout_prob=0.5)).train()
    x, t, y = torch.randn(64, 4, 8, 8), torch.randint(0, 1000, (64,)), torch.randint(0, 10, (64,))
    out, drops = model(x, t, y, return_drop_ids=True)
    assert drops.dtype == torch.bool and 10 < drops.sum().item() < 54
    with torch.no_grad():  # a second model seeing the same drops reproduces the output exactly
        again = model(x, t, y, force_drop_ids=drops)
        null = model(x, t, torch.where(drops, 10, y), force_drop_ids=torch.zeros(64))
    assert torch.equal(out.detach(), again)
    assert torch.equal(again, null)
    model.eval()
    _, none_dropped = model(x, t, y, return_drop_ids=True)
    assert not none_dropped.any()


def test_gradient_checkpointing_same_output_and_grads():
    torch.manual_seed(0)
    model = randomized(DiT(**TINY, depth=3)).train()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
    drops = torch.zeros(2)
    model(x, t, y, force_drop_ids=drops).sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    model.enable_gradient_checkpointing()
    model(x, t, y, force_drop_ids=drops).sum().backward()
    for a, p in zip(grads, [p for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(a, p.grad)


def test_per_sample_masks_match_each_shallow_model():
    torch.manual_seed(0)
    model = randomized(DiT(**TINY, depth=4, groups=[[1, 2], [1, 2]])).eval()
    masks = torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 0], [1, 0, 1, 0]])
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([5, 400, 900]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        mixed = model(x, t, y, layer_mask=masks)
        for i, m in enumerate(masks):
            alone = model.pruned(m.nonzero().flatten().tolist())(x[i : i + 1], t[i : i + 1], y[i : i + 1])
            torch.testing.assert_close(mixed[i : i + 1], alone, rtol=0, atol=1e-6)
