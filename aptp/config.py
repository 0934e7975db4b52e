"""YAML configs of APTP's stages, loaded into dataclasses.

A config file gives any subset of the keys (the rest keep their defaults); ``section.key=value`` arguments on the
command line override it. The authors' schema (``model.unet``, ``training.optim`` ...) is translated first
(``aptp.authors_config``). Unknown keys are an error that names them all; values are checked against the field
types (YAML reads ``2e-4`` as a string: float fields accept such strings).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from diffcompress.errors import UserError

from .authors_config import is_authors_schema, translate
from .losses import LossWeights
from .router import ASSIGNMENTS, DEFAULT_ENCODER, EXPERT_THRESHOLDS

T = TypeVar("T")
THRESHOLDS = ", ".join(EXPERT_THRESHOLDS)


@dataclass
class DataConfig:
    dataset_name: str = "cc3m"  # cc3m | coco
    data_dir: str = "data/cc3m"  # CC3M: the TSVs + training/ validation/; COCO: annotations/ + images/
    max_train_samples: int | None = None  # keep the first N captions (None: all)
    dataloader_num_workers: int = 8
    embedding_cache_dir: str | None = None  # prompt embeddings; None: <output_dir>/prompt_embeddings
    on_empty: str = "report"  # empty captions: report (kept as the empty prompt) | fail


@dataclass
class ModelConfig:
    prompt_encoder: str = DEFAULT_ENCODER  # a local sentence-transformers folder or a hub id
    num_experts: int = 8
    budget: float = 0.6  # keep this fraction of the dense UNet's MACs on average
    optimal_transport: bool = True  # False: each prompt takes its most similar code (a baseline)
    assignment: str = "argmax"  # argmax: each prompt the argmax of the Sinkhorn plan (authors) | capacity: B/K per code
    expert_threshold: str = "mean"  # the noise an expert's code is thresholded with: mean | median | none | sample


@dataclass
class TrainingConfig:
    resolution: int = 256
    random_flip: bool = True
    train_batch_size: int = 64  # per process
    max_train_steps: int = 5000
    pretrain_steps: int = 500  # each prompt gets its own predicted architecture (no codebook yet)
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    learning_rate: float = 2e-4
    scale_lr: bool = True  # learning_rate * sqrt(global batch)
    lr_warmup_steps: int = 100  # then constant
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = None  # None: no clipping, as the authors (our earlier default: 1.0)
    mixed_precision: str = "no"  # no | fp16 | bf16
    allow_tf32: bool = True
    snr_gamma: float = 5.0
    contrastive_temperature: float = 0.03
    max_nan_steps: int = 100  # stop after this many steps with a non-finite gradient


@dataclass
class LoggingConfig:
    report_to: str = "none"  # none | wandb | tensorboard
    tracker_project_name: str = "aptp-pruning"
    logging_steps: int = 10
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None  # keep only the newest N checkpoints
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint folder


@dataclass
class PruneConfig:
    pretrained_model_name_or_path: str = "stabilityai/stable-diffusion-2-1"
    revision: str | None = None
    output_dir: str = "results/aptp/pruning"
    seed: int = 43
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    losses: LossWeights = field(default_factory=LossWeights)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> PruneConfig:
        t, m, log = self.training, self.model, self.logging
        checks = [
            (self.data.dataset_name in ("cc3m", "coco"), "data.dataset_name must be cc3m or coco"),
            (0 < m.budget <= 1, "model.budget must be in (0, 1]"),
            (m.num_experts >= 1, "model.num_experts must be at least 1"),
            (t.resolution > 0 and t.resolution % 8 == 0, "training.resolution must be a positive multiple of 8"),
            (t.mixed_precision in ("no", "fp16", "bf16"), "training.mixed_precision must be no, fp16 or bf16"),
            (log.report_to in ("none", "wandb", "tensorboard"), "logging.report_to must be none, wandb or tensorboard"),
            (m.assignment in ASSIGNMENTS, f"model.assignment must be one of {', '.join(ASSIGNMENTS)}"),
            (m.expert_threshold in EXPERT_THRESHOLDS, f"model.expert_threshold must be one of {THRESHOLDS}"),
            (t.max_grad_norm is None or t.max_grad_norm > 0, "training.max_grad_norm must be positive or null"),
        ]
        positive = ["train_batch_size", "max_train_steps", "gradient_accumulation_steps", "learning_rate"]
        checks += [(getattr(t, k) > 0, f"training.{k} must be positive") for k in positive]
        checks += [(t.pretrain_steps >= 0 and t.lr_warmup_steps >= 0, "training step counts must be >= 0")]
        checks += [(log.checkpointing_steps > 0 and log.logging_steps > 0, "logging step intervals must be positive")]
        for ok, message in checks:
            if not ok:
                raise UserError(f"config: {message}")
        return self


@dataclass
class FinetuneDataConfig:
    dataset_name: str | None = None  # cc3m | coco; None: the dataset the captions were filtered from
    data_dir: str | None = None  # None: the folder the captions were filtered from (<pruning_dir>/filtered/train.json)
    max_train_samples: int | None = None  # keep the expert's first N captions (None: all)
    dataloader_num_workers: int = 8
    on_empty: str = "report"  # empty captions: report (kept as the empty prompt) | fail


@dataclass
class FinetuneTrainingConfig:
    resolution: int = 256
    random_flip: bool = True
    train_batch_size: int = 128  # per process
    max_train_steps: int = 30000
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    learning_rate: float = 1e-5
    scale_lr: bool = True  # learning_rate * sqrt(global batch)
    lr_warmup_steps: int = 250  # then constant
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = None  # None: no clipping, as the authors (our earlier default: 1.0)
    mixed_precision: str = "no"  # no | fp16 | bf16
    allow_tf32: bool = True
    snr_gamma: float = 5.0
    use_ema: bool = False  # also keep an exponential moving average of the weights; the saved expert is the EMA
    ema_decay: float = 0.9999
    max_nan_steps: int = 100  # stop after this many steps with a non-finite gradient


@dataclass(frozen=True)
class FinetuneLossWeights:
    """DDPM + output and block distillation from the dense UNet (defaults: the CC3M recipe; COCO: 1.0/0.2/0.2)."""

    ddpm: float = 0.01
    distill: float = 0.5
    block: float = 0.5

    total = LossWeights.total  # the weighted sum of the named losses


@dataclass
class FinetuneLoggingConfig(LoggingConfig):
    tracker_project_name: str = "aptp-finetuning"


@dataclass
class FinetuneConfig:
    pruning_dir: str = "results/aptp/pruning"  # a finished aptp.prune run, filtered by aptp.filter_dataset
    pretrained_model_name_or_path: str | None = None  # None: the model the router was trained on (router.json)
    revision: str | None = None
    output_dir: str | None = None  # None or "": <pruning_dir>/finetuning/expert_<K>
    seed: int = 43
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    training: FinetuneTrainingConfig = field(default_factory=FinetuneTrainingConfig)
    losses: FinetuneLossWeights = field(default_factory=FinetuneLossWeights)
    logging: FinetuneLoggingConfig = field(default_factory=FinetuneLoggingConfig)

    def validate(self) -> FinetuneConfig:
        t, log = self.training, self.logging
        checks = [
            (self.data.dataset_name in (None, "cc3m", "coco"), "data.dataset_name must be cc3m, coco or null"),
            (t.resolution > 0 and t.resolution % 8 == 0, "training.resolution must be a positive multiple of 8"),
            (t.mixed_precision in ("no", "fp16", "bf16"), "training.mixed_precision must be no, fp16 or bf16"),
            (0 <= t.ema_decay < 1, "training.ema_decay must be in [0, 1)"),
            (t.lr_warmup_steps >= 0, "training.lr_warmup_steps must be >= 0"),
            (log.report_to in ("none", "wandb", "tensorboard"), "logging.report_to must be none, wandb or tensorboard"),
            (log.checkpointing_steps > 0 and log.logging_steps > 0, "logging step intervals must be positive"),
            (t.max_grad_norm is None or t.max_grad_norm > 0, "training.max_grad_norm must be positive or null"),
        ]
        positive = ["train_batch_size", "max_train_steps", "gradient_accumulation_steps", "learning_rate"]
        checks += [(getattr(t, k) > 0, f"training.{k} must be positive") for k in positive]
        for ok, message in checks:
            if not ok:
                raise UserError(f"config: {message}")
        return self


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build the dataclass ``cls`` from a nested mapping; every unknown key (at any depth) is reported at once."""
    unknown: list[str] = []
    obj = _build(cls, data, where, unknown)
    if unknown:
        raise UserError(f"config: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
    return obj


def _build(cls: type[T], data: Any, where: str, unknown: list[str]) -> T:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config: {where.rstrip('.') or 'the file'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown += [where + k for k in data if k not in names]
    kwargs = {}
    for name in names:
        if name in data:
            kind = hints[name]
            if dataclasses.is_dataclass(kind):
                kwargs[name] = _build(kind, data[name], f"{where}{name}.", unknown)
            else:
                kwargs[name] = _coerce(data[name], kind, where + name)
    return cls(**kwargs)


def _coerce(value: Any, kind: Any, key: str) -> Any:
    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                pass
        if option is str and isinstance(value, str):
            return value
    expected = " or ".join("null" if o is type(None) else o.__name__ for o in options)
    raise UserError(f"config: {key} must be {expected}, got {value!r}")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``section.key=value`` pairs (values parsed as YAML) in the nested mapping ``data``."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r}: expected section.key=value")
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r}: {p} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return data


def read_yaml(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file holding a mapping; anything else is one line starting with ``what`` (the file or its flag)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{what} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} must hold a mapping of keys, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None, cls: type[T] = PruneConfig) -> T:
    """Read the YAML file ``path`` (None: defaults only), apply ``overrides``, build and validate ``cls``."""
    data = {} if path is None else read_yaml(path, f"config file {str(path)!r}")
    if is_authors_schema(data):  # the authors' configs/{pruning,finetuning}/*.yaml
        data = translate(data, finetuning=cls is FinetuneConfig, where=f"config file {str(path)!r}")
    config = from_dict(cls, apply_overrides(data, overrides or []))
    return config.validate() if hasattr(config, "validate") else config


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
