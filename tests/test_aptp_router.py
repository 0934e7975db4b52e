"""APTP router and losses: gates, normalisation, Sinkhorn (also over 2 real gloo processes), routing,
gradients, the prompt encoder from a local folder, and the losses against direct computations."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aptp.layout import ArchLayout, SubGate, binarize
from aptp.losses import (
    LossWeights,
    block_loss,
    contrastive_loss,
    ddpm_loss,
    distill_loss,
    max_loss,
    min_snr_weights,
    resource_loss,
    std_loss,
)
from aptp.router import (
    EXPERT_THRESHOLDS,
    PromptEncoder,
    Router,
    balanced_assignment,
    calibrate,
    depth_order,
    gumbel_gates,
    gumbel_noise,
    load_sentence_encoder,
    normalize_arch,
    sinkhorn,
)
from diffcompress.errors import UserError
from tests.aptp_helpers import TINY_UNET, build_sentence_encoder
from tests.conftest import ROOT
from tests.test_distributed import free_port

SD21_ORDER = (13, 12, 0, 1, 11, 10, 2, 3, 9, 8, 4, 5, 7, 6)
CAPTIONS = [
    "a red cat sitting on the street",
    "photo of a dog",
    "a painting of a blue house with a sign and a car on the beach",
    "man",
    "the text logo",
]


@pytest.fixture(scope="module")
def layout():
    return ArchLayout.from_config(TINY_UNET)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return build_sentence_encoder(tmp_path_factory.mktemp("encoder"))


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def scrambled_router(layout, dim=16, experts=8, seed=0, **options):
    """A router whose predictor and codes give varied hard architectures (at init every gate is open); it routes
    by plain cosine until calibrated."""
    torch.manual_seed(seed)
    router = Router(layout, dim, experts, **options).eval()
    with torch.no_grad():
        router.predictor.weight.mul_(3)
        router.codebook.normal_(0, 3)
    router.routing = "cosine"
    return router


def numpy_sinkhorn(scores, iters=3):
    """The authors' plan [B, K]: Q = exp(S)^T / sum, rows (codes) to 1/K, columns (prompts) to 1/B, times B."""
    q = np.exp(scores - scores.max()).T
    q /= q.sum()
    K, B = q.shape
    for _ in range(iters):
        q /= q.sum(1, keepdims=True) * K
        q /= q.sum(0, keepdims=True) * B
    return (q * B).T


# ----------------------------------------------------------------------------------------------------
# Gates and normalisation


def test_depth_order_follows_the_spec():
    sd21 = ArchLayout.from_config(json.loads((ROOT / "configs/aptp/sd2.1-unet.json").read_text()))
    assert sd21.size == 1620 and depth_order(sd21) == SD21_ORDER
    # the tiny UNet has the same pattern: outer level (up1.a2, up1.r2, down0.r1, down0.a1), then inner
    assert depth_order(ArchLayout.from_config(TINY_UNET)) == (5, 4, 0, 1, 3, 2)
    with pytest.raises(ValueError, match="explicit depth order"):
        depth_order(ArchLayout((SubGate("x", "resnet", 0, 4, 0),), ("x",)))


@pytest.mark.parametrize("with_noise", [False, True])
def test_gumbel_gates_closed_form(layout, with_noise):
    torch.manual_seed(0)
    W, order = layout.width_size, depth_order(layout)
    logits = torch.randn(5, layout.size) * 2
    noise = torch.randn(5, layout.size) if with_noise else None
    gates = gumbel_gates(logits, W, order, noise).double().numpy()

    lg = logits.double().numpy()
    g = noise.double().numpy() if with_noise else np.zeros_like(lg)
    width = sigmoid((lg[:, :W] + g[:, :W] + 3) / 0.4)
    p = np.exp(lg[:, W:]) / np.exp(lg[:, W:]).sum(1, keepdims=True)
    x = np.cumsum(p, axis=1)[:, ::-1]
    ordered = sigmoid((np.log(x + 1e-6) - np.log(1 - x + 1e-6) + g[:, W:] + 3) / 0.4)  # the authors' smoothing
    depth = np.empty_like(ordered)
    depth[:, list(order)] = ordered
    np.testing.assert_allclose(gates, np.concatenate([width, depth], 1), atol=1e-5)


@pytest.mark.parametrize("order", [SD21_ORDER, (5, 4, 0, 1, 3, 2)])
def test_depth_prior_is_monotone_in_the_hard_mask(order):
    torch.manual_seed(1)
    logits = torch.randn(2000, len(order)) * 3
    hard = (gumbel_gates(logits, 0, order) > 0.5).int()[:, list(order)]  # kept flags, most kept first
    assert (hard[:, 1:] <= hard[:, :-1]).all()  # never an outer block dropped while an inner one is kept
    assert hard[:, 0].all()  # x_0 = 1: the outermost block always stays
    dropped = len(order) - hard.sum(1)
    assert dropped.min() == 0 and dropped.max() >= len(order) // 2  # the test sees real pruning


def test_expert_masks_are_hard_and_monotone(layout):
    router = scrambled_router(layout)
    W, order = layout.width_size, list(router.order)
    for k in range(router.num_experts):
        mask = router.expert_mask(k)
        assert mask.shape == (layout.size,) and set(mask.unique().tolist()) <= {0.0, 1.0}
        mean = torch.full((layout.size,), np.euler_gamma)  # the default expert_threshold: the noise's mean
        assert torch.equal(mask, binarize(gumbel_gates(router.codebook[k].detach(), W, order, mean), layout))
        assert all(mask[sg.start : sg.stop].sum() >= 1 for sg in layout.subgates)
        kept = mask[W:][order]
        assert (kept[1:] <= kept[:-1]).all()


def test_normalization_matches_direct_computation(layout):
    """The authors' N: thresholded gates, but soft width x soft depth in the depth-gated blocks; sqrt(1/size)."""
    torch.manual_seed(2)
    mask = torch.rand(3, layout.size)
    for sg in layout.subgates:  # no empty sub-gate, so plain thresholding is the binarisation
        mask[:, sg.start] = 0.9
    mask[0, layout.width_size :] = 0.2  # every block dropped in the first row
    got = normalize_arch(mask, layout).double().numpy()

    W = layout.width_size
    assert any(sg.depth_index is not None for sg in layout.subgates)
    assert any(sg.depth_index is None for sg in layout.subgates)
    for row, soft in zip(got, mask.double().numpy()):
        hard = (soft > 0.5).astype(np.float64)
        parts = []
        for sg in layout.subgates:
            if sg.depth_index is None:
                parts.append(hard[sg.start : sg.stop] / np.sqrt(sg.size))
            else:
                parts.append(soft[sg.start : sg.stop] * soft[W + sg.depth_index] / np.sqrt(sg.size))
        direct = np.concatenate(parts + [hard[W:]])
        np.testing.assert_allclose(row, direct / np.linalg.norm(direct), atol=1e-6)


def test_normalization_passes_gradients_straight_through(layout):
    mask = torch.rand(2, layout.size, requires_grad=True)
    (normalize_arch(mask, layout) * torch.randn(2, layout.size)).sum().backward()
    assert mask.grad.abs().sum() > 0


def test_init_block_orthogonal_and_open(layout):
    router = Router(layout, 16, 8)
    w = router.predictor.weight.detach()
    for sg in layout.subgates:  # rows of a sub-gate are orthonormal (sizes <= 16 here)
        block = w[sg.start : sg.stop]
        torch.testing.assert_close(block @ block.t(), torch.eye(sg.size), atol=1e-5, rtol=0)
    assert router.predictor.bias.abs().sum() == 0
    c = router.codebook.detach()
    torch.testing.assert_close(c @ c.t(), torch.eye(8), atol=1e-5, rtol=0)
    assert all(router.expert_mask(k).all() for k in range(8))  # codes start as the dense model


def test_gumbel_noise_is_one_gumbel_draw():
    u = torch.rand(5, 7, generator=torch.Generator().manual_seed(3)).double().numpy()
    got = gumbel_noise((5, 7), generator=torch.Generator().manual_seed(3)).double().numpy()
    np.testing.assert_allclose(got, -np.log(-np.log(u + 1e-20) + 1e-20), rtol=1e-5, atol=1e-6)
    g = gumbel_noise((400_000,), generator=torch.Generator().manual_seed(0)).double().numpy()
    assert g.mean() == pytest.approx(np.euler_gamma, abs=0.01)  # not logistic noise (mean 0)
    assert np.median(g) == pytest.approx(-np.log(np.log(2)), abs=0.01)
    assert EXPERT_THRESHOLDS["median"] == pytest.approx(-np.log(np.log(2)))
    assert EXPERT_THRESHOLDS["mean"] == pytest.approx(np.euler_gamma)


@pytest.mark.parametrize("rule", ["median", "mean", "none"])
def test_expert_codes_threshold_at_the_rule_s_noise(layout, rule):
    router = scrambled_router(layout, expert_threshold=rule)
    W, order = layout.width_size, router.order
    noise = torch.full((8, layout.size), EXPERT_THRESHOLDS[rule])
    want = binarize(gumbel_gates(router.codebook.detach(), W, order, noise), layout)
    assert torch.equal(router.expert_codes(), want)
    # more noise keeps more: none <= median <= mean, gate by gate
    kept = {r: scrambled_router(layout, expert_threshold=r).expert_codes() for r in ("none", "median", "mean")}
    assert (kept["none"] <= kept["median"]).all() and (kept["median"] <= kept["mean"]).all()
    assert kept["none"].sum() < kept["mean"].sum()


def test_sampled_expert_codes_are_one_seeded_draw(layout):
    router = scrambled_router(layout, expert_threshold="sample")
    a = router.expert_codes(torch.Generator().manual_seed(1))
    assert torch.equal(a, router.expert_codes(torch.Generator().manual_seed(1)))
    assert not torch.equal(a, router.expert_codes(torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match="fixed_codes"):
        router.expert_mask(0)
    router.fixed_codes = a
    assert torch.equal(router.expert_mask(3), a[3])


# ----------------------------------------------------------------------------------------------------
# Sinkhorn and routing


@pytest.mark.parametrize("B,K", [(8, 2), (16, 4), (64, 8), (96, 8), (24, 3), (10, 4), (5, 8)])
def test_sinkhorn_assignment_is_balanced(B, K):
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        a = F.normalize(torch.randn(B, 32, generator=g), dim=1)
        c = F.normalize(torch.randn(K, 32, generator=g), dim=1)
        plan = sinkhorn(a @ c.t() / 0.05)
        torch.testing.assert_close(plan.sum(1), torch.ones(B))  # each prompt's distribution over codes
        counts = torch.bincount(balanced_assignment(plan), minlength=K)
        assert counts.sum() == B
        assert counts.max() - counts.min() <= 1 and counts.min() >= B // K


def test_balanced_assignment_is_the_argmax_when_that_is_balanced():
    K, B = 4, 16
    scores = torch.randn(B, K, generator=torch.Generator().manual_seed(0)) + 10 * F.one_hot(torch.arange(B) % K, K)
    assert torch.equal(balanced_assignment(sinkhorn(scores)), torch.arange(B) % K)


WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from aptp.losses import contrastive_loss
    from aptp.router import balanced_assignment, gather_keeping_grad, sinkhorn
    from diffcompress.distributed import cleanup, setup_distributed

    info = setup_distributed("cpu")
    out = {}
    for name, sizes in (("equal", [8, 8]), ("unequal", [10, 6])):
        scores = torch.randn(sum(sizes), 4, generator=torch.Generator().manual_seed(0)) * 5
        scores[: sizes[0], 0] += 10  # all of rank 0 prefers code 0: only a global balance can spread it
        start = sum(sizes[: info.rank])
        plan = sinkhorn(scores[start : start + sizes[info.rank]])
        out[name] = dict(plan=plan.tolist(), assign=balanced_assignment(plan).tolist())
    g = torch.Generator().manual_seed(1)
    arch, prompts = torch.randn(8, 12, generator=g), torch.randn(8, 6, generator=g)
    mine = slice(4 * info.rank, 4 * info.rank + 4)
    a = arch[mine].clone().requires_grad_()
    loss = contrastive_loss(gather_keeping_grad(a), gather_keeping_grad(prompts[mine]))
    loss.backward()
    out["contrastive"] = dict(loss=loss.item(), grad=a.grad.tolist())
    with open(os.path.join(sys.argv[1], f"rank{info.rank}.json"), "w") as f:
        json.dump(out, f)
    cleanup()
    """
)


@pytest.mark.slow
def test_sinkhorn_and_contrastive_loss_across_two_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={free_port()}", str(script), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))  # this checkout's aptp
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for name, sizes in (("equal", [8, 8]), ("unequal", [10, 6])):
        scores = torch.randn(sum(sizes), 4, generator=torch.Generator().manual_seed(0)) * 5
        scores[: sizes[0], 0] += 10
        plan = torch.tensor(ranks[0][name]["plan"] + ranks[1][name]["plan"])
        assign = torch.tensor(ranks[0][name]["assign"] + ranks[1][name]["assign"])
        reference = sinkhorn(scores)  # one process holding the whole batch
        torch.testing.assert_close(plan, reference, atol=1e-5, rtol=1e-4)
        assert torch.equal(assign, balanced_assignment(reference))
        assert torch.bincount(assign, minlength=4).tolist() == [4, 4, 4, 4]
        assert len(set(ranks[0][name]["assign"])) > 1  # rank 0 alone would have put everything on code 0

    # the contrastive loss over the gathered batch: on each rank, the one-process loss of the whole batch, and the
    # gradient of its own rows is the whole batch's gradient of those rows
    g = torch.Generator().manual_seed(1)
    arch, prompts = torch.randn(8, 12, generator=g).requires_grad_(), torch.randn(8, 6, generator=g)
    whole = contrastive_loss(arch, prompts)
    whole.backward()
    for r in range(2):
        assert ranks[r]["contrastive"]["loss"] == pytest.approx(whole.item(), rel=1e-6)
        torch.testing.assert_close(torch.tensor(ranks[r]["contrastive"]["grad"]), arch.grad[4 * r : 4 * r + 4])
    local = contrastive_loss(arch[:4], prompts[:4]).item()  # what a per-process loss would have been
    assert local != pytest.approx(whole.item(), rel=1e-3)


@pytest.mark.parametrize("rule", ["cosine", "calibrated"])
def test_inference_routing_ignores_batch_and_position(layout, rule):
    router = scrambled_router(layout)
    with torch.no_grad():
        router.codebook[7] = router.codebook[0]  # identical codes: a tie must not depend on the batch
    torch.manual_seed(3)
    emb = torch.randn(24, 16)
    if rule == "calibrated":
        router.calibrate(torch.randn(500, 16))
        assert router.log_v[0] == router.log_v[7]  # identical codes get identical scalings
    router.routing = rule
    batch = router.route(emb)
    assert len(set(batch.tolist())) > 2
    alone = torch.cat([router.route(e[None]) for e in emb])
    assert torch.equal(alone, batch)
    perm = torch.randperm(24)
    assert torch.equal(router.route(emb[perm]), batch[perm])
    padded = torch.cat([torch.randn(40, 16), emb, torch.randn(7, 16)])
    assert torch.equal(router.route(padded)[40:64], batch)
    assert 0 in batch.tolist() and 7 not in batch.tolist()  # the tie was met, and went to the lower index
    assert router.route(emb).dtype == torch.long
    with pytest.raises(UserError, match="aptp.calibrate_routing"):
        Router(layout, 16, 8).route(emb)  # calibrated routing needs the calibration


def test_calibration_is_the_converged_plan_made_per_prompt():
    """At the training temperature, log v from ``calibrate`` is the code scaling of a plain (numpy) Sinkhorn run to
    convergence: its plan's argmax per prompt is argmax_k cos/T + log v_k, and every code gets 1/K of the mass.
    By default the transport is sharpened until the argmax itself is balanced."""
    rng = np.random.default_rng(0)
    cos = np.clip(rng.normal(0.9, 0.02, (300, 4)) + np.array([0.03, 0, 0, -0.02]), -1, 1)  # one code favoured
    log_v = calibrate(torch.tensor(cos), halvings=0).numpy()
    plan = numpy_sinkhorn(cos / 0.05, iters=2000)
    np.testing.assert_allclose(plan.sum(0) / len(cos), 0.25, atol=1e-5)  # balanced codes
    np.testing.assert_array_equal((cos / 0.05 + log_v).argmax(1), plan.argmax(1))
    ratio = plan / np.exp(cos / 0.05)  # u_k w_b: per prompt, the code scalings up to a factor
    np.testing.assert_allclose(np.log(ratio[0]) - np.log(ratio[0]).mean(), log_v, atol=1e-6)
    assert np.bincount(cos.argmax(1), minlength=4)[0] > 200  # plain cosine collapses onto code 0

    sharp = calibrate(torch.tensor(cos)).numpy()
    shares = np.bincount((cos / 0.05 + sharp).argmax(1), minlength=4) * 4 / len(cos)
    assert np.abs(shares - 1).max() <= 0.2, shares


def test_calibrated_routing_uses_every_expert_where_cosine_collapses(layout):
    """Codes nearly parallel (a collapsed codebook): plain cosine sends almost every prompt to one expert; the
    calibrated rule spreads unseen prompts between 1/(2K) and 2/K per expert."""
    K = 4
    router = scrambled_router(layout, experts=K)
    with torch.no_grad():
        base = router.codebook[0].clone()
        for k in range(K):  # small, different perturbations of one code
            router.codebook[k] = base + 0.1 * torch.randn(layout.size, generator=torch.Generator().manual_seed(k))
    train, held_out = torch.randn(2000, 16), torch.randn(400, 16)
    cosine = torch.bincount(router.route(held_out, "cosine"), minlength=K)
    router.calibrate(train)
    routed = torch.bincount(router.route(held_out, "calibrated"), minlength=K)
    assert cosine.max() > 0.6 * len(held_out), cosine  # the collapse this fixes
    assert routed.min() >= len(held_out) / (2 * K) and routed.max() <= 2 * len(held_out) / K, routed


def test_training_routing_gradients(layout):
    torch.manual_seed(4)
    router = Router(layout, 16, 8, assignment="capacity").train()
    emb = torch.randn(4, 16)
    out = router(emb)
    assert torch.bincount(out.expert, minlength=8).max() == 1  # 4 prompts, 8 codes: all different
    (out.mask * torch.randn_like(out.mask)).sum().backward()
    with_grad = {k for k in range(8) if router.codebook.grad[k].abs().sum() > 0}
    assert with_grad == set(out.expert.tolist())  # only the selected codes learn from the UNet losses
    assert router.predictor.weight.grad is None  # the assignment passes no gradient to the predictor

    router.zero_grad(set_to_none=True)
    contrastive_loss(router(emb).arch, emb).backward()
    assert router.predictor.weight.grad.abs().sum() > 0 and router.codebook.grad is None

    router.zero_grad(set_to_none=True)
    out = router(emb, pretrain=True)
    assert out.expert is None
    out.mask.sum().backward()
    assert router.predictor.weight.grad.abs().sum() > 0 and router.codebook.grad is None


def test_training_routing_values(layout):
    torch.manual_seed(5)
    router = scrambled_router(layout, experts=4)
    emb = torch.randn(16, 16)
    out = router(emb, pretrain=True)  # eval mode: no noise, each prompt its own predicted gates
    torch.testing.assert_close(out.mask, router.gates(router.predict(emb), noisy=False))
    torch.testing.assert_close(out.arch, normalize_arch(out.mask, layout))
    codes = router.gates(router.codebook, noisy=False)
    # the authors' assignment: each prompt the argmax of the 3-round Sinkhorn plan (numpy), not balanced
    scores = (out.arch.double() @ normalize_arch(codes, layout).double().t() / 0.05).detach().numpy()
    out = router(emb)
    np.testing.assert_array_equal(out.expert.numpy(), numpy_sinkhorn(scores).argmax(1))
    torch.testing.assert_close(out.mask, codes[out.expert])
    router.assignment = "capacity"  # ours, by option: exactly B/K per code
    assert torch.bincount(router(emb).expert, minlength=4).tolist() == [4, 4, 4, 4]
    router.optimal_transport = False  # without transport: plain argmax, the inference routing by cosine
    assert torch.equal(router(emb).expert, router.route(emb, "cosine"))


def test_router_state_dict_roundtrip(layout, tmp_path):
    router = scrambled_router(layout)
    torch.save(router.state_dict(), tmp_path / "router.pt")
    fresh = Router(layout, 16, 8)
    fresh.load_state_dict(torch.load(tmp_path / "router.pt", weights_only=True))
    emb = torch.randn(10, 16)
    assert torch.equal(fresh.route(emb, "cosine"), router.route(emb))
    assert set(router.state_dict()) == {"predictor.weight", "predictor.bias", "codebook"}


# ----------------------------------------------------------------------------------------------------
# Prompt encoder


def test_encoder_from_local_folder(encoder_dir, layout):
    from transformers import AutoTokenizer, BertModel

    enc = PromptEncoder(str(encoder_dir))
    assert enc.dim == 16
    emb = enc.embed(CAPTIONS, batch_size=2)
    assert emb.shape == (5, 16) and emb.dtype == torch.float32
    assert torch.equal(enc.embed(CAPTIONS, batch_size=2), emb)
    torch.testing.assert_close(torch.cat([enc.embed([c]) for c in CAPTIONS]), emb, atol=1e-6, rtol=0)

    # mean of the token states over the attention mask, not normalised (the saved Normalize is dropped)
    tok = AutoTokenizer.from_pretrained(encoder_dir)
    bert = BertModel.from_pretrained(encoder_dir).eval()
    batch = tok(CAPTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = bert(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    torch.testing.assert_close(emb, (states * m).sum(1) / m.sum(1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(emb.norm(dim=1), torch.ones(5))

    Router(layout, enc.dim).predict(emb).sum().backward()  # usable by the trainable predictor
    assert enc.embed([]).shape == (0, 16)


def test_encoder_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="hf download diffcompress-tests/no-such-encoder") as e:
        load_sentence_encoder("diffcompress-tests/no-such-encoder")
    assert "\n" not in str(e.value)
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(UserError, match="could not load a sentence-transformers model") as e:
        load_sentence_encoder(str(tmp_path))
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------------
# Losses


def sd_alphas_cumprod():
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2  # SD's scaled-linear schedule
    return np.cumprod(1 - betas)


def test_min_snr_weights_against_direct_computation():
    ac = sd_alphas_cumprod().astype(np.float32).astype(np.float64)  # as a scheduler stores it
    t = torch.tensor([0, 10, 100, 400, 700, 999])
    snr = ac[t.numpy()] / (1 - ac[t.numpy()])
    w_v = min_snr_weights(t, torch.tensor(ac, dtype=torch.float32))  # the authors': min(SNR + 1, 5) / (SNR + 1)
    np.testing.assert_allclose(w_v.numpy(), np.minimum(snr + 1, 5) / (snr + 1), rtol=1e-5)
    assert (w_v[3:] == 1).all() and w_v[0] < 0.01  # 1 wherever SNR + 1 <= 5: 83% of the schedule
    w_eps = min_snr_weights(t, torch.tensor(ac), prediction_type="epsilon")
    np.testing.assert_allclose(w_eps.numpy(), np.minimum(snr, 5) / snr, rtol=1e-5)
    with pytest.raises(ValueError, match="prediction_type"):
        min_snr_weights(t, torch.tensor(ac), prediction_type="sample")

    pred, target = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    mse = ((pred - target) ** 2).mean(dim=(1, 2, 3)).numpy()
    got = ddpm_loss(pred, target, t, torch.tensor(ac)).item()
    assert got == pytest.approx(float((np.minimum(snr + 1, 5) / (snr + 1) * mse).mean()), rel=1e-5)


def test_distillation_losses():
    s, t = torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 4, 8, 8, requires_grad=True)
    assert distill_loss(s, t).item() == pytest.approx(((s - t) ** 2).mean().item(), rel=1e-6)
    feats = [(torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)) for _ in range(9)]
    expected = np.mean([((a - b) ** 2).mean().item() for a, b in feats])
    assert block_loss([a for a, _ in feats], [b for _, b in feats]).item() == pytest.approx(expected, rel=1e-6)
    distill_loss(s, t).backward()
    assert t.grad is None and s.grad is not None  # the dense teacher is a target only
    with pytest.raises(ValueError, match="matching"):
        block_loss(feats[0][:1], [])


def test_resource_std_max_losses():
    target = 0.55
    assert resource_loss(torch.full((8,), target), target).item() == pytest.approx(0, abs=1e-7)
    rho = torch.tensor([0.3, 0.5, 0.9, 0.7])
    assert resource_loss(rho, target).item() == pytest.approx(abs(np.log(rho.mean().item() / target)), rel=1e-6)
    for off in (0.5, 0.9, 1.1, 1.6):
        assert resource_loss(torch.full((4,), target * off), target) > 0
    assert resource_loss(torch.full((4,), target * 2), target).item() == pytest.approx(np.log(2), rel=1e-6)
    assert std_loss(rho).item() == pytest.approx(-np.std(rho.numpy(), ddof=1), rel=1e-6)  # unbiased, as the authors
    assert std_loss(rho[:1]).item() == 0
    assert max_loss(rho).item() == pytest.approx(0.1, rel=1e-5)


def test_contrastive_loss():
    torch.manual_seed(6)
    centers = torch.randn(4, 8) * 3
    z = centers.repeat_interleave(4, 0) + torch.randn(16, 8)  # 4 clusters of similar prompts
    q, _ = torch.linalg.qr(torch.randn(40, 8))
    agree = z @ q.t()  # the same cosines in another space
    got = contrastive_loss(agree, z)
    for seed in range(5):
        perm = torch.randperm(16, generator=torch.Generator().manual_seed(seed))
        assert got < contrastive_loss(agree[perm], z)

    e, zn = F.normalize(agree, dim=1).double().numpy(), F.normalize(z, dim=1).double().numpy()

    def softmax(x):
        x = np.exp(x - x.max(1, keepdims=True))
        return x / x.sum(1, keepdims=True)

    p, t = softmax(e @ e.T / 0.03), softmax(zn @ zn.T / 0.03)
    bce = -(t * np.log(p) + (1 - t) * np.log(1 - p)).mean()
    assert got.item() == pytest.approx(bce, rel=1e-4)


def test_loss_weights():
    w = LossWeights()
    assert (w.ddpm, w.distill, w.block, w.resource, w.contrastive, w.std, w.max) == (1, 0.2, 0.2, 2, 100, 0.1, 0.1)
    total = w.total({"ddpm": torch.tensor(1.0), "resource": torch.tensor(0.5), "max": torch.tensor(2.0)})
    assert total.item() == pytest.approx(1 + 1 + 0.2)
    with pytest.raises(KeyError, match="bogus"):
        w.total({"bogus": torch.tensor(1.0)})
