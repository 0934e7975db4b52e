"""The APTP authors' YAML schema (``configs/{pruning,finetuning}/*.yaml`` of their repository), read into ours.

Their files nest ``model.{unet,hypernet,quantizer}``, ``data.dataloader`` and ``training.{losses,optim,logging}``;
``translate`` maps every key that has an equivalent here onto our nested mapping (see ``aptp.config``), accepts the
keys that have no effect in their code either (named in one printed note), and refuses in one line a value that
would change what we train (a different prediction type, noise offset, resource loss ...) or a key it does not know.
"""

from __future__ import annotations

from typing import Any

from diffcompress.errors import UserError

# their key -> ours, in both stages
COMMON = {
    "seed": "seed",  # their CLI flags are merged into the config root
    "pretrained_model_name_or_path": "pretrained_model_name_or_path",
    "revision": "revision",
    "model.unet.resolution": "training.resolution",
    "data.dataset_name": "data.dataset_name",
    "data.data_dir": "data.data_dir",
    "data.max_train_samples": "data.max_train_samples",
    "data.dataloader.train_batch_size": "training.train_batch_size",
    "data.dataloader.dataloader_num_workers": "data.dataloader_num_workers",
    "data.dataloader.random_flip": "training.random_flip",
    "training.max_train_steps": "training.max_train_steps",
    "training.gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "training.gradient_checkpointing": "training.gradient_checkpointing",
    "training.allow_tf32": "training.allow_tf32",
    "training.losses.diffusion_loss.snr_gamma": "training.snr_gamma",
    "training.losses.distillation_loss.weight": "losses.distill",
    "training.losses.block_loss.weight": "losses.block",
    "training.optim.adam_beta1": "training.adam_beta1",
    "training.optim.adam_beta2": "training.adam_beta2",
    "training.optim.adam_epsilon": "training.adam_epsilon",
    "training.optim.scale_lr": "training.scale_lr",  # both: lr x sqrt(accumulation x batch x processes)
    "training.optim.lr_warmup_steps": "training.lr_warmup_steps",
    "training.logging.report_to": "logging.report_to",
    "training.logging.checkpoints_total_limit": "logging.checkpoints_total_limit",
    "training.logging.resume_from_checkpoint": "logging.resume_from_checkpoint",
}
# their key -> ours, per stage (several keys onto one of ours must agree)
PRUNING = COMMON | {
    "prompt_encoder_model_name_or_path": "model.prompt_encoder",
    "model.quantizer.num_arch_vq_codebook_embeddings": "model.num_experts",
    "model.quantizer.optimal_transport": "model.optimal_transport",
    "training.hypernet_pretraining_steps": "training.pretrain_steps",
    "training.losses.resource_loss.weight": "losses.resource",
    "training.losses.resource_loss.pruning_target": "model.budget",
    "training.losses.contrastive_loss.arch_vector_temperature": "training.contrastive_temperature",
    "training.losses.contrastive_loss.prompt_embedding_temperature": "training.contrastive_temperature",
    "training.losses.contrastive_loss.weight": "losses.contrastive",
    "training.losses.std_loss.weight": "losses.std",
    "training.losses.max_loss.weight": "losses.max",
    "training.optim.hypernet_learning_rate": "training.learning_rate",
    "training.optim.quantizer_learning_rate": "training.learning_rate",
    "training.optim.hypernet_weight_decay": "training.adam_weight_decay",
    "training.optim.quantizer_weight_decay": "training.adam_weight_decay",
    "training.logging.logging_dir": "output_dir",  # their run folder's prefix
}
FINETUNING = COMMON | {
    "pruning_ckpt_dir": "pruning_dir",
    "training.losses.diffusion_loss.weight": "losses.ddpm",
    "training.optim.unet_learning_rate": "training.learning_rate",
    "training.optim.unet_weight_decay": "training.adam_weight_decay",
}

# keys whose only supported value is the authors' default (another one would change the training)
REQUIRED = {
    "model.unet.input_perturbation": 0,
    "model.unet.noise_offset": 0,
    "model.unet.prediction_type": "v_prediction",
    "model.unet.max_scheduler_steps": None,  # t ~ U{0..999}
    "model.unet.gated_ff": True,
    "model.unet.ff_gate_width": 32,
    "model.hypernet.weight_norm": False,
    "model.hypernet.linear_bias": True,
    "model.quantizer.quantizer_T": 0.4,  # aptp.router.TEMPERATURE
    "model.quantizer.quantizer_base": 3,  # aptp.router.OFFSET
    "model.quantizer.non_zero_width": True,
    "model.quantizer.resource_aware_normalization": False,
    "training.losses.resource_loss.type": "log",
    "training.optim.use_8bit_adam": False,
    "training.optim.lr_scheduler": "constant_with_warmup",
}

# keys (or whole sections) without effect in their code as well; accepted with any value
NO_EFFECT = [
    "model.unet.pretrained_model_name_or_path", "model.unet.revision", "model.unet.use_ema",
    "model.unet.unet_down_blocks", "model.unet.unet_mid_block", "model.unet.unet_up_blocks",
    "model.quantizer.arch_vq_beta", "model.quantizer.depth_order",
    "data.train_data_dir", "data.train_data_file", "data.validation_data_dir", "data.validation_data_file",
    "data.year", "data.data_files", "data.dataset_config_name", "data.image_column", "data.caption_column",
    "data.max_validation_samples", "data.prompts", "data.max_generated_samples",
    "data.dataloader.validation_batch_size", "data.dataloader.image_generation_batch_size",
    "data.dataloader.center_crop",
    "training.num_train_epochs", "training.validation_steps", "training.image_logging_steps",
    "training.num_inference_steps", "training.local_rank", "training.enable_xformers_memory_efficient_attention",
    "training.hf_hub",
    "training.logging.tracker_project_name", "training.logging.wandb_log_dir", "training.logging.auto_checkpoint_step",
    # their command-line flags, merged into the root of the config.yaml their runs save
    "base_config_path", "wandb_run_name", "tracker_project_name", "pruning_type", "non_ema_revision",
    "enable_xformers_memory_efficient_attention", "push_to_hub", "local_rank", "mixed_precision", "cache_dir",
    "use_ema", "clip_model_name_or_path", "finetuning_ckpt_dir", "expert_id",
]  # fmt: skip
# ... and the other stage's keys: the pruning run's router, codebook and losses mean nothing to fine-tuning
NO_EFFECT_PRUNING = [
    *NO_EFFECT, "training.losses.diffusion_loss.weight",  # the DDPM loss has weight 1 in their pruning
    "pruning_ckpt_dir",  # set by their filtering command, saved into the same config
    "training.optim.unet_learning_rate", "training.optim.unet_weight_decay",
]  # fmt: skip
NO_EFFECT_FINETUNING = [
    *NO_EFFECT, "prompt_encoder_model_name_or_path", "model.hypernet", "model.quantizer",
    "training.hypernet_pretraining_steps",
    "training.losses.resource_loss", "training.losses.contrastive_loss", "training.losses.std_loss",
    "training.losses.max_loss", "training.optim.hypernet_learning_rate", "training.optim.quantizer_learning_rate",
    "training.optim.hypernet_weight_decay", "training.optim.quantizer_weight_decay",
    "training.logging.logging_dir",  # one prefix for every expert: ours is <pruning_dir>/finetuning/expert_<K>
]  # fmt: skip

DATASETS = {"conceptual_captions": "cc3m", "coco": "coco"}  # a data_dir holding the name picks the loader


def is_authors_schema(data: Any) -> bool:
    """Their files have ``model.{unet,hypernet,quantizer}`` or ``training.{losses,optim}``; ours have neither."""
    model, training = data.get("model"), data.get("training")
    return (isinstance(model, dict) and bool({"unet", "hypernet", "quantizer"} & set(model))) or (
        isinstance(training, dict) and bool({"losses", "optim"} & set(training))
    )


def translate(data: dict[str, Any], finetuning: bool, where: str = "config") -> dict[str, Any]:
    """Their nested mapping -> ours (nested, to be built by ``aptp.config.from_dict``); prints the no-effect note."""
    table = FINETUNING if finetuning else PRUNING
    no_effect = NO_EFFECT_FINETUNING if finetuning else NO_EFFECT_PRUNING
    flat = _flatten(data)
    ours: dict[str, Any] = {}
    given: dict[str, str] = {}  # our key -> the key of theirs that set it
    ignored: list[str] = []
    for key, value in flat.items():
        if key in REQUIRED and not _same(value, REQUIRED[key]):
            raise UserError(f"{where}: {key}: {value!r} is not supported here (only {REQUIRED[key]!r})")
        # a section's entry ("model.quantizer") covers its keys
        section = min((k for k in no_effect if key == k or key.startswith(k + ".")), key=len, default=None)
        if section is not None or key in REQUIRED:
            if (section or key) not in ignored:
                ignored.append(section or key)
        elif key in table:
            target = table[key]
            if target in ours and not _same(ours[target], value):
                raise UserError(
                    f"{where}: {given[target]}={ours[target]!r} and {key}={value!r} differ: ours has one {target}"
                )
            ours[target], given[target] = value, key
        elif key == "training.mixed_precision":
            ours["training.mixed_precision"] = "no" if value is None else value
        elif key == "model.hypernet.single_arch_param":
            if not isinstance(value, bool):
                raise UserError(f"{where}: {key} must be true or false, got {value!r}")
        else:
            raise UserError(f"{where}: unknown key {key} (value {value!r}) in the authors' schema")
    if flat.get("model.hypernet.single_arch_param") is True and not finetuning:
        ours["model.num_experts"] = 1  # one architecture for every prompt, whatever the codebook's size
    data_dir = ours.get("data.data_dir")
    if "data.dataset_name" not in ours and isinstance(data_dir, str):
        found = [ours_name for theirs, ours_name in DATASETS.items() if theirs in data_dir]
        if found:
            ours["data.dataset_name"] = found[0]
    if ignored:
        print(f"note: keys without effect here (as in the authors' code): {', '.join(ignored)}")
    nested: dict[str, Any] = {}
    for key, value in ours.items():
        *parents, leaf = key.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _same(a: Any, b: Any) -> bool:
    """Equal values; YAML reads ``2e-4`` as a string, so numbers are compared as floats."""
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return a == b
