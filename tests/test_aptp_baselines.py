"""APTP baselines on a tiny world: magnitude scores against numpy, the greedy removal against the MACs counted by
hooks on the materialised expert, seeded random orders, the dense expert, the written pruning directory as the
later stages read it, and the learned baselines (one code; no optimal transport) through aptp.prune."""

import copy
import json

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from diffusers import UNet2DConditionModel

from aptp import baselines, prune
from aptp.assignments import expert_code, load_router, read_experts, read_router_info
from aptp.baselines import (
    baseline_code,
    code_logits,
    greedy_removal,
    magnitude_scores,
    random_scores,
    single_expert_router,
)
from aptp.config import load_config, to_dict
from aptp.data import load_captions
from aptp.expert import materialize
from aptp.macs import count_macs, mac_table, unet_inputs
from aptp.make_tiny import build_world
from aptp.router import PromptEncoder, Router
from diffcompress.errors import UserError
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

LATENT = 16  # training.resolution 32 of tiny.yaml through the tiny 2-level VAE
BUDGET = 0.6


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("aptp-tiny")
    tiny = build_world(root, train_rows=12, val_rows=4, size=32)
    encoder = tiny["encoder"]
    return dict(sd=root / "sd", encoder=encoder, cc3m=root / "cc3m", cache=root / "cache")


@pytest.fixture(scope="module")
def unet(world):
    return UNet2DConditionModel.from_pretrained(world["sd"], subfolder="unet").eval()


@pytest.fixture(scope="module")
def table(unet):
    return mac_table(unet.config, LATENT, 77)


@pytest.fixture()
def in_process():
    """prune.main in this process; accelerate's process-wide state is reset afterwards."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def counted_macs(unet, code, layout):
    """MACs of one sample counted by hooks on the expert materialised from ``code``."""
    expert = materialize(unet, code, layout)
    return sum(count_macs(expert, **unet_inputs(expert, LATENT)).values())


def numpy_unit_scores(unet, sg):
    """Per unit of a sub-gate, unit by unit from the state dict: the L2 norm of everything slicing it removes,
    divided by the sub-gate's mean."""
    w = {k: v.double().numpy() for k, v in unet.get_submodule(sg.name).state_dict().items()}
    norms = []
    for u in range(sg.size):
        if sg.kind == "resnet":
            n = w["conv1.weight"].shape[0] // sg.size
            ch = slice(u * n, (u + 1) * n)
            parts = [w[f"{m}.{p}"][ch] for m in ("conv1", "time_emb_proj", "norm2") for p in ("weight", "bias")]
            parts.append(w["conv2.weight"][:, ch])
        elif sg.kind == "ff":
            inner = w["net.2.weight"].shape[1]
            n = inner // sg.size
            ch = np.r_[u * n : (u + 1) * n]
            parts = [w["net.0.proj.weight"][ch], w["net.0.proj.weight"][ch + inner], w["net.2.weight"][:, ch]]
            parts += [w["net.0.proj.bias"][ch], w["net.0.proj.bias"][ch + inner]]
        else:
            n = w["to_q.weight"].shape[0] // sg.size
            rows = slice(u * n, (u + 1) * n)
            parts = [v[rows] for k, v in w.items() if k.split(".")[0] in ("to_q", "to_k", "to_v")]
            parts.append(w["to_out.0.weight"][:, rows])
        norms.append(np.sqrt(sum((p**2).sum() for p in parts)))
    return np.array(norms) / np.mean(norms)


# ----------------------------------------------------------------------------------------------------
# Codes


def test_magnitude_scores_match_numpy(unet, table):
    scores = magnitude_scores(unet, table.layout).numpy()
    assert {sg.kind for sg in table.layout.subgates} == {"resnet", "attn1", "attn2", "ff"}
    for sg in table.layout.subgates:
        np.testing.assert_allclose(scores[sg.start : sg.stop], numpy_unit_scores(unet, sg), rtol=1e-12)


def test_magnitude_removes_the_smallest_units_first(unet, table):
    layout = table.layout
    zeroed = copy.deepcopy(unet)
    picked = []
    for kind, unit in (("resnet", 3), ("attn1", 1), ("attn2", 2), ("ff", 5)):
        sg = [s for s in layout.subgates if s.kind == kind and s.size > unit][2]
        m = zeroed.get_submodule(sg.name)
        with torch.no_grad():
            if kind == "resnet":
                n = m.conv1.out_channels // sg.size
                ch = slice(unit * n, (unit + 1) * n)
                for p in (m.conv1.weight, m.conv1.bias, m.time_emb_proj.weight, m.time_emb_proj.bias):
                    p[ch] = 0
                m.norm2.weight[ch], m.norm2.bias[ch], m.conv2.weight[:, ch] = 0, 0, 0
            elif kind == "ff":
                inner = m.net[2].in_features
                n = inner // sg.size
                ch = torch.arange(unit * n, (unit + 1) * n)
                m.net[0].proj.weight[torch.cat([ch, ch + inner])] = 0
                m.net[0].proj.bias[torch.cat([ch, ch + inner])] = 0
                m.net[2].weight[:, ch] = 0
            else:
                d = m.to_q.out_features // m.heads
                rows = slice(unit * d, (unit + 1) * d)
                m.to_q.weight[rows], m.to_k.weight[rows], m.to_v.weight[rows] = 0, 0, 0
                m.to_out[0].weight[:, rows] = 0
        picked.append(sg.start + unit)
    scores = magnitude_scores(zeroed, layout)
    assert torch.equal(scores[picked], torch.zeros(4, dtype=torch.float64))
    assert (scores.numpy() > 0).sum() == layout.width_size - 4
    code, removed = greedy_removal(scores, table, BUDGET)
    assert sorted(removed[:4]) == sorted(picked)

    # From the lowest score up: a kept unit scoring below the last removed one is the last of its sub-gate.
    assert all(a <= b for a, b in zip(scores[removed][:-1], scores[removed][1:]))
    for sg in layout.subgates:
        kept = code[sg.start : sg.stop].nonzero().flatten() + sg.start
        if len(kept) > 1:
            assert scores[kept].min() >= scores[removed[-1]]


@pytest.mark.parametrize("budget", [BUDGET, 0.35])
def test_greedy_codes_meet_the_budget_and_stop_at_the_first_code_under_it(unet, table, budget):
    layout = table.layout
    dense = counted_macs(unet, torch.ones(layout.size, dtype=torch.int64), layout)
    assert dense == table.total
    for scores in (magnitude_scores(unet, layout), random_scores(layout, 0), random_scores(layout, 1)):
        code, removed = greedy_removal(scores, table, budget)
        assert torch.equal(code[layout.width_size :], torch.ones(layout.depth_size, dtype=torch.int64))
        assert sorted(removed) == (code[: layout.width_size] == 0).nonzero().flatten().tolist()
        assert all(code[sg.start : sg.stop].sum() >= 1 for sg in layout.subgates)
        assert counted_macs(unet, code, layout) <= budget * dense
        one_fewer = code.clone()
        one_fewer[removed[-1]] = 1
        assert counted_macs(unet, one_fewer, layout) > budget * dense
    with pytest.raises(UserError, match=r"--budget 0.05: removing all but one unit of every layer keeps 0\.\d+"):
        greedy_removal(random_scores(layout, 0), table, 0.05)


def test_random_codes_are_seeded(unet, table):
    a, b = (baseline_code("random", unet, table, BUDGET, seed=7) for _ in range(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, baseline_code("random", unet, table, BUDGET, seed=8))
    assert not torch.equal(a, baseline_code("magnitude", unet, table, BUDGET))


def test_dense_code_is_the_dense_unet(unet, table):
    code = baseline_code("dense", unet, table, BUDGET)
    assert torch.equal(code, torch.ones(table.layout.size, dtype=torch.int64))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, LATENT, LATENT, generator=g), torch.tensor([10, 900])
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        assert torch.equal(materialize(unet, code, table.layout)(x, t, text).sample, unet(x, t, text).sample)


# ----------------------------------------------------------------------------------------------------
# One-expert routers


def test_single_expert_router_holds_the_code_and_routes_everything_to_it(unet, table):
    layout = table.layout
    code = baseline_code("random", unet, table, BUDGET, seed=3)
    router = single_expert_router(code, layout, prompt_dim=16)
    assert torch.equal(router.expert_mask(0).long(), code)
    prompts = torch.randn(9, 16, generator=torch.Generator().manual_seed(0)) * 10
    assert torch.equal(router.route(prompts), torch.zeros(9, dtype=torch.long))
    # every prompt's predicted architecture is the code itself
    assert torch.equal((router.gates(router.predict(prompts), noisy=False) > 0.5).long(), code.expand(9, -1))
    # any 1-expert router, trained or not, sends every prompt to expert 0
    assert torch.equal(Router(layout, 16, 1).route(prompts), torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="keeps every block"):
        code_logits(torch.zeros(layout.size), layout)


def test_without_optimal_transport_prompts_take_their_argmax_code(unet, table):
    layout = table.layout
    codes = [
        baseline_code("dense", unet, table, 1.0), baseline_code("magnitude", unet, table, BUDGET),
        baseline_code("random", unet, table, 0.4, seed=1),
    ]  # fmt: skip
    logits = torch.stack([code_logits(c, layout) for c in codes])
    # predicted logits of prompt i = its embedding (mixture weights) times the code logits
    emb = torch.tensor([[1.0, 0, 0]] * 4 + [[0, 1.0, 0], [0.1, 0.8, 0.1]])

    def crafted(optimal_transport):
        router = Router(layout, 3, 3, optimal_transport=optimal_transport)
        with torch.no_grad():
            router.codebook.copy_(logits)
            router.predictor.weight.copy_(logits.t())
            router.predictor.bias.zero_()
        return router.eval()  # no Gumbel noise

    routing = crafted(False)(emb)

    # Independently: binary codes -> per sub-gate sqrt(1 / size) scaling -> cosine argmax (every block is kept).
    def normalised(binary):
        v = binary.astype(np.float64)
        for sg in layout.subgates:
            v[sg.start : sg.stop] *= np.sqrt(1 / sg.size)
        return v / np.linalg.norm(v)

    own = crafted(False).gates(emb @ logits, noisy=False).numpy() > 0.5
    cos = np.stack([normalised(o) for o in own]) @ np.stack([normalised(c.numpy()) for c in codes]).T
    assert cos.argmax(1).tolist() == routing.expert.tolist() == [0, 0, 0, 0, 1, 1]
    torch.testing.assert_close(routing.mask, crafted(False).gates(logits, noisy=False)[routing.expert])
    # with optimal transport, the authors' argmax of the 3-round plan leaves these confident prompts where they are;
    # the capacity assignment (ours, by option) spreads them evenly over the codes
    assert crafted(True)(emb).expert.tolist() == [0, 0, 0, 0, 1, 1]
    capacity = crafted(True)
    capacity.assignment = "capacity"
    assert torch.bincount(capacity(emb).expert, minlength=3).tolist() == [2, 2, 2]


# ----------------------------------------------------------------------------------------------------
# python -m aptp.baselines


@pytest.mark.parametrize("method", baselines.METHODS)
def test_cli_writes_a_pruning_directory(world, unet, table, tmp_path, method, capsys):
    out = tmp_path / method
    baselines.main([
        "--method", method, "--pretrained_model_name_or_path", str(world["sd"]), "--output_dir", str(out),
        "--budget", str(BUDGET), "--resolution", "32", "--seed", "5", "--prompt_encoder", str(world["encoder"]),
        "--dataset_name", "cc3m", "--data_dir", str(world["cc3m"]),
    ])  # fmt: skip
    printed = capsys.readouterr().out
    layout = table.layout
    router = load_router(out, layout)
    code = expert_code(out, 0)
    assert torch.equal(router.expert_mask(0).long(), code)
    expected = {"dense": torch.ones(layout.size, dtype=torch.int64)}.get(method)
    expected = expected if expected is not None else baseline_code(method, unet, table, BUDGET, seed=5)
    assert torch.equal(code, expected)

    experts, info = read_experts(out), read_router_info(out)
    (e,) = experts["experts"]
    dense_params = sum(p.numel() for p in unet.parameters())
    assert experts["dense"] == dict(macs=table.total, params=dense_params)
    assert e["macs"] == counted_macs(unet, code, layout) <= (1.0 if method == "dense" else BUDGET) * table.total
    assert e["params"] == sum(p.numel() for p in materialize(unet, code, layout).parameters())
    assert (info["num_experts"], info["prompt_dim"], info["method"], info["resolution"]) == (1, 16, method, 32)
    assert f"{method:>10} {e['macs'] / 1e9:>9.4f} {e['macs_ratio']:>8.1%}" in printed
    assert f"expert code:  {out / 'experts.json'}" in printed
    with pytest.raises(UserError, match="has experts 0..0"):
        expert_code(out, 1)

    # Every caption, embedded by the recorded encoder, goes to expert 0.
    captions = list(load_captions("cc3m", world["cc3m"], "validation").captions)
    emb = PromptEncoder(info["prompt_encoder"]).embed(captions)
    assert torch.equal(router.route(emb), torch.zeros(len(captions), dtype=torch.long))

    cfg = load_config(out / "config.yaml")
    assert (cfg.data.dataset_name, cfg.data.data_dir, cfg.model.num_experts) == ("cc3m", str(world["cc3m"]), 1)
    assert (cfg.model.prompt_encoder, cfg.training.resolution, cfg.output_dir) == (str(world["encoder"]), 32, str(out))
    assert cfg.model.budget == (1.0 if method == "dense" else BUDGET)


def test_cli_rejects_bad_flags(world, tmp_path):
    args = ["--method", "random", "--pretrained_model_name_or_path", str(world["sd"]), "--output_dir", str(tmp_path)]
    with pytest.raises(UserError, match=r"--budget must be in \(0, 1\], got 1.5"):
        baselines.main([*args, "--budget", "1.5"])
    with pytest.raises(UserError, match="--resolution must be a positive multiple of 8, got 30"):
        baselines.main([*args, "--resolution", "30"])
    with pytest.raises(UserError, match="Stable Diffusion .* cannot load unet/"):
        baselines.main([*args[:3], str(tmp_path), *args[4:], "--prompt_encoder", str(world["encoder"])])
    with pytest.raises(UserError, match="prompt encoder 'no/such-encoder' is neither a local folder nor in the hub"):
        baselines.main([*args, "--prompt_encoder", "no/such-encoder"])
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------
# Learned baselines: aptp.prune with one code, or without optimal transport


def test_learned_baseline_configs_are_the_recipe_with_one_change():
    changed = {"single-arch": ("num_experts", 1), "no-ot": ("optimal_transport", False)}
    for name in ("cc3m", "coco"):
        for kind, (key, value) in changed.items():
            recipe = to_dict(load_config(ROOT / f"configs/aptp/pruning/{name}.yaml"))
            cfg = to_dict(load_config(ROOT / f"configs/aptp/baselines/{kind}-{name}.yaml"))
            assert cfg["model"][key] == value != recipe["model"][key]
            assert cfg["output_dir"] == f"results/aptp/baselines/{kind}-{name}"
            for c in (cfg, recipe):
                c["model"][key] = c["output_dir"] = c["logging"]["tracker_project_name"] = None
            assert cfg == recipe


@pytest.mark.parametrize("override", ["model.num_experts=1", "model.optimal_transport=false"])
def test_learned_baselines_run_through_prune(world, table, tmp_path, in_process, override, capsys):
    out = tmp_path / "run"
    prune.main([
        "--config", str(ROOT / "configs/aptp/pruning/tiny.yaml"), override, f"output_dir={out}",
        f"pretrained_model_name_or_path={world['sd']}", f"data.data_dir={world['cc3m']}",
        f"model.prompt_encoder={world['encoder']}", f"data.embedding_cache_dir={world['cache']}",
        "training.max_train_steps=2", "training.pretrain_steps=1", "logging.logging_steps=1",
    ])  # fmt: skip
    assert "expert codes:" in capsys.readouterr().out
    phases = [json.loads(line)["phase"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert phases == ["pretrain", "routed"]
    info, experts = read_router_info(out), read_experts(out)
    k = 1 if override == "model.num_experts=1" else 4
    assert (info["num_experts"], len(experts["experts"])) == (k, k)
    assert info["optimal_transport"] is (override != "model.optimal_transport=false")
    assert load_config(out / "config.yaml").model.optimal_transport is info["optimal_transport"]
    router = load_router(out, table.layout)
    emb = PromptEncoder(str(world["encoder"])).embed(list(load_captions("cc3m", world["cc3m"], "train").captions))
    experts_of = router.route(emb)
    assert ((experts_of >= 0) & (experts_of < k)).all() and (k > 1 or not experts_of.any())
