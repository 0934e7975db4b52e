"""APTP's gated UNet, MAC accounting and expert materialisation, on a tiny UNet of SD2.1's block types.

Most checks run in float64 so that "equal" can be tight: two computations of the same function that
differ only in summation order (a sliced matmul vs. a gated one) agree to ~1e-15 relative per layer;
1e-10 leaves margin over ~40 layers. One check repeats the expert comparison in float32 at 1e-5.
"""

import copy
import json

import pytest
import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from aptp.expert import load_expert, materialize, save_expert
from aptp.gated_unet import GatedAttnProcessor, GatedUNet
from aptp.layout import ArchLayout, binarize, meta_unet
from aptp.macs import count_macs, dense_macs, mac_table, prunable_budget, subtree_macs, unet_inputs
from diffcompress.checkpoint import CheckpointError
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = json.loads((ROOT / "configs/aptp/tiny-unet.json").read_text())
SD21 = json.loads((ROOT / "configs/aptp/sd2.1-unet.json").read_text())
TEXT_LEN = 7
TOL = 1e-10


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)
    try:
        unet = UNet2DConditionModel.from_config(TINY).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():  # random norm affines, so that groups differ beyond their conv weights
        for m in unet.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return unet


@pytest.fixture(scope="module")
def layout():
    return ArchLayout.from_config(TINY)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return dict(
        sample=torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64),
        timestep=torch.tensor([10, 700]),
        encoder_hidden_states=torch.randn(2, TEXT_LEN, 32, generator=g, dtype=torch.float64),
    )


@pytest.fixture(scope="module")
def table(layout):
    return mac_table(TINY, 16, TEXT_LEN, layout)


@pytest.fixture()
def gated(dense, layout):
    return GatedUNet(copy.deepcopy(dense), layout)


def run(unet, inputs) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample


def random_code(layout: ArchLayout, seed: int, keep: float, drop_depth: list[int], empty: int) -> torch.Tensor:
    """Random width bits, the given depth gates off, ``empty`` sub-gates all zero (binarize keeps one)."""
    g = torch.Generator().manual_seed(seed)
    soft = torch.rand(layout.size, generator=g, dtype=torch.float64)
    code = (soft < keep).double()
    for i in torch.randperm(len(layout.subgates), generator=g)[:empty].tolist():
        sg = layout.subgates[i]
        code[sg.start : sg.stop] = 0
    code[layout.width_size :] = 1
    code[[layout.width_size + d for d in drop_depth]] = 0
    # binarize sees entries at 0/1 plus a tiny soft tie-break, so its keep-one choice is the soft argmax
    return binarize(code * 0.98 + 0.01 * soft, layout).detach()


CODES = {
    "width only": dict(seed=0, keep=0.6, drop_depth=[], empty=4),
    "some depth": dict(seed=1, keep=0.5, drop_depth=[0, 3, 7, 9, 13], empty=6),
    "all depth": dict(seed=2, keep=0.7, drop_depth=list(range(14)), empty=2),
    "sparse": dict(seed=3, keep=0.2, drop_depth=[2, 5, 8], empty=10),
}


# ------------------------------------------------------------------------------------------- layout


def test_layout_matches_the_modules(dense, layout):
    assert layout.size == layout.width_size + 14 and layout.depth_size == 14
    assert [sg.start for sg in layout.subgates] == [0] + [sg.stop for sg in layout.subgates[:-1]]
    for sg in layout.subgates:
        m = dense.get_submodule(sg.name)
        if sg.kind == "resnet":
            size = m.norm2.num_groups
        elif sg.kind == "ff":
            size = TINY["norm_num_groups"]
        else:
            size = m.heads
        assert sg.size == size
        if sg.kind in ("attn1", "attn2"):
            assert m.is_cross_attention == (sg.kind == "attn2")
        in_block = [d for d, p in enumerate(layout.depth_blocks) if sg.name == p or sg.name.startswith(p + ".")]
        assert sg.depth_index == (in_block[0] if in_block else None)


def test_binarize_threshold_keep_one_and_straight_through(layout):
    soft = torch.full((2, layout.size), 0.3, requires_grad=True)
    with torch.no_grad():
        soft[0, 5] = 0.45  # the highest entry of the first resnet sub-gate: kept although < 0.5
        soft[1, :] = 0.7
    hard = binarize(soft, layout)
    first = layout.subgates[0]
    assert hard[0, first.start : first.stop].tolist() == [1.0 if i == 5 else 0.0 for i in range(first.size)]
    for sg in layout.subgates:
        assert hard[0, sg.start : sg.stop].sum() == 1
    assert (hard[0, layout.width_size :] == 0).all()  # depth entries have no keep-one rule
    assert (hard[1] == 1).all()
    hard.sum().backward()
    assert torch.equal(soft.grad, torch.ones_like(soft))


# ------------------------------------------------------------------------------------------- gates


def test_all_ones_code_and_clear_reproduce_the_dense_unet(dense, gated, inputs, layout):
    ref = run(dense, inputs)
    gated.set_code(torch.ones(2, layout.size, dtype=torch.float64))
    assert torch.equal(run(gated.unet, inputs), ref)
    gated.set_code(torch.ones(layout.size, dtype=torch.float64))  # one code for the whole batch
    assert torch.equal(run(gated.unet, inputs), ref)
    gated.clear()
    assert torch.equal(run(gated.unet, inputs), ref)
    gated.remove()
    assert not any(isinstance(p, GatedAttnProcessor) for p in gated.unet.attn_processors.values())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in gated.unet.modules())
    assert torch.equal(run(gated.unet, inputs), ref)


def test_every_attention_uses_the_gated_processor_and_replacing_it_fails(gated, inputs, layout):
    processors = gated.unet.attn_processors
    assert len(processors) == sum(sg.kind in ("attn1", "attn2") for sg in layout.subgates)
    assert all(isinstance(p, GatedAttnProcessor) for p in processors.values())
    code = torch.ones(layout.size, dtype=torch.float64)
    attn2 = next(sg for sg in layout.subgates if sg.kind == "attn2")
    code[attn2.start] = 0
    gated.set_code(code)
    dense_out = run(gated.unet, inputs)
    gated.clear()
    assert not torch.allclose(dense_out, run(gated.unet, inputs))  # the head gate acts
    gated.unet.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(RuntimeError, match="bypassed"):
        run(gated.unet, inputs)


def _zero_gate(layout, index: int) -> torch.Tensor:
    code = torch.ones(layout.size, dtype=torch.float64)
    code[index] = 0
    return code


@pytest.mark.parametrize("kind", ["resnet", "attn1", "attn2", "ff"])
def test_zero_width_gate_equals_zeroed_weights(dense, gated, inputs, layout, kind):
    """Independent check: a zero gate equals zeroing the weights that read the group / head."""
    sg = [s for s in layout.subgates if s.kind == kind][3]
    unit = 1
    gated.set_code(_zero_gate(layout, sg.start + unit))
    reference = copy.deepcopy(dense)
    m = reference.get_submodule(sg.name)
    with torch.no_grad():
        if kind == "resnet":
            w = m.conv2.weight
        elif kind == "ff":
            w = m.net[2].weight
        else:
            w = m.to_out[0].weight
        width = w.shape[1] // sg.size
        w[:, unit * width : (unit + 1) * width] = 0
    torch.testing.assert_close(run(gated.unet, inputs), run(reference, inputs), rtol=0, atol=TOL)
    assert not torch.allclose(run(reference, inputs), run(dense, inputs))


class _Skip(nn.Module):
    """A block replaced by its identity: what the test expects a zero depth gate to mean."""

    def __init__(self, channels: int | None):
        super().__init__()
        self.channels = channels

    def forward(self, x, *args, **kwargs):
        if self.channels is None:  # a transformer, called with return_dict=False by diffusers' blocks
            return (x,)
        return x[:, : self.channels]  # a ResNet: the first channels of [hidden_states, skip]


@pytest.mark.parametrize("depth", [0, 1, 6, 7, 12, 13])
def test_zero_depth_gate_equals_removed_block(dense, gated, inputs, layout, depth):
    path = layout.depth_blocks[depth]
    gated.set_code(_zero_gate(layout, layout.width_size + depth))
    reference = copy.deepcopy(dense)
    parent, i = path.rsplit(".", 1)
    block = reference.get_submodule(path)
    reference.get_submodule(parent)[int(i)] = _Skip(block.conv2.out_channels if "resnets" in path else None)
    torch.testing.assert_close(run(gated.unet, inputs), run(reference, inputs), rtol=0, atol=TOL)


def test_up_resnet_input_is_hidden_then_skip(dense, inputs):
    """diffusers concatenates [hidden_states, skip]: the identity of an up ResNet is the first channels."""
    seen = {}
    up = dense.up_blocks[1]
    h1 = up.attentions[1].register_forward_hook(lambda m, a, out: seen.__setitem__("hidden", out[0]))
    h2 = up.resnets[2].register_forward_pre_hook(lambda m, a: seen.__setitem__("input", a[0]))
    try:
        run(dense, inputs)
    finally:
        h1.remove()
        h2.remove()
    n = seen["hidden"].shape[1]
    assert seen["input"].shape[1] > n and torch.equal(seen["input"][:, :n], seen["hidden"])


def test_per_sample_gates_and_cfg_batches(gated, inputs, layout):
    codes = torch.stack([random_code(layout, 7, 0.5, [1, 8], 2), random_code(layout, 8, 0.6, [4], 0)])
    soft = 0.3 + 0.4 * torch.rand(2, layout.size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for mask in (codes, soft):
        gated.set_code(mask)
        both = run(gated.unet, inputs)
        for b in range(2):
            gated.set_code(mask[b])
            alone = run(gated.unet, {k: v[b : b + 1] for k, v in inputs.items()})
            torch.testing.assert_close(both[b : b + 1], alone, rtol=0, atol=TOL)
    # classifier-free guidance: a gate batch of B drives a UNet batch of [uncond (B), cond (B)]
    gated.set_code(codes)
    both = run(gated.unet, inputs)
    doubled = run(gated.unet, {k: torch.cat([v, v]) for k, v in inputs.items()})
    torch.testing.assert_close(doubled, torch.cat([both, both]), rtol=0, atol=TOL)


def test_soft_gates_are_differentiable(gated, inputs, layout):
    mask = torch.full((2, layout.size), 0.8, dtype=torch.float64, requires_grad=True)
    gated.set_code(mask)
    gated.unet(**inputs).sample.square().mean().backward()
    for sg in layout.subgates:  # every sub-gate's entries reach the output
        assert mask.grad[:, sg.start : sg.stop].abs().sum() > 0, sg.name
    assert (mask.grad[:, layout.width_size :].abs() > 0).all()


# ------------------------------------------------------------------------------------------- experts


def expected_params(dense: UNet2DConditionModel, layout: ArchLayout, code: torch.Tensor) -> int:
    """Parameter count of the expert from the code, by per-unit formulas of each kind (no slicing)."""
    count = sum(p.numel() for p in dense.parameters())
    dropped = [p for d, p in enumerate(layout.depth_blocks) if code[layout.width_size + d] == 0]
    for path in dropped:
        count -= sum(p.numel() for p in dense.get_submodule(path).parameters())
    for sg in layout.subgates:
        if sg.depth_index is not None and layout.depth_blocks[sg.depth_index] in dropped:
            continue
        removed = sg.size - int(code[sg.start : sg.stop].sum())
        m = dense.get_submodule(sg.name)
        if sg.kind == "resnet":  # conv1 rows + bias, time_emb_proj rows + bias, norm2 affine, conv2 input columns
            c = m.conv1.out_channels // sg.size
            per_channel = 9 * m.conv1.in_channels + 1 + m.time_emb_proj.in_features + 1 + 2 + 9 * m.conv2.out_channels
        elif sg.kind == "ff":  # GEGLU rows (value and gate, with biases), output linear columns
            c = m.net[2].in_features // sg.size
            per_channel = 2 * (m.net[0].proj.in_features + 1) + m.net[2].out_features
        else:  # q, k, v rows (no bias in SD), to_out columns
            c = m.to_q.out_features // sg.size
            per_channel = m.to_q.in_features + 2 * m.to_k.in_features + m.to_out[0].out_features
        count -= removed * c * per_channel
    return count


@pytest.mark.parametrize("name", list(CODES))
def test_expert_equals_gated_unet_in_output_params_and_macs(dense, gated, inputs, layout, table, name):
    code = random_code(layout, **CODES[name])
    gated.set_code(code)
    expert = materialize(dense, code, layout)
    torch.testing.assert_close(run(expert, inputs), run(gated.unet, inputs), rtol=0, atol=TOL)

    n_params = sum(p.numel() for p in expert.parameters())
    assert n_params == expected_params(dense, layout, code) < sum(p.numel() for p in dense.parameters())

    one = {k: v[:1] for k, v in inputs.items()}
    counted = sum(count_macs(expert, **one).values())
    assert counted == table.macs(code).item() < table.total
    assert table.rho(code).item() == pytest.approx((counted - table.total + table.prunable) / table.prunable)


def test_expert_equals_gated_unet_in_float32(dense, inputs, layout):
    code = random_code(layout, **CODES["some depth"])
    dense32 = copy.deepcopy(dense).float().requires_grad_(False)
    gated = GatedUNet(copy.deepcopy(dense32), layout)
    gated.set_code(code.float())
    inputs32 = {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}
    expert = materialize(dense32, code, layout)
    assert not any(p.requires_grad for p in expert.parameters())  # sliced weights stay frozen like the rest
    # float32: eps 6e-8, outputs O(1), ~40 layers of sums over <= 1e3 terms: differences ~1e-6
    torch.testing.assert_close(run(expert, inputs32), run(gated.unet, inputs32), rtol=0, atol=1e-5)


def test_materialize_refuses_bad_codes_and_gated_unets(dense, gated, layout):
    with pytest.raises(ValueError, match="binary"):
        materialize(dense, torch.full((layout.size,), 0.5), layout)
    with pytest.raises(ValueError, match="entries"):
        materialize(dense, torch.ones(layout.size - 1), layout)
    empty = torch.ones(layout.size)
    empty[layout.subgates[0].start : layout.subgates[0].stop] = 0
    with pytest.raises(ValueError, match="keeps nothing"):
        materialize(dense, empty, layout)
    with pytest.raises(ValueError, match="hooks"):
        materialize(gated.unet, torch.ones(layout.size), layout)


def test_save_load_round_trip(dense, inputs, layout, tmp_path):
    code = random_code(layout, **CODES["some depth"])
    expert = materialize(dense, code, layout)
    save_expert(expert, code, tmp_path / "expert")
    loaded, loaded_code = load_expert(tmp_path / "expert")
    assert isinstance(loaded, UNet2DConditionModel) and torch.equal(loaded_code, code.long())
    assert torch.equal(run(loaded, inputs), run(expert, inputs))

    wrong = code.clone()  # a code that does not match the weights
    wrong[layout.subgates[0].start : layout.subgates[0].stop] = 1
    with pytest.raises(ValueError, match="not sliced by this code"):
        save_expert(expert, wrong, tmp_path / "other")
    (tmp_path / "expert/code.json").write_text(json.dumps({"code": wrong.int().tolist()}))
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_expert(tmp_path / "expert")


def test_expert_in_a_diffusers_pipeline(dense, layout, inputs):
    """A CFG pipeline call: the expert and the gated UNet (gate batch 1, UNet batch 2) give the same latents."""
    code = random_code(layout, **CODES["some depth"])
    expert = materialize(dense, code, layout)
    sample, t, text = inputs["sample"][:1], inputs["timestep"][:1], inputs["encoder_hidden_states"][:1]
    assert expert(sample, t, text).sample.shape == sample.shape
    gated = GatedUNet(copy.deepcopy(dense), layout)
    gated.set_code(code)
    latents = []
    for unet in (expert, gated.unet):
        pipe = StableDiffusionPipeline(
            vae=None, text_encoder=None, tokenizer=None, unet=unet, safety_checker=None, feature_extractor=None,
            scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1), requires_safety_checker=False,
        )  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        out = pipe(
            prompt_embeds=text, negative_prompt_embeds=inputs["encoder_hidden_states"][1:], height=128, width=128,
            num_inference_steps=2, guidance_scale=7.5, output_type="latent", generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        latents.append(out.images)
    torch.testing.assert_close(latents[0], latents[1], rtol=0, atol=1e-8)


# ------------------------------------------------------------------------------------------- MACs


def test_mac_table_ratio_and_budget(table, layout):
    ones = torch.ones(3, layout.size, dtype=torch.float64)
    assert torch.equal(table.macs(ones), torch.full((3,), float(table.total), dtype=torch.float64))
    assert (table.rho(ones) == 1).all()
    soft = torch.full((layout.size,), 0.5, requires_grad=True)
    table.rho(soft).backward()
    assert soft.grad.abs().sum() > 0 and soft.grad[: layout.width_size].ge(0).all()
    p = 0.6
    target = table.budget(p)
    assert (table.total - table.prunable) + target * table.prunable == pytest.approx(p * table.total)
    with pytest.raises(ValueError, match="unreachable"):
        prunable_budget(0.01, table.total, table.prunable)


def test_sd21_layout_and_dense_macs_on_meta():
    layout = ArchLayout.from_config(SD21)
    assert (layout.size, layout.width_size, layout.depth_size) == (1620, 1606, 14)
    assert sum(sg.size for sg in layout.subgates if sg.kind == "resnet") == 704
    assert layout.depth_blocks == (
        "down_blocks.0.resnets.1", "down_blocks.0.attentions.1", "down_blocks.1.resnets.1",
        "down_blocks.1.attentions.1", "down_blocks.2.resnets.1", "down_blocks.2.attentions.1",
        "down_blocks.3.resnets.1", "up_blocks.0.resnets.2", "up_blocks.1.resnets.2", "up_blocks.1.attentions.2",
        "up_blocks.2.resnets.2", "up_blocks.2.attentions.2", "up_blocks.3.resnets.2", "up_blocks.3.attentions.2",
    )  # fmt: skip
    first = layout.subgates[:8]
    assert [(sg.name, sg.size) for sg in first] == [
        ("down_blocks.0.resnets.0", 32), ("down_blocks.0.resnets.1", 32),
        ("down_blocks.0.attentions.0.transformer_blocks.0.attn1", 5),
        ("down_blocks.0.attentions.0.transformer_blocks.0.attn2", 5),
        ("down_blocks.0.attentions.0.transformer_blocks.0.ff", 32),
        ("down_blocks.0.attentions.1.transformer_blocks.0.attn1", 5),
        ("down_blocks.0.attentions.1.transformer_blocks.0.attn2", 5),
        ("down_blocks.0.attentions.1.transformer_blocks.0.ff", 32),
    ]  # fmt: skip
    mid = [sg for sg in layout.subgates if sg.name.startswith("mid_block")]
    assert [sg.size for sg in mid] == [32, 32, 20, 20, 32] and all(sg.depth_index is None for sg in mid)

    macs_256 = dense_macs(SD21, 256 // 8)
    macs_768 = dense_macs(SD21, 768 // 8)
    print(f"\nSD2.1 UNet dense MACs: 256 px {macs_256 / 1e9:.2f} G, 768 px {macs_768 / 1e9:.2f} G")
    # Regression values of the counting rules (aptp/macs.py); at 512 px they give 402.8 G, of which ~61 G are
    # the attention products: without those, ~340 G, the figure usually quoted for SD's UNet at 512 px.
    assert (macs_256, macs_768) == (90_630_048_320, 1_077_469_193_280)


def test_cross_attention_macs_use_the_key_length():
    unet = meta_unet(SD21)
    macs = count_macs(unet, **unet_inputs(unet, 32, text_len=77))
    lq, d, heads = 32 * 32, 64, 5
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    assert macs[f"{block}.attn2"] == heads * (2 * lq * 77 * d + lq * 77)
    assert macs[f"{block}.attn1"] == heads * (2 * lq * lq * d + lq * lq)
    # the projections: q from the 320-d image tokens, k and v from the 1024-d text tokens
    assert subtree_macs(macs, f"{block}.attn2") - macs[f"{block}.attn2"] == (
        lq * 320 * 320 + 2 * 77 * 1024 * 320 + lq * 320 * 320
    )


def test_sd21_mac_table_predicts_a_meta_expert():
    """At SD2.1's real shapes (meta device): hook-counted MACs of a sliced expert equal the table's prediction."""
    layout = ArchLayout.from_config(SD21)
    table = mac_table(SD21, 256 // 8, layout=layout)
    code = random_code(layout, **CODES["some depth"])
    unet = meta_unet(SD21)
    expert = materialize(unet, code, layout, inplace=True)
    counted = sum(count_macs(expert, **unet_inputs(expert, 256 // 8)).values())
    assert counted == table.macs(code).item()
    print(
        f"\nSD2.1 at 256 px: prunable {table.prunable / 1e9:.2f} of {table.total / 1e9:.2f} GMACs, "
        f"budget 0.6 -> p' = {table.budget(0.6):.4f}; random code: rho {table.rho(code).item():.3f}"
    )
