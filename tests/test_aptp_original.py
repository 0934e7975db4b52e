"""The authors' APTP artifacts: a pruning checkpoint and a released variant built here in their exact layout
(../shared/APTP_ORIGINAL_FORMATS.md §1-2: their tensor and file names, a tiny SD-layout UNet, K = 3, embedding_gs
differing from the logits' threshold, view-saved arch_vector.pt), read, routed, converted, sampled and fetched from a
stand-in hub cache. Routing is checked against numpy computations of their rule (§6) and ours."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from aptp import assignments, calibrate_routing, convert_original, filter_dataset, original
from aptp.data import load_captions
from aptp.expert import load_expert, materialize
from aptp.filter_dataset import load_unet_config
from aptp.gated_unet import GatedUNet
from aptp.layout import ArchLayout
from aptp.make_tiny import build_world
from aptp.pipeline import APTPPipeline
from aptp.prune import load_stable_diffusion
from aptp.router import PromptEncoder, depth_order
from diffcompress.checkpoint import load_file
from diffcompress.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

K = 3
STEP = 7  # their fine-tuning checkpoint-N
GATED_NAMES = {
    "CrossAttnDownBlock2D": "CrossAttnDownBlock2DHalfGated",
    "DownBlock2D": "DownBlock2DHalfGated",
    "UNetMidBlock2DCrossAttn": "UNetMidBlock2DCrossAttnWidthGated",
    "UpBlock2D": "UpBlock2DHalfGated",
    "CrossAttnUpBlock2D": "CrossAttnUpBlock2DHalfGated",
}


# ------------------------------------------------------------------------------------------ their layout, written here


def their_unet_config(config: dict, cls: str) -> dict:
    """A UNet config as their gated / pruned UNets save it: their block names and extras."""
    out = {k: v for k, v in config.items() if not k.startswith("_")}
    out["_class_name"] = cls
    out["down_block_types"] = [GATED_NAMES[b] for b in config["down_block_types"]]
    out["up_block_types"] = [GATED_NAMES[b] for b in config["up_block_types"]]
    out["mid_block_type"] = GATED_NAMES[config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"]
    out["gated_ff"], out["ff_gate_width"] = True, 32
    return out


def structure(layout: ArchLayout) -> dict:
    """Their hypernet/quantizer ``structure``: per module the width sub-gate sizes and [1] if depth-gated, else [0]."""
    modules: dict[str, list[int]] = {}
    for sg in layout.subgates:
        name = sg.name.split(".transformer_blocks.")[0]
        modules.setdefault(name, []).append(sg.size)
    return dict(width=list(modules.values()), depth=[[int(m in layout.depth_blocks)] for m in modules])


def write_diffusers_folder(folder, config: dict, tensors: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "diffusion_pytorch_model.safetensors")


def sample_codes(logits: torch.Tensor, layout: ArchLayout, order, seed: int) -> torch.Tensor:
    """Their embedding_gs: a noisy Gumbel-sigmoid sample of the logits (numpy, §7) with the non-zero rule."""
    g = np.random.default_rng(seed)
    u = g.random(logits.shape)
    return torch.from_numpy(np_gates(logits.double().numpy(), u, layout, order)).float()


def write_pruning_checkpoint(folder, layout, unet_config, dense_state, prompt_dim, seed=0) -> dict:
    """``checkpoint-N/`` of their pruning run: hypernet/, quantizer/, quantizer_embeddings.pt, dense unet/; their
    run's config.yaml one level up. Returns the tensors written."""
    g = torch.Generator().manual_seed(seed)
    sizes = [sg.size for sg in layout.subgates] + [layout.depth_size]
    hyper = {}
    for i, n in enumerate(sizes):
        hyper[f"mh_fc.{i}.weight"] = torch.randn(n, prompt_dim, generator=g) * 2
        hyper[f"mh_fc.{i}.bias"] = torch.randn(n, generator=g)
    # logits near the 0.5 threshold of the gates, so that the noisy sample differs from their threshold
    logits = torch.randn(K, layout.size, generator=g) * 1.5 - 3.0
    order = depth_order(layout)
    gs = sample_codes(logits, layout, order, seed)
    struct = structure(layout)
    write_diffusers_folder(
        folder / "hypernet",
        dict(_class_name="HyperStructure", structure=struct, input_dim=prompt_dim, wn_flag=False, linear_bias=True,
             single_arch_param=False),
        hyper,
    )  # fmt: skip
    write_diffusers_folder(
        folder / "quantizer",
        dict(_class_name="StructureVectorQuantizer", n_e=K, structure=struct, beta=0.25, remap=None,
             unknown_index="random", sane_index_shape=False, temperature=0.4, base=3, depth_order=list(order),
             non_zero_width=True, sinkhorn_epsilon=0.05, sinkhorn_iterations=3, resource_aware_normalization=False,
             optimal_transport=True),
        {"embedding.weight": logits, "embedding_gs": gs},
    )  # fmt: skip
    torch.save(torch.nn.Parameter(gs.clone(), requires_grad=False), folder / "quantizer_embeddings.pt")
    write_diffusers_folder(folder / "unet", their_unet_config(unet_config, "UNet2DConditionModelGated"), dense_state)
    return dict(hyper=hyper, logits=logits, gs=gs, order=order)


def write_expert(folder, gs: torch.Tensor, k: int, unet_config: dict, sliced_state: dict) -> None:
    """``arch<k>/checkpoint-N/``: the pruned unet/ (stock keys, sliced) and arch_vector.pt saved as a view of all K."""
    write_diffusers_folder(folder / "unet", their_unet_config(unet_config, "UNet2DConditionModelPruned"), sliced_state)
    torch.save(gs[k : k + 1], folder / "arch_vector.pt")  # a view: the file carries every expert's vector


# ------------------------------------------------------------------------------------------ numpy: their rule and ours


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def np_gates(a: np.ndarray, u: np.ndarray, layout: ArchLayout, order, nonzero: bool = True) -> np.ndarray:
    """§7: Gumbel noise G = -log(-log(u + 1e-20) + 1e-20); width sigmoid((l + G + 3) / 0.4); depth by the cumulative
    prior of the softmax, rank k feeding gate order[k]; then (their sampling) the non-zero rule."""
    G = -np.log(-np.log(u + 1e-20) + 1e-20)
    W, D = layout.width_size, layout.depth_size
    out = np.empty_like(a)
    out[:, :W] = sigmoid((a[:, :W] + G[:, :W] + 3) / 0.4)
    e = np.exp(a[:, W:] - a[:, W:].max(1, keepdims=True))
    p = e / e.sum(1, keepdims=True)
    for k in range(D):
        q = p[:, : D - k].sum(1)
        out[:, W + order[k]] = sigmoid((np.log(q + 1e-6) - np.log(1 - q + 1e-6) + G[:, W + k] + 3) / 0.4)
    if nonzero:
        for sg in layout.subgates:
            empty = (out[:, sg.start : sg.stop] < 0.5).all(1)
            out[empty, sg.start] += 0.5
    return out


def np_normalize(x: np.ndarray, hard: np.ndarray, layout: ArchLayout) -> np.ndarray:
    """N(x): width entries of a depth-gated module soft (x_width * x_depth), the others hard; width x sqrt(1/size)."""
    v = hard.astype(np.float64).copy()
    for sg in layout.subgates:
        seg = slice(sg.start, sg.stop)
        if sg.depth_index is not None:
            v[:, seg] = x[:, seg] * x[:, [layout.width_size + sg.depth_index]]
        v[:, seg] *= np.sqrt(1 / sg.size)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def their_noise(rows: int, layout: ArchLayout) -> np.ndarray:
    """§6 step 3: per width sub-gate and for the depth part, a fresh CPU generator seeded 0 draws u [rows, size];
    row b of a routing batch of 2048 takes row b."""
    sizes = [sg.size for sg in layout.subgates] + [layout.depth_size]
    return np.concatenate([torch.rand(rows, n, generator=torch.Generator().manual_seed(0)).numpy() for n in sizes], 1)


def their_route(emb: np.ndarray, hyper: dict, gs: np.ndarray, layout, order) -> np.ndarray:
    W = np.concatenate([hyper[f"mh_fc.{i}.weight"].double().numpy() for i in range(len(layout.subgates) + 1)])
    b = np.concatenate([hyper[f"mh_fc.{i}.bias"].double().numpy() for i in range(len(layout.subgates) + 1)])
    ids = []
    for lo in range(0, len(emb), 2048):
        a = emb[lo : lo + 2048] @ W.T + b
        x = np_gates(a, their_noise(len(a), layout), layout, order)
        prompts = np_normalize(x, x >= 0.5, layout)
        codes = np_normalize(gs, gs >= 0.5, layout)
        ids.append((prompts @ codes.T).argmax(1))
    return np.concatenate(ids)


def np_binarize(x: np.ndarray, layout: ArchLayout) -> np.ndarray:
    hard = x > 0.5
    for sg in layout.subgates:
        seg = slice(sg.start, sg.stop)
        empty = ~hard[:, seg].any(1)
        hard[empty, sg.start + x[empty, seg].argmax(1)] = True
    return hard


def our_cosines(emb: np.ndarray, hyper: dict, codes: np.ndarray, layout, order) -> np.ndarray:
    """Ours: deterministic gates (the Gumbel noise's mean, 0.5772...), binarised keeping a sub-gate's best entry,
    against the experts' binary codes."""
    W = np.concatenate([hyper[f"mh_fc.{i}.weight"].double().numpy() for i in range(len(layout.subgates) + 1)])
    b = np.concatenate([hyper[f"mh_fc.{i}.bias"].double().numpy() for i in range(len(layout.subgates) + 1)])
    a = emb @ W.T + b
    u_mean = np.exp(-np.exp(-0.5772156649015329))  # G(u) = 0.5772...
    x = np_gates(a, np.full_like(a, u_mean), layout, order, nonzero=False)
    prompts = np_normalize(x, np_binarize(x, layout), layout)
    return prompts @ np_normalize(codes, codes > 0.5, layout).T


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny world and, in their layout: a pruning run (config.yaml + checkpoint-5000/) and a released variant
    (hypernet/, quantizer/, arch<k>/checkpoint-7/ fine-tuned experts)."""
    root = tmp_path_factory.mktemp("aptp-original")
    tiny = build_world(root, train_rows=20, val_rows=6, size=32)
    config = load_unet_config(str(tiny["sd"]))
    layout = ArchLayout.from_config(config)
    dense = load_stable_diffusion(str(tiny["sd"]), subfolders=("unet",))["unet"]
    prompt_dim = PromptEncoder(str(tiny["encoder"])).dim
    run = root / "outputs" / "text2image" / "pruning" / "sd-2-1_cc3m" / "run"
    ckpt = run / "checkpoint-5000"
    written = write_pruning_checkpoint(ckpt, layout, config, dense.state_dict(), prompt_dim)
    (run / "config.yaml").write_text(
        yaml.safe_dump(dict(
            pretrained_model_name_or_path=str(tiny["sd"]), prompt_encoder_model_name_or_path=str(tiny["encoder"]),
            wandb_run_name="run", base_config_path="configs/pruning/sd-2-1_cc3m.yaml", seed=43,
            model=dict(unet=dict(resolution=64), quantizer=dict(num_arch_vq_codebook_embeddings=K)),
            data=dict(dataset_name="cc3m", data_dir=str(tiny["cc3m"])),
            training=dict(losses=dict(resource_loss=dict(pruning_target=0.6))),
        ))
    )  # fmt: skip
    variant = root / "hub" / "APTP-Base-CC3M"
    variant.mkdir(parents=True)
    for part in ("hypernet", "quantizer"):
        shutil.copytree(ckpt / part, variant / part)
    finetuned = {}
    gs = written["gs"]
    codes = original.hard_codes(gs, layout, "test")
    for k in range(K):
        torch.manual_seed(100 + k)
        tuned = copy.deepcopy(dense)
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(torch.randn_like(p) * 0.01)  # "fine-tuned": each expert's weights differ from the dense ones
        finetuned[k] = tuned
        write_expert(variant / f"arch{k}" / f"checkpoint-{STEP}", gs, k, config,
                     materialize(tuned, codes[k], layout).state_dict())  # fmt: skip
    return dict(tiny, root=root, run=run, ckpt=ckpt, variant=variant, layout=layout, config=config, dense=dense,
                finetuned=finetuned, codes=codes, **written)  # fmt: skip


@pytest.fixture(scope="module")
def embeddings(world):
    captions = load_captions("cc3m", world["cc3m"], "train").captions
    return PromptEncoder(str(world["encoder"])).embed(captions), captions


# ------------------------------------------------------------------------------------------ tests


def test_the_fixture_is_their_layout(world):
    gs, logits, layout = world["gs"], world["logits"], world["layout"]
    noiseless = np_gates(logits.double().numpy(), np.full(logits.shape, np.exp(-1.0)), layout, world["order"])  # G = 0
    assert (world["codes"].numpy() != (noiseless >= 0.5)).any(), "embedding_gs must differ from the logits' threshold"
    data = (world["variant"] / "arch1" / f"checkpoint-{STEP}" / "arch_vector.pt").stat().st_size
    assert data > K * layout.size * 4  # saved as a view: all K vectors are in each file
    assert sum(map(sum, structure(layout)["width"])) == layout.width_size
    assert sum(map(sum, structure(layout)["depth"])) == layout.depth_size
    assert ((gs >= 0) & (gs <= 1.5)).all()


@pytest.mark.parametrize("where", ["ckpt", "variant"])
def test_router_is_their_hypernet_and_quantizer(world, where):
    layout = world["layout"]
    router = assignments.load_router(world[where], layout, routing="authors")
    hyper = world["hyper"]
    n = len(layout.subgates) + 1
    torch.testing.assert_close(router.predictor.weight, torch.cat([hyper[f"mh_fc.{i}.weight"] for i in range(n)]))
    torch.testing.assert_close(router.predictor.bias, torch.cat([hyper[f"mh_fc.{i}.bias"] for i in range(n)]))
    torch.testing.assert_close(router.codebook.data, world["logits"])
    assert torch.equal(router.expert_codes().long(), world["codes"])  # from embedding_gs, not from the logits
    torch.testing.assert_close(router.soft_codes, world["gs"])
    assert router.order == tuple(world["order"])
    info = assignments.read_router_info(world[where])
    if where == "ckpt":  # their run's config.yaml: the flags merged into its root
        assert info["pretrained_model_name_or_path"] == str(world["sd"])
        assert info["prompt_encoder"] == str(world["encoder"])
    experts = assignments.read_experts(world[where], world["config"])["experts"]
    assert [e["code"] for e in experts] == world["codes"].tolist()
    assert all(0 < e["macs_ratio"] <= 1 for e in experts)


def test_their_rule_and_ours_against_numpy(world, embeddings):
    emb, _ = embeddings
    layout, hyper, order = world["layout"], world["hyper"], world["order"]
    router = assignments.load_router(world["ckpt"], layout, routing="authors")
    # past 2048 rows the noise starts again: row 2048 + i is routed like row i
    many = torch.cat([emb, torch.randn(2100 - len(emb), emb.shape[1], generator=torch.Generator().manual_seed(3))])
    want = their_route(many.double().numpy(), hyper, world["gs"].double().numpy(), layout, order)
    got = router.route(many).numpy()
    np.testing.assert_array_equal(got, want)
    assert len(set(want.tolist())) > 1, "the fixture should spread prompts over several experts"

    cos = our_cosines(many.double().numpy(), hyper, world["codes"].double().numpy(), layout, order)
    np.testing.assert_allclose(router.cosines(many).numpy(), cos, atol=1e-6)  # gates in float32
    np.testing.assert_array_equal(router.route(many, "cosine").numpy(), cos.argmax(1))
    log_v = router.calibrate(many).numpy()
    np.testing.assert_array_equal(router.route(many, "calibrated").numpy(), (cos / 0.05 + log_v).argmax(1))


@pytest.mark.parametrize("k", range(K))
def test_their_expert_is_the_dense_unet_sliced_by_its_code(world, k):
    folder = world["variant"] / f"arch{k}" / f"checkpoint-{STEP}"
    vector = original.read_arch_vector(folder / "arch_vector.pt", world["layout"].size)
    assert vector.untyped_storage().nbytes() == world["layout"].size * 4  # cloned out of the K-vector storage
    for path in (folder, folder / "unet", folder.parent):  # checkpoint-N, its unet/, or arch<k> (latest checkpoint)
        expert, code = original.load_authors_expert(path)
        assert torch.equal(code, world["codes"][k])
    assert type(expert).__name__ == "UNet2DConditionModel"
    gated = GatedUNet(copy.deepcopy(world["finetuned"][k]), world["layout"])
    gated.set_code(code.float())
    g = torch.Generator().manual_seed(k)
    inputs = dict(
        sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([10, 700]),
        encoder_hidden_states=torch.randn(2, 5, expert.config.cross_attention_dim, generator=g),
    )  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(expert(**inputs).sample, gated.unet(**inputs).sample, rtol=0, atol=1e-5)


def test_their_expert_with_a_wrong_shape_is_one_line(world, tmp_path):
    src = world["variant"] / "arch0" / f"checkpoint-{STEP}"
    bad = tmp_path / "checkpoint-1"
    shutil.copytree(src, bad)
    weights = bad / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    key = next(k for k in state if k.endswith("resnets.0.conv1.weight"))
    state[key] = torch.zeros(1, *state[key].shape[1:])
    save_file(state, weights)
    with pytest.raises(UserError, match=rf"{weights}.*mis-shaped.*{key.split('.')[0]}") as e:
        original.load_authors_expert(bad)
    assert "\n" not in str(e.value)
    (bad / "arch_vector.pt").unlink()
    with pytest.raises(UserError, match="has no arch_vector.pt"):
        original.load_authors_expert(bad)


def test_bad_hypernet_is_one_line(world, tmp_path):
    bad = tmp_path / "checkpoint-1"
    shutil.copytree(world["ckpt"], bad, ignore=shutil.ignore_patterns("unet"))
    state = dict(world["hyper"])
    del state["mh_fc.3.bias"]
    save_file(state, bad / "hypernet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(UserError, match=r"hypernet.*no tensor 'mh_fc.3.bias'"):
        assignments.load_router(bad, world["layout"])


@pytest.mark.slow  # a whole pipeline end to end
def test_pipeline_samples_their_released_variant(world, embeddings, capsys):
    _, captions = embeddings
    pipe = APTPPipeline.from_pretrained(
        world["variant"], pretrained_model_name_or_path=str(world["sd"]), prompt_encoder=str(world["encoder"])
    )
    assert "routing by their rule" in capsys.readouterr().err  # no calibration in their files: their rule
    prompts = [captions[i] for i in range(4)]
    emb = PromptEncoder(str(world["encoder"])).embed(prompts).double().numpy()
    want = their_route(emb, world["hyper"], world["gs"].double().numpy(), world["layout"], world["order"])
    out = pipe(prompts, num_inference_steps=2, seed=0, output_type="np", progress=False)
    assert out.experts == want.tolist()
    assert out.images.shape[0] == 4 and np.isfinite(out.images).all()
    k = out.experts[0]
    direct, _ = original.load_authors_expert(world["variant"] / f"arch{k}")
    for name, tensor in pipe.expert_unet(k).state_dict().items():
        assert torch.equal(tensor, direct.state_dict()[name]), name


@pytest.mark.slow  # a whole pipeline end to end
def test_convert_then_filter_calibrate_and_load(world, embeddings, tmp_path, capsys):
    """convert_original writes our layout; filtering by their rule equals numpy, calibration and our stages follow."""
    for name in ("cc3m_train_mapped_indices.pt",):  # their filtering output travels with the router
        torch.save(torch.zeros(20, dtype=torch.int64), world["ckpt"] / name)
    dst = tmp_path / "converted"
    shutil.copytree(world["variant"] / "arch0", world["ckpt"] / "arch0")  # a checkpoint folder holding one expert
    try:
        convert_original.main([str(world["ckpt"]), str(dst)])
    finally:
        shutil.rmtree(world["ckpt"] / "arch0")
        (world["ckpt"] / "cc3m_train_mapped_indices.pt").unlink()
    out = capsys.readouterr().out
    assert f"converted {world['ckpt']} -> {dst}" in out and "1 fine-tuned expert" in out
    for name in ("router.pt", "router.json", "experts.json", "config.yaml", "cc3m_train_mapped_indices.pt"):
        assert (dst / name).is_file(), name
    expert, code = load_expert(dst / "finetuning" / "expert_0" / "expert")
    theirs, _ = original.load_authors_expert(world["variant"] / "arch0")
    assert torch.equal(code, world["codes"][0])
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(tensor, expert.state_dict()[name]), name

    emb, _ = embeddings
    filter_dataset.main(["--pruning_dir", str(dst), "--routing", "authors", "--splits", "train"])
    want = their_route(emb.double().numpy(), world["hyper"], world["gs"].double().numpy(), world["layout"],
                       world["order"])  # fmt: skip
    np.testing.assert_array_equal(assignments.read_expert_ids(dst, "train"), want)

    calibrate_routing.main(["--pruning_dir", str(dst)])  # ours needs the training captions: config.yaml names them
    router = assignments.load_router(dst, world["layout"])
    assert router.routing == "calibrated" and router.log_v is not None
    with pytest.raises(UserError, match="exists"):
        convert_original.main([str(world["ckpt"]), str(dst)])


def test_filter_routes_their_checkpoint_folder_by_their_rule(world, embeddings, tmp_path, capsys):
    """Filtering reads their checkpoint folder in place (config.yaml one level up; no calibration: their rule, said in
    a note) and routes in their batches of 2048 whatever --batch_size; it writes both sides' files."""
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    ckpt = run / world["ckpt"].name
    filter_dataset.main(["--pruning_dir", str(ckpt), "--batch_size", "3"])
    assert "routing by their rule" in capsys.readouterr().err
    emb, _ = embeddings
    want = their_route(emb.double().numpy(), world["hyper"], world["gs"].double().numpy(), world["layout"],
                       world["order"])  # fmt: skip
    np.testing.assert_array_equal(assignments.read_expert_ids(ckpt, "train"), want)
    theirs = torch.load(ckpt / "cc3m_train_mapped_indices.pt", weights_only=True)
    assert theirs.dtype == torch.int64 and sorted(theirs.tolist()) == sorted(want.tolist())  # their listdir row order
    assert json.loads((ckpt / "filtered" / "train.json").read_text())["routing"] == "authors"


def make_hub_cache(cache, variant_dir, step: int) -> None:
    """The hub cache layout (models--org--name/refs/main, snapshots/<commit>/...) holding a released variant."""
    repo = cache / "models--rezashkv--diffusion_pruning"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(snapshot.name)
    target = snapshot / variant_dir.name
    shutil.copytree(variant_dir, target, ignore=shutil.ignore_patterns("arch*"))
    for arch in variant_dir.glob("arch*"):
        shutil.copytree(arch / f"checkpoint-{STEP}", target / arch.name / f"checkpoint-{step}")


@pytest.mark.slow  # a whole pipeline end to end
def test_hub_variant_asks_for_exactly_its_files(world, tmp_path, monkeypatch):
    import huggingface_hub

    cache = tmp_path / "hub"
    make_hub_cache(cache, world["variant"], original.HUB_STEP)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    asked = []
    real = huggingface_hub.hf_hub_download

    def recording(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        return real(repo_id, filename, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recording)
    pipe = APTPPipeline.from_pretrained(
        "rezashkv/diffusion_pruning", variant="APTP-Base-CC3M", cache_dir=cache, routing="authors",
        pretrained_model_name_or_path=str(world["sd"]), prompt_encoder=str(world["encoder"]),
    )  # fmt: skip
    v = "APTP-Base-CC3M"
    router_files = [f"{v}/{p}/{n}" for p in ("hypernet", "quantizer")
                    for n in ("config.json", "diffusion_pytorch_model.safetensors")]  # fmt: skip
    assert asked == [("rezashkv/diffusion_pruning", f) for f in router_files]
    asked.clear()
    unet = pipe.expert_unet(2)
    c = f"{v}/arch2/checkpoint-30000"
    assert sorted(f for _, f in asked) == sorted(
        [f"{c}/arch_vector.pt", f"{c}/unet/config.json", f"{c}/unet/diffusion_pytorch_model.safetensors"]
    )
    direct, _ = original.load_authors_expert(world["variant"] / "arch2")
    assert all(torch.equal(t, direct.state_dict()[n]) for n, t in unet.state_dict().items())

    # offline with a file missing from the cache: one line naming it and the download command
    missing = next((cache / "models--rezashkv--diffusion_pruning" / "snapshots").iterdir()) / f"{c}/arch_vector.pt"
    missing.unlink()
    pipe.expert_folders.pop(2)
    pipe._pipes.pop(2, None)
    with pytest.raises(UserError, match=rf"1 file\(s\) not in the hub cache.*{c}/arch_vector.pt.*hf download") as e:
        pipe.expert_unet(2)
    assert "\n" not in str(e.value)
