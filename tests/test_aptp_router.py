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
    PromptEncoder,
    Router,
    balanced_assignment,
    depth_order,
    gumbel_gates,
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


def scrambled_router(layout, dim=16, experts=8, seed=0):
    """A router whose predictor and codes give varied hard architectures (at init every gate is open)."""
    torch.manual_seed(seed)
    router = Router(layout, dim, experts).eval()
    with torch.no_grad():
        router.predictor.weight.mul_(3)
        router.codebook.normal_(0, 3)
    return router


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
    with np.errstate(divide="ignore"):  # x_0 = 1: logit +inf, the outermost block is always kept
        ordered = sigmoid((np.log(x) - np.log1p(-x) + g[:, W:] + 3) / 0.4)
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
        assert torch.equal(mask, binarize(gumbel_gates(router.codebook[k].detach(), W, order), layout))
        assert all(mask[sg.start : sg.stop].sum() >= 1 for sg in layout.subgates)
        kept = mask[W:][order]
        assert (kept[1:] <= kept[:-1]).all()


def test_normalization_matches_direct_computation(layout):
    torch.manual_seed(2)
    mask = torch.rand(3, layout.size)
    for sg in layout.subgates:  # no empty sub-gate, so plain thresholding is the binarisation
        mask[:, sg.start] = 0.9
    mask[0, layout.width_size :] = 0.2  # every block dropped in the first row
    got = normalize_arch(mask, layout).double().numpy()

    W = layout.width_size
    for row, m in zip(got, (mask.numpy() > 0.5).astype(np.float64)):
        parts = []
        for sg in layout.subgates:
            depth = m[W + sg.depth_index] if sg.depth_index is not None else 1.0
            parts.append(m[sg.start : sg.stop] * depth / np.sqrt(sg.size))
        direct = np.concatenate(parts + [m[W:]])
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
    from aptp.router import balanced_assignment, sinkhorn
    from diffcompress.distributed import cleanup, setup_distributed

    info = setup_distributed("cpu")
    out = {}
    for name, sizes in (("equal", [8, 8]), ("unequal", [10, 6])):
        scores = torch.randn(sum(sizes), 4, generator=torch.Generator().manual_seed(0)) * 5
        scores[: sizes[0], 0] += 10  # all of rank 0 prefers code 0: only a global balance can spread it
        start = sum(sizes[: info.rank])
        plan = sinkhorn(scores[start : start + sizes[info.rank]])
        out[name] = dict(plan=plan.tolist(), assign=balanced_assignment(plan).tolist())
    with open(os.path.join(sys.argv[1], f"rank{info.rank}.json"), "w") as f:
        json.dump(out, f)
    cleanup()
    """
)


@pytest.mark.slow
def test_sinkhorn_balanced_across_two_processes(tmp_path):
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


def test_inference_routing_ignores_batch_and_position(layout):
    router = scrambled_router(layout)
    with torch.no_grad():
        router.codebook[3] = router.codebook[1]  # identical codes: a tie must not depend on the batch
    torch.manual_seed(3)
    emb = torch.randn(24, 16)
    batch = router.route(emb)
    assert len(set(batch.tolist())) > 2
    alone = torch.cat([router.route(e[None]) for e in emb])
    assert torch.equal(alone, batch)
    perm = torch.randperm(24)
    assert torch.equal(router.route(emb[perm]), batch[perm])
    padded = torch.cat([torch.randn(40, 16), emb, torch.randn(7, 16)])
    assert torch.equal(router.route(padded)[40:64], batch)
    assert 1 in batch.tolist() and 3 not in batch.tolist()  # the tie was met, and went to the lower index
    # at init every code is the dense model: all tied, all to expert 0
    assert router.route(emb).dtype == torch.long and Router(layout, 16, 8).route(emb).eq(0).all()


def test_training_routing_gradients(layout):
    torch.manual_seed(4)
    router = Router(layout, 16, 8).train()
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
    out = router(emb)
    assert torch.bincount(out.expert, minlength=4).tolist() == [4, 4, 4, 4]
    torch.testing.assert_close(out.mask, router.gates(router.codebook, noisy=False)[out.expert])
    router.optimal_transport = False  # without transport: plain argmax, the inference routing
    assert torch.equal(router(emb).expert, router.route(emb))


def test_router_state_dict_roundtrip(layout, tmp_path):
    router = scrambled_router(layout)
    torch.save(router.state_dict(), tmp_path / "router.pt")
    fresh = Router(layout, 16, 8)
    fresh.load_state_dict(torch.load(tmp_path / "router.pt", weights_only=True))
    emb = torch.randn(10, 16)
    assert torch.equal(fresh.route(emb), router.route(emb))
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
    w_v = min_snr_weights(t, torch.tensor(ac, dtype=torch.float32))
    np.testing.assert_allclose(w_v.numpy(), np.minimum(snr, 5) / (snr + 1), rtol=1e-5)
    w_eps = min_snr_weights(t, torch.tensor(ac), prediction_type="epsilon")
    np.testing.assert_allclose(w_eps.numpy(), np.minimum(snr, 5) / snr, rtol=1e-5)
    with pytest.raises(ValueError, match="prediction_type"):
        min_snr_weights(t, torch.tensor(ac), prediction_type="sample")

    pred, target = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    mse = ((pred - target) ** 2).mean(dim=(1, 2, 3)).numpy()
    got = ddpm_loss(pred, target, t, torch.tensor(ac)).item()
    assert got == pytest.approx(float((np.minimum(snr, 5) / (snr + 1) * mse).mean()), rel=1e-5)


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
    assert std_loss(rho).item() == pytest.approx(-np.std(rho.numpy()), rel=1e-6)
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
