"""APTP's filtering and fine-tuning stages on a tiny world (random SD of SD2.1's layout, sentence encoder,
CC3M-layout captions with a corrupt image and a row without one) after a short pruning run: the assignment files,
the expert's initial weights, a real 2-process `accelerate launch` with EMA, resume, and bad input."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from aptp import assignments, filter_dataset, finetune, prune
from aptp.config import FinetuneConfig, FinetuneLossWeights, load_config
from aptp.data import load_captions
from aptp.expert import DroppedResnet, DroppedTransformer, load_expert, materialize
from aptp.layout import ArchLayout
from aptp.macs import mac_table
from aptp.make_tiny import build_world, write_cc3m
from aptp.router import PromptEncoder
from diffcompress.checkpoint import load_file
from diffcompress.errors import UserError
from tests.aptp_helpers import assert_same_tensors, reset_accelerate, stop_and_resume
from tests.conftest import ROOT
from tests.test_distributed import free_port

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = ROOT / "configs/aptp/finetuning"
NUM_EXPERTS = 4


def make_experts_distinct(prune_dir, sd, encoder, captions):
    """A few pruning steps leave every gate open (all experts would be the dense UNet, all captions routed alike).
    Make the router decisive as a long run would: the predictor x30 (its binarised architectures then differ per
    caption), expert 0 the dense code, expert k > 0 the predicted architecture of caption 3k (so it gets captions).
    Rewrites router.pt and experts.json as the pruning stage writes them."""
    config = UNet2DConditionModel.load_config(sd, subfolder="unet")
    layout = ArchLayout.from_config(config)
    router = assignments.load_router(prune_dir, layout)
    emb = PromptEncoder(encoder).embed([captions[3 * k] for k in range(1, NUM_EXPERTS)])
    with torch.no_grad():
        router.predictor.weight.mul_(30)
        router.codebook[0] = 10.0  # open width gates; equal depth logits keep every block
        router.codebook[1:] = router.predict(emb)
    info = assignments.read_router_info(prune_dir)
    embeddings = PromptEncoder(encoder).embed(list(captions))
    prune.write_results(prune_dir, router, mac_table(config, 16, 77, layout), dict(config), info, embeddings)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny world, a 2-step pruning run made decisive, and its captions filtered (in batches of 5)."""
    root = tmp_path_factory.mktemp("aptp-finetune")
    tiny = build_world(root, train_rows=24, val_rows=6, size=32)
    encoder = tiny["encoder"]
    prune_dir = root / "pruning"
    prune.main([
        "--config", str(ROOT / "configs/aptp/pruning/tiny.yaml"), f"pretrained_model_name_or_path={root / 'sd'}",
        f"data.data_dir={root / 'cc3m'}", f"model.prompt_encoder={encoder}", f"output_dir={prune_dir}",
        "data.embedding_cache_dir=null", "training.max_train_steps=2", "training.pretrain_steps=1",
    ])  # fmt: skip
    reset_accelerate()
    captions = load_captions("cc3m", root / "cc3m", "train").captions
    make_experts_distinct(prune_dir, root / "sd", encoder, captions)
    filter_dataset.main(["--pruning_dir", str(prune_dir), "--batch_size", "5"])
    reset_accelerate()
    return dict(root=root, sd=root / "sd", encoder=encoder, cc3m=root / "cc3m", prune_dir=prune_dir)


@pytest.fixture()
def in_process():
    yield
    reset_accelerate()


# ----------------------------------------------------------------------------------------------------
# Configs


def test_configs_hold_the_recipe():
    for name, weights in (("cc3m", (0.01, 0.5, 0.5)), ("coco", (1.0, 0.2, 0.2))):
        cfg = load_config(CONFIGS / f"{name}.yaml", cls=FinetuneConfig)
        t = cfg.training
        assert (cfg.losses.ddpm, cfg.losses.distill, cfg.losses.block) == weights
        assert (t.max_train_steps, t.train_batch_size, t.learning_rate, t.scale_lr) == (30000, 128, 1e-5, True)
        assert (t.lr_warmup_steps, t.snr_gamma, t.resolution, t.max_grad_norm) == (250, 5.0, 256, None)  # no clip
        assert cfg.pruning_dir == f"results/aptp/pruning/{name}" and not cfg.output_dir
    tiny = load_config(CONFIGS / "tiny.yaml", cls=FinetuneConfig)
    assert tiny.training.mixed_precision == "no" and tiny.pruning_dir == "results/aptp-tiny/pruning"
    assert FinetuneLossWeights(1.0, 2.0, 3.0).total(dict(ddpm=1.0, distill=10.0, block=100.0)) == 321.0
    with pytest.raises(UserError, match=r"unknown keys training\.pretrain_steps, losses\.resource$"):
        load_config(CONFIGS / "tiny.yaml", ["training.pretrain_steps=5", "losses.resource=2"], FinetuneConfig)
    with pytest.raises(UserError, match=r"ema_decay must be in \[0, 1\)"):
        load_config(CONFIGS / "tiny.yaml", ["training.ema_decay=1"], FinetuneConfig)


# ----------------------------------------------------------------------------------------------------
# Filtering


def test_filter_writes_what_finetuning_reads(world):
    prune_dir = world["prune_dir"]
    config = UNet2DConditionModel.load_config(world["sd"], subfolder="unet")
    router = assignments.load_router(prune_dir, ArchLayout.from_config(config))
    encoder = PromptEncoder(str(world["encoder"]))
    written = set()
    for split in ("train", "validation"):
        table = load_captions("cc3m", world["cc3m"], split)
        expected = router.route(encoder.embed(list(table.captions))).numpy()  # all at once, embedded afresh
        np.testing.assert_array_equal(assignments.read_expert_ids(prune_dir, split), expected)
        rows = [assignments.read_expert_rows(prune_dir, split, k) for k in range(NUM_EXPERTS)]
        for k in range(NUM_EXPERTS):
            np.testing.assert_array_equal(rows[k], np.flatnonzero(expected == k))
        np.testing.assert_array_equal(np.sort(np.concatenate(rows)), np.arange(len(table)))  # a partition
        summary = assignments.read_summary(prune_dir, split)
        assert summary["rows"] == len(table) == (23 if split == "train" else 6)  # train row 2 has no image
        assert summary["rows_per_expert"] == np.bincount(expected, minlength=NUM_EXPERTS).tolist()
        assert (summary["dataset"], summary["data_dir"]) == ("cc3m", str(world["cc3m"]))
        written |= {assignments.expert_ids_path(prune_dir, split), assignments.summary_path(prune_dir, split)}
        written |= {assignments.expert_rows_path(prune_dir, split, k) for k in range(NUM_EXPERTS)}
    assert set(assignments.filtered_dir(prune_dir).iterdir()) == written
    assert (np.bincount(assignments.read_expert_ids(prune_dir, "train")) > 0).sum() >= 3  # the router splits


# ----------------------------------------------------------------------------------------------------
# The expert before training


def fixed_inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    return dict(
        sample=torch.randn(2, c.in_channels, 16, 16, generator=g),
        timestep=torch.tensor([10, 700]),
        encoder_hidden_states=torch.randn(2, 77, c.cross_attention_dim, generator=g),
    )


def channels(units, width):
    return (np.asarray(units)[:, None] * width + np.arange(width)).ravel()


def test_expert_starts_from_the_dense_weights(world):
    prune_dir = world["prune_dir"]
    dense = UNet2DConditionModel.from_pretrained(world["sd"], subfolder="unet").eval()
    layout = ArchLayout.from_unet(dense)
    code = assignments.expert_code(prune_dir, 2)
    sd, expert = finetune.load_models(str(world["sd"]), None, code)
    assert expert.training and all(p.requires_grad for p in expert.parameters())
    assert not any(p.requires_grad for p in sd["unet"].parameters())
    teacher = sd["unet"].state_dict()
    assert all(torch.equal(v, teacher[k]) for k, v in dense.state_dict().items())  # the teacher is the dense UNet

    state, reference = expert.state_dict(), materialize(dense, code, layout).state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)
    # The same, by index arithmetic on the dense weights: every sliced sub-gate keeps its units' rows/columns.
    keep, sliced = code.numpy().astype(bool), 0
    for sg in layout.subgates:
        units = np.flatnonzero(keep[sg.start : sg.stop])
        if (sg.depth_index is not None and not keep[layout.width_size + sg.depth_index]) or len(units) == sg.size:
            continue
        d, e, sliced = dense.get_submodule(sg.name), expert.get_submodule(sg.name), sliced + 1
        if sg.kind == "resnet":
            ch = channels(units, d.conv1.out_channels // sg.size)
            pairs = [(e.conv1.weight, d.conv1.weight[ch]), (e.time_emb_proj.weight, d.time_emb_proj.weight[ch])]
            pairs += [(e.norm2.weight, d.norm2.weight[ch]), (e.conv2.weight, d.conv2.weight[:, ch])]
        elif sg.kind == "ff":
            inner = d.net[2].in_features
            ch = channels(units, inner // sg.size)
            pairs = [(e.net[0].proj.weight, d.net[0].proj.weight[np.concatenate([ch, ch + inner])])]
            pairs += [(e.net[2].weight, d.net[2].weight[:, ch])]
        else:
            ch = channels(units, d.to_q.out_features // sg.size)
            pairs = [(e.to_q.weight, d.to_q.weight[ch]), (e.to_k.weight, d.to_k.weight[ch])]
            pairs += [(e.to_v.weight, d.to_v.weight[ch]), (e.to_out[0].weight, d.to_out[0].weight[:, ch])]
        for ours, theirs in pairs:
            assert torch.equal(ours, theirs), sg.name
    assert sliced >= 10
    dropped = [p for i, p in enumerate(layout.depth_blocks) if not keep[layout.width_size + i]]
    assert dropped and all(
        isinstance(expert.get_submodule(p), DroppedResnet if ".resnets." in p else DroppedTransformer) for p in dropped
    )

    inputs = fixed_inputs(dense)
    with torch.no_grad():
        dense_out = dense(**inputs).sample
        assert not torch.allclose(expert.eval()(**inputs).sample, dense_out, atol=1e-3)
        code0 = assignments.expert_code(prune_dir, 0)
        assert code0.all()  # the dense code: its expert is the dense UNet, output for output
        assert torch.equal(finetune.load_models(str(world["sd"]), None, code0)[1].eval()(**inputs).sample, dense_out)


# ----------------------------------------------------------------------------------------------------
# Fine-tuning


def launch(world, expert_id, *overrides):
    """``accelerate launch`` with 2 processes (gloo on CPU) of ``python -m aptp.finetune`` on the tiny config."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(free_port()), "-m", "aptp.finetune", "--config", str(CONFIGS / "tiny.yaml")]
    cmd += ["--expert_id", str(expert_id), f"pruning_dir={world['prune_dir']}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


TRAINED = 2  # the expert trained below (a quarter of the 23 training captions, by the calibrated routing)
RUN = ["training.train_batch_size=2", "training.use_ema=true", "training.ema_decay=0.5", "logging.logging_steps=1"]


@pytest.fixture(scope="module")
def launched(world, tmp_path_factory):
    """3 steps of 2 processes x 2 captions, EMA decay 0.5, a checkpoint every step; its log and output folder."""
    out = tmp_path_factory.mktemp("launched") / "expert"
    overrides = [*RUN, f"output_dir={out}", "training.max_train_steps=3", "logging.checkpointing_steps=1"]
    return launch(world, TRAINED, *overrides, "logging.checkpoints_total_limit=null"), out


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoint(out, step, name):
    path = out / "checkpoints" / f"checkpoint-{step}" / name
    return json.loads(path.read_text()) if name.endswith(".json") else load_file(path)


@pytest.mark.slow
def test_two_processes_train_the_routed_captions_and_save_the_expert(world, launched):
    log, out = launched
    prune_dir = world["prune_dir"]
    rows = len(assignments.read_expert_rows(prune_dir, "train", TRAINED))
    assert 4 <= rows <= 8 and f"{rows} training captions routed to expert {TRAINED} (of {rows})" in log
    assert "2 process(es) x 2 x 1 accumulation = global batch 4, lr 0.0002" in log  # 1e-4 x sqrt(4)
    code = assignments.expert_code(prune_dir, TRAINED)
    state = checkpoint(out, 3, "state.json")
    assert (state["step"], state["expert_id"], state["train_rows"], state["world_size"]) == (3, TRAINED, rows, 2)
    assert state["code"] == code.tolist()
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:  # each term is averaged over processes, and so is their weighted sum
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("ddpm", "distill", "block", "loss"))
        assert math.isclose(r["loss"], 0.01 * r["ddpm"] + 0.5 * r["distill"] + 0.5 * r["block"], rel_tol=1e-5)

    # Training starts from the sliced dense weights: Adam's first step (lr 1e-4 in warm-up) moves each weight by at
    # most the lr; the EMA (decay 0.5) follows ema_s = (ema_{s-1} + raw_s) / 2 from those initial weights.
    dense = UNet2DConditionModel.from_pretrained(world["sd"], subfolder="unet").eval()
    initial = materialize(dense, code).state_dict()
    first = checkpoint(out, 1, "model.safetensors")
    assert max((first[k] - v).abs().max().item() for k, v in initial.items()) <= 1e-4 + 1e-6  # + fp32 rounding
    assert sum(not torch.equal(first[k], v) for k, v in initial.items()) > len(initial) // 2
    ema = initial
    for step in (1, 2, 3):
        raw = checkpoint(out, step, "model.safetensors")
        expected = {k: 0.5 * ema[k] + 0.5 * raw[k] for k in ema}
        ema = checkpoint(out, step, finetune.WEIGHTS)
        assert ema.keys() == expected.keys()
        for k in ema:
            torch.testing.assert_close(ema[k], expected[k], rtol=1e-6, atol=1e-7)

    # The saved expert (EMA) and the raw weights reload strictly and compute what their weights compute in a UNet
    # built independently: the dense UNet sliced by the code, given those weights.
    for folder, weights in (("expert", ema), ("expert_raw", raw)):
        loaded, loaded_code = load_expert(out / folder)
        assert torch.equal(loaded_code, code)
        assert all(torch.equal(v, weights[k]) for k, v in loaded.state_dict().items())
        reference = materialize(dense, code)
        reference.load_state_dict(weights, strict=True)
        with torch.no_grad():
            inputs = fixed_inputs(dense)
            torch.testing.assert_close(loaded(**inputs).sample, reference.eval()(**inputs).sample, rtol=0, atol=0)
    assert f"expert {TRAINED}: {out / 'expert'} (EMA weights" in log


@pytest.mark.slow
def test_resume_continues_the_same_expert_only(world, launched, tmp_path, in_process, capsys):
    out = tmp_path / "run"
    shutil.copytree(launched[1], out)
    args = ["--config", str(CONFIGS / "tiny.yaml"), f"pruning_dir={world['prune_dir']}", f"output_dir={out}", *RUN]
    args += ["logging.checkpointing_steps=1000"]
    with pytest.raises(UserError, match="already holds checkpoint-3: set logging.resume_from_checkpoint=latest"):
        finetune.main([*args, "--expert_id", str(TRAINED), "training.max_train_steps=4"])
    args += ["logging.resume_from_checkpoint=latest"]
    with pytest.raises(UserError, match=f"is a checkpoint of expert {TRAINED}, not 1"):
        finetune.main([*args, "--expert_id", "1"])
    with pytest.raises(UserError, match="was trained with training.use_ema=True"):
        finetune.main([*args, "--expert_id", str(TRAINED), "training.use_ema=false"])
    state_file = out / "checkpoints/checkpoint-3/state.json"
    saved = state_file.read_text()
    state = json.loads(saved)
    state["code"][0] = 1 - state["code"][0]
    state_file.write_text(json.dumps(state))
    with pytest.raises(UserError, match="trained another architecture than expert"):
        finetune.main([*args, "--expert_id", str(TRAINED)])
    state_file.write_text(saved)
    capsys.readouterr()

    finetune.main([*args, "--expert_id", str(TRAINED), "training.max_train_steps=4"])
    log = capsys.readouterr().out
    assert f"resumed from {out / 'checkpoints/checkpoint-3'} at step 3" in log
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    assert checkpoint(out, 4, "state.json")["step"] == 4
    ema3, raw4 = checkpoint(out, 3, finetune.WEIGHTS), checkpoint(out, 4, "model.safetensors")
    ema4 = checkpoint(out, 4, finetune.WEIGHTS)  # the EMA went on from the checkpoint's, not from the raw weights
    for k in ema4:
        torch.testing.assert_close(ema4[k], 0.5 * ema3[k] + 0.5 * raw4[k], rtol=1e-6, atol=1e-7)
    loaded, _ = load_expert(out / "expert")
    assert all(torch.equal(v, ema4[k]) for k, v in loaded.state_dict().items())


def test_without_distillation_the_dense_unet_never_runs(world, tmp_path, in_process, monkeypatch):
    calls = []
    real = finetune.load_models

    def counting(*args, **kwargs):
        sd, expert = real(*args, **kwargs)
        sd["unet"].register_forward_hook(lambda *_: calls.append(1))
        return sd, expert

    monkeypatch.setattr(finetune, "load_models", counting)
    out = tmp_path / "run"
    finetune.main(["--config", str(CONFIGS / "tiny.yaml"), f"pruning_dir={world['prune_dir']}", f"output_dir={out}",
                   *RUN, "--expert_id", str(TRAINED), "training.max_train_steps=2", "losses.distill=0",
                   "losses.block=0"])  # fmt: skip
    records = metrics(out)
    assert calls == [] and [r["step"] for r in records] == [1, 2]
    assert "ddpm" in records[0] and "distill" not in records[0] and "block" not in records[0]


def test_bad_input_is_one_line(world, tmp_path, in_process):
    prune_dir = world["prune_dir"]
    args = ["--config", str(CONFIGS / "tiny.yaml"), f"output_dir={tmp_path / 'out'}"]
    with pytest.raises(UserError, match=r"expert 7: the router of .* has experts 0\.\.3") as e:
        finetune.main([*args, "--expert_id", "7", f"pruning_dir={prune_dir}"])
    assert "\n" not in str(e.value)

    unfiltered = tmp_path / "unfiltered"
    shutil.copytree(
        prune_dir, unfiltered, ignore=shutil.ignore_patterns("filtered", "*_mapped_indices.pt", "*_cc3m_names.pkl")
    )
    with pytest.raises(UserError, match=r"does not exist: .*run `python -m aptp.filter_dataset --pruning_dir") as e:
        finetune.main([*args, "--expert_id", "1", f"pruning_dir={unfiltered}"])
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()

    other = write_cc3m(tmp_path / "cc3m", train_rows=10, val_rows=1, size=16)
    with pytest.raises(UserError, match=r"assigns 23 cc3m captions, .* has 9: run `python -m aptp.filter_dataset"):
        finetune.main([*args, "--expert_id", "1", f"pruning_dir={prune_dir}", f"data.data_dir={other}"])
    with pytest.raises(UserError, match="router.json does not exist"):
        filter_dataset.main(["--pruning_dir", str(tmp_path / "cc3m")])


# ----------------------------------------------------------------------------------------------------
# Experts with no or few captions (no captions and no flag: tests/test_aptp_empty_experts.py)


def pruning_dir_with(world, folder, train_ids):
    """The pruning run's files (router, experts, config) in ``folder``, its training captions assigned ``train_ids``."""
    folder.mkdir()
    for f in world["prune_dir"].iterdir():
        if f.is_file():
            shutil.copy2(f, folder / f.name)
    assignments.write_assignments(folder, "train", train_ids, NUM_EXPERTS, dataset="cc3m", data_dir=str(world["cc3m"]))
    return folder


def test_fill_one_batch_repeats_every_caption_evenly(world):
    table = load_captions("cc3m", world["cc3m"], "train").take([4, 7, 9])
    assert finetune.fill_one_batch(table, 3) is table and finetune.fill_one_batch(table, 2) is table
    full = finetune.fill_one_batch(table, 8)
    assert len(full) == 8 and list(full.captions) == [table.captions[i % 3] for i in range(8)]
    assert full.ids.tolist() == [table.ids[i % 3] for i in range(8)]


def test_empty_expert_on_all_prompts_and_a_tiny_expert(world, tmp_path, in_process, capsys, monkeypatch):
    rows = assignments.read_summary(world["prune_dir"], "train")["rows"]
    ids = np.where(np.arange(rows) == 5, 2, 0)  # expert 2: one caption (row 5); experts 1 and 3: none
    prune_dir = pruning_dir_with(world, tmp_path / "pruning", ids)
    seen = []

    class Recording(finetune.CaptionedImages):  # the rows the run trains on
        def __init__(self, table, *args, **kwargs):
            seen.append(list(table.captions))
            super().__init__(table, *args, **kwargs)

    monkeypatch.setattr(finetune, "CaptionedImages", Recording)
    args = ["--config", str(CONFIGS / "tiny.yaml"), f"pruning_dir={prune_dir}", "training.max_train_steps=1"]
    args += ["training.use_ema=false", "logging.logging_steps=1"]
    captions = load_captions("cc3m", world["cc3m"], "train").captions

    out = tmp_path / "all"
    finetune.main([*args, f"output_dir={out}", "--expert_id", "1", "--all_prompts_if_empty"])
    log = capsys.readouterr().out
    assert f"no training caption was routed to expert 1, so all {rows} (--all_prompts_if_empty); 1 process(es)" in log
    assert seen[-1] == list(captions)
    assert checkpoint(out, 1, "state.json")["train_rows"] == rows and (out / "expert").is_dir()
    assert [r["step"] for r in metrics(out)] == [1]

    out = tmp_path / "tiny"
    finetune.main([*args, f"output_dir={out}", "--expert_id", "2", "training.train_batch_size=3"])
    log = capsys.readouterr().out
    assert "1 training captions routed to expert 2 (of 1), fewer than one batch of all processes: each batch holds " \
           "them all, repeated to 3; 1 process(es) x 3 x 1 accumulation = global batch 3" in log  # fmt: skip
    assert seen[-1] == [captions[5]] * 3
    record = metrics(out)[0]
    assert record["step"] == 1 and all(math.isfinite(record[k]) for k in ("ddpm", "distill", "block", "loss"))
    assert checkpoint(out, 1, "state.json")["train_rows"] == 1 and (out / "expert").is_dir()


@pytest.mark.slow  # a whole pipeline end to end
def test_sigterm_and_resume_equal_the_uninterrupted_run_bit_for_bit(world, tmp_path, in_process, capsys):
    """Stopped by SIGTERM after 2 steps and resumed, fine-tuning ends with the expert, its EMA and the optimizer
    state of the run that was never stopped (every draw of a step is seeded by (seed, process, step))."""
    args = ["--config", str(CONFIGS / "tiny.yaml"), f"pruning_dir={world['prune_dir']}", *RUN, "--expert_id", "0"]
    args += ["training.max_train_steps=5", "logging.checkpointing_steps=1000", "training.random_flip=true"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    stop_and_resume(finetune.main, args, straight, stopped, after=2)
    log = capsys.readouterr().out
    assert "preemption signal: checkpointing at step" in log and "resumed from" in log

    name = "checkpoints/checkpoint-5/optimizer.bin"
    assert_same_tensors(*(torch.load(d / name, weights_only=True) for d in (straight, stopped)), name)
    name = "checkpoints/checkpoint-5/model.safetensors"
    assert_same_tensors(*(load_file(d / name) for d in (straight, stopped)), name)
    assert_same_tensors(*(load_expert(d / "expert")[0].state_dict() for d in (straight, stopped)), "expert")
    assert [r["loss"] for r in metrics(straight)] == [r["loss"] for r in metrics(stopped)]
