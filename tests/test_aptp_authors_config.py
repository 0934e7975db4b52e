"""The authors' YAML schema (configs/aptp/authors/, written from the facts about their files) loads into our configs."""

import dataclasses

import pytest
import yaml

from aptp import prune
from aptp.config import FinetuneConfig, PruneConfig, from_dict, load_config
from aptp.make_tiny import build_world
from diffcompress.errors import UserError
from tests.aptp_helpers import reset_accelerate
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

AUTHORS = ROOT / "configs/aptp/authors"
OURS = ROOT / "configs/aptp"
PAIRS = [
    (PruneConfig, "pruning/sd-2-1_cc3m.yaml", "pruning/cc3m.yaml"),
    (PruneConfig, "pruning/sd-2-1_coco2014.yaml", "pruning/coco.yaml"),
    (FinetuneConfig, "finetuning/sd-2-1_cc3m.yaml", "finetuning/cc3m.yaml"),
    (FinetuneConfig, "finetuning/sd-2-1_coco2014.yaml", "finetuning/coco.yaml"),
]
# fields where their files and ours hold different settings, and why
MAY_DIFFER = {
    "output_dir": "their logging_dir prefix vs our run folder (fine-tuning: theirs has no effect, ours is null)",
    "data.data_dir": "their dataset root (data/conceptual_captions) vs ours (data/cc3m; fine-tuning: from the filter)",
    "data.dataloader_num_workers": "their 0 vs our 8",
    "training.mixed_precision": "their null (no) vs our bf16",
    "training.allow_tf32": "their false vs our true",
    "logging.report_to": "their wandb vs our none",
    "logging.checkpoints_total_limit": "their 1 vs our 3",
    "logging.checkpointing_steps": "ours only (fine-tuning: 1000 in our file)",
}
FINETUNING_MAY_DIFFER = {
    "pruning_dir": "their --pruning_ckpt_dir flag vs our file's pruning run",
    "pretrained_model_name_or_path": "their CLI flag vs our file's (null: router.json's)",
    "data.dataset_name": "their file names it; ours takes the filtered run's",
}
PRUNING_MAY_DIFFER = {"logging.resume_from_checkpoint": "their null vs our latest"}


def fields(config, prefix=""):
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out |= fields(value, f"{prefix}{f.name}.")
        else:
            out[prefix + f.name] = value
    return out


@pytest.mark.parametrize("cls, theirs, ours", PAIRS, ids=[p[1] for p in PAIRS])
def test_their_configs_load_into_our_settings(cls, theirs, ours, capsys):
    loaded, expected = fields(load_config(AUTHORS / theirs, cls=cls)), fields(load_config(OURS / ours, cls=cls))
    note = capsys.readouterr().out.splitlines()
    allowed = MAY_DIFFER | (FINETUNING_MAY_DIFFER if cls is FinetuneConfig else PRUNING_MAY_DIFFER)
    assert set(loaded) == set(expected)
    differ = {k for k in loaded if loaded[k] != expected[k]}
    assert differ <= set(allowed), {k: (loaded[k], expected[k]) for k in differ - set(allowed)}
    assert (loaded["training.mixed_precision"], loaded["training.allow_tf32"]) == ("no", False)
    assert loaded["data.dataset_name"] == ("cc3m" if "cc3m" in theirs else "coco")
    assert len(note) == 1 and note[0].startswith("note: keys without effect here (as in the authors' code): ")
    named = note[0].split(": ", 2)[2].split(", ")
    assert {"model.unet.revision", "training.hf_hub", "training.optim.lr_scheduler"} <= set(named)
    if cls is PruneConfig:
        assert loaded["output_dir"] == "results/aptp/authors/pruning"
        assert {"training.optim.unet_learning_rate", "training.losses.diffusion_loss.weight"} <= set(named)
    else:
        assert loaded["output_dir"] is None and loaded["logging.resume_from_checkpoint"] == "latest"
        assert {"model.quantizer", "training.losses.resource_loss", "training.logging.logging_dir"} <= set(named)


def test_overrides_apply_after_translation_and_their_keys_map(tmp_path, capsys):
    cfg = load_config(AUTHORS / PAIRS[0][1], ["model.num_experts=4", "training.mixed_precision=bf16", "seed=1"])
    assert (cfg.model.num_experts, cfg.training.mixed_precision, cfg.seed) == (4, "bf16", 1)
    capsys.readouterr()
    file = tmp_path / "theirs.yaml"
    file.write_text(
        "model:\n  hypernet:\n    single_arch_param: true\n  quantizer:\n    num_arch_vq_codebook_embeddings: 8\n"
        "    optimal_transport: false\ndata:\n  data_dir: /datasets/conceptual_captions\n"
        "training:\n  mixed_precision: fp16\n  losses:\n    resource_loss:\n      pruning_target: 0.5\n"
        "    contrastive_loss:\n      arch_vector_temperature: 0.1\n      prompt_embedding_temperature: 0.1\n"
        "  optim:\n    hypernet_learning_rate: 3e-4\n    quantizer_learning_rate: 3.0e-4\n"
        "  logging:\n    resume_from_checkpoint: latest\n"
    )
    cfg = load_config(file)
    assert (cfg.model.num_experts, cfg.model.optimal_transport, cfg.model.budget) == (1, False, 0.5)
    assert (cfg.data.dataset_name, cfg.training.mixed_precision, cfg.training.learning_rate) == ("cc3m", "fp16", 3e-4)
    assert (cfg.training.contrastive_temperature, cfg.logging.resume_from_checkpoint) == (0.1, "latest")
    assert capsys.readouterr().out == ""  # nothing without effect in this file
    file.write_text("data:\n  data_dir: /data/coco2014\ntraining:\n  optim:\n    unet_learning_rate: 2e-5\n")
    cfg = load_config(file, cls=FinetuneConfig)
    assert (cfg.data.dataset_name, cfg.training.learning_rate) == ("coco", 2e-5)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("model.unet.prediction_type", "epsilon", "model.unet.prediction_type: 'epsilon' is not supported"),
        ("model.unet.noise_offset", "0.1", "model.unet.noise_offset: 0.1 is not supported"),
        ("model.unet.input_perturbation", "0.1", "model.unet.input_perturbation: 0.1 is not supported"),
        ("model.quantizer.non_zero_width", "false", "model.quantizer.non_zero_width: False is not supported"),
        ("training.losses.resource_loss.type", "l1", "training.losses.resource_loss.type: 'l1' is not supported"),
        ("training.losses.std_loss.scale", "2", r"unknown key training\.losses\.std_loss\.scale \(value 2\)"),
        ("model.unet.gates", "3", r"unknown key model\.unet\.gates"),
        ("training.losses.contrastive_loss.prompt_embedding_temperature", "0.05", "differ: ours has one training"),
    ],
)
def test_unsupported_values_and_unknown_keys_are_one_line(tmp_path, key, value, message):
    data = yaml.safe_load((AUTHORS / PAIRS[0][1]).read_text())
    *parents, leaf = key.split(".")
    node = data
    for p in parents:
        node = node[p]
    node[leaf] = yaml.safe_load(value)
    file = tmp_path / "theirs.yaml"
    file.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match=message) as e:
        load_config(file)
    assert "\n" not in str(e.value) and str(file) in str(e.value)


def test_our_configs_load_as_before(capsys):
    paths = sorted(OURS.glob("*/*.yaml"))
    assert len(paths) == 13  # baselines, demo, finetuning, pruning
    for path in paths:
        cls = (
            FinetuneConfig
            if "finetuning" in path.parent.name or path.stem in ("finetuning", "teacher")
            else PruneConfig
        )
        built = from_dict(cls, yaml.safe_load(path.read_text())).validate()  # the loader before the authors' schema
        assert load_config(path, cls=cls) == built
    assert capsys.readouterr().out == ""


def test_their_pruning_config_reaches_training(tmp_path, capsys):
    """``python -m aptp.prune --config <their yaml>`` with the tiny world's models and data: two steps."""
    tiny = build_world(tmp_path / "world", train_rows=8, val_rows=2, size=32)
    args = ["--config", str(AUTHORS / PAIRS[0][1]), f"pretrained_model_name_or_path={tiny['sd']}"]
    args += [f"data.data_dir={tiny['cc3m']}", f"model.prompt_encoder={tiny['encoder']}", "model.num_experts=2"]
    args += [f"output_dir={tmp_path / 'run'}", "training.resolution=32", "training.train_batch_size=2"]
    args += ["training.max_train_steps=2", "training.pretrain_steps=1", "logging.report_to=none"]
    try:
        prune.main(args)
    finally:
        reset_accelerate()
    out = capsys.readouterr().out
    assert "note: keys without effect here" in out and (tmp_path / "run" / "router.pt").is_file()
