"""APTPPipeline: prompts in, images out, each prompt drawn by the expert its router picks.

    from aptp.pipeline import APTPPipeline

    pipe = APTPPipeline.from_pretrained("results/aptp/pruning", device="cuda", torch_dtype=torch.float16)
    out = pipe(["a photo of a cat", "a sign that says open"], seed=43)
    out.images[i], out.experts[i], out.macs[i]          # in prompt order

Built from a pruning directory (``router.pt``, ``router.json``, ``experts.json``: see ``aptp.assignments``), the
Stable Diffusion it pruned (its vae, text encoder and tokenizer; its scheduler's config under PNDM by default, with
PLMS steps only as in SD's own configs) and the experts' UNets. ``experts`` is a mapping expert id -> folder written
by ``aptp.expert.save_expert``, or a folder holding ``expert_<K>/expert`` (``aptp.finetune``'s layout; default
``<pruning_dir>/finetuning``). An expert without a folder is, with ``missing_expert="dense"`` (the default), sliced
from the dense UNet (its weights loaded first) by its code, with a printed warning: the pruned architecture
without fine-tuning. With ``missing_expert="error"`` it is refused. Experts are loaded when first used, then kept.

Routing is ``Router.route`` on the prompt encoder's embeddings: deterministic and independent of the batch. Prompts
are grouped by expert and each group runs through a diffusers ``StableDiffusionPipeline`` sharing the vae, text
encoder, tokenizer and scheduler, ``batch_size`` prompts at a time. Seeds: prompt i draws its noise from its own CPU
generator seeded with ``seed + i`` (or ``seed[i]``), so its image depends neither on the other prompts, nor on the
batch it falls in, nor on the device. ``macs`` is the expert's UNet MACs per denoising step, at the pruning
resolution (``experts.json``).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from diffcompress.errors import UserError
from diffcompress.progress import Progress, progress_bar

from . import original
from .assignments import load_router, read_experts, read_router_info
from .expert import WEIGHTS, materialize
from .filter_dataset import load_unet_config
from .layout import ArchLayout
from .prune import load_stable_diffusion
from .router import PromptEncoder, Router

FINETUNE_DIR = "finetuning"  # aptp.finetune's default: <pruning_dir>/finetuning/expert_<K>/expert
MISSING_EXPERT = ("dense", "error")


@dataclass
class APTPOutput:
    images: list[PIL.Image.Image] | np.ndarray  # PIL images, or float [N, H, W, 3] in [0, 1]; in prompt order
    experts: list[int]  # the expert of each prompt
    macs: list[int]  # that expert's UNet MACs per step (experts.json)


def expert_folder(root: str | os.PathLike, expert: int) -> Path:
    """Where ``aptp.finetune`` saves expert ``expert`` under ``root``."""
    return Path(root) / f"expert_{expert}" / "expert"


def find_expert_folders(
    pruning_dir: str | os.PathLike, experts: str | os.PathLike | Mapping[int, str | os.PathLike] | None, count: int
) -> dict[int, Path]:
    """Expert id -> its folder, for the ids of ``range(count)`` that have one; see the module docstring."""
    if experts is None and original.expert_dirs(pruning_dir):  # a released variant of the authors'
        experts = pruning_dir
    if experts is None or isinstance(experts, (str, os.PathLike)):
        root = Path(pruning_dir) / FINETUNE_DIR if experts is None else Path(experts)
        if experts is not None and not root.is_dir():
            raise UserError(f"experts folder {str(root)!r} does not exist (expected expert_<K>/expert subfolders)")
        if (root / WEIGHTS).is_file() or original.is_authors_expert(root):
            raise UserError(f"{str(root)!r} is one expert's folder: pass {{expert id: folder}} instead")
        if original.expert_dirs(root):  # the authors' arch<k>/checkpoint-N (a released variant)
            return {k: d for k, d in original.expert_dirs(root).items() if k < count}
        return {k: expert_folder(root, k) for k in range(count) if expert_folder(root, k).is_dir()}
    folders = {}
    for k, folder in experts.items():
        if not (isinstance(k, (int, np.integer)) and 0 <= k < count):
            raise UserError(f"expert {k!r}: the router of {pruning_dir} has experts 0..{count - 1}")
        if not Path(folder).is_dir():
            raise UserError(f"expert {k}: folder {str(folder)!r} does not exist")
        folders[int(k)] = Path(folder)
    return folders


def make_scheduler(base: SchedulerMixin, scheduler: str | SchedulerMixin) -> SchedulerMixin:
    """``scheduler`` as is, or the diffusers scheduler class of that name built from ``base``'s config (PNDM: PLMS
    steps only, ``skip_prk_steps``, unless the config says otherwise, as SD's configs do)."""
    if isinstance(scheduler, SchedulerMixin):
        return scheduler
    import diffusers

    cls = getattr(diffusers, scheduler, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise UserError(f"scheduler {scheduler!r}: expected a diffusers scheduler class name, e.g. PNDMScheduler")
    extra = {"skip_prk_steps": base.config.get("skip_prk_steps", True)} if cls is PNDMScheduler else {}
    return cls.from_config(base.config, **extra)


def per_prompt_generators(seed: int | Sequence[int], count: int) -> list[torch.Generator]:
    """One CPU generator per prompt: ``seed + i``, or ``seed[i]``."""
    seeds = [seed + i for i in range(count)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != count:
        raise ValueError(f"{len(seeds)} seeds for {count} prompts")
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def _move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``module.to``, with the dtype only where it changes (diffusers warns at every dtype cast)."""
    return module.to(device) if module.dtype == dtype else module.to(device, dtype)


class APTPPipeline:
    """Routes prompts to experts and draws each with its expert; see the module docstring."""

    def __init__(
        self,
        vae: torch.nn.Module,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        scheduler: SchedulerMixin,
        router: Router,
        experts: Sequence[Mapping[str, Any]],
        expert_folders: Mapping[int, Path],
        prompt_encoder: str | PromptEncoder,
        load_dense: Callable[[], UNet2DConditionModel] | None = None,
        source: str = "the pruning directory",
        fetch_expert: Callable[[int], Path] | None = None,
    ):
        """``experts``: experts.json's entries (``code``, ``macs``); ``load_dense`` (None: a missing expert is an
        error) gives the dense UNet that experts without a folder are sliced from; ``source`` names the pruning
        directory in messages; ``fetch_expert`` (a hub variant) downloads an expert's folder when first used."""
        if len(experts) != router.num_experts:
            raise UserError(f"{source}: the router has {router.num_experts} experts, experts.json {len(experts)}")
        self.vae, self.text_encoder, self.tokenizer, self.scheduler = vae, text_encoder, tokenizer, scheduler
        self.router, self.experts, self.expert_folders = router.eval(), list(experts), dict(expert_folders)
        self.load_dense, self.source, self.fetch_expert = load_dense, source, fetch_expert
        self._prompt_encoder = prompt_encoder
        self._pipes: dict[int, StableDiffusionPipeline] = {}
        self._dense: UNet2DConditionModel | None = None
        self.device, self.dtype = vae.device, vae.dtype

    @classmethod
    def from_pretrained(
        cls,
        pruning_dir: str | os.PathLike,
        experts: str | os.PathLike | Mapping[int, str | os.PathLike] | None = None,
        *,
        variant: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        pretrained_model_name_or_path: str | None = None,
        revision: str | None = None,
        prompt_encoder: str | None = None,
        scheduler: str | SchedulerMixin = "PNDMScheduler",
        missing_expert: str = "dense",
        routing: str | None = None,
        device: str | torch.device = "cpu",
        torch_dtype: torch.dtype = torch.float32,
    ) -> APTPPipeline:
        """Load from a pruning directory of ours, a pruning checkpoint or released variant folder of the authors', or
        a hub repo of theirs with ``variant`` (``rezashkv/diffusion_pruning``, ``variant="APTP-Base-CC3M"``: the
        router now, each expert when first used, into the hub cache or ``cache_dir``); the SD model and the prompt
        encoder default to those of ``router.json`` (the authors': their defaults, SD 2.1 and all-mpnet-base-v2).
        ``routing``: ``calibrated`` (balanced per-prompt rule, as ``aptp.filter_dataset``), ``cosine`` or ``authors``
        (their rule); None: calibrated, or the authors' rule for their uncalibrated routers (a note says so)."""
        if missing_expert not in MISSING_EXPERT:
            raise UserError(f"missing_expert {missing_expert!r}: expected one of {', '.join(MISSING_EXPERT)}")
        fetch_expert = None
        if original.is_hub_variant(str(pruning_dir), variant):
            repo = str(pruning_dir)
            pruning_dir = original.fetch_router_files(repo, variant, cache_dir=cache_dir)
            fetch_expert = functools.partial(original.fetch_expert_files, repo, variant, cache_dir=cache_dir)
        elif variant is not None:
            pruning_dir = Path(pruning_dir) / variant
        if not Path(pruning_dir).is_dir():
            raise UserError(
                f"{str(pruning_dir)!r} is not a folder; expected a pruning directory (ours or the authors'), or a hub "
                f"repo id with variant=, e.g. {original.HUB_REPO!r} and one of {', '.join(original.VARIANTS)}"
            )
        info = read_router_info(pruning_dir)
        sd_name = pretrained_model_name_or_path or info["pretrained_model_name_or_path"]
        sd = load_stable_diffusion(sd_name, revision, torch_dtype, ("vae", "text_encoder", "tokenizer", "scheduler"))
        unet_config = original.unet_config(pruning_dir) if original.is_authors_pruning_dir(pruning_dir) else None
        unet_config = unet_config or load_unet_config(sd_name, revision)
        router = load_router(pruning_dir, ArchLayout.from_config(unet_config), routing=routing)
        table = read_experts(pruning_dir, unet_config)["experts"]
        load_dense = None
        if missing_expert == "dense":
            load_dense = lambda: load_stable_diffusion(sd_name, revision, subfolders=("unet",))["unet"]
        pipe = cls(
            sd["vae"], sd["text_encoder"], sd["tokenizer"], make_scheduler(sd["scheduler"], scheduler), router, table,
            {} if fetch_expert and experts is None else find_expert_folders(pruning_dir, experts, len(table)),
            prompt_encoder or info["prompt_encoder"],
            load_dense, str(pruning_dir), fetch_expert,
        )  # fmt: skip
        return pipe.to(device, torch_dtype)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> APTPPipeline:
        """Move everything to ``device``; the vae, text encoder and experts also to ``dtype`` (the router and the
        prompt encoder stay in float32)."""
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype or self.dtype
        for module in (self.vae, self.text_encoder, *(p.unet for p in self._pipes.values())):
            _move(module, self.device, self.dtype)
        self.router.to(self.device)
        if isinstance(self._prompt_encoder, PromptEncoder):
            self._prompt_encoder.model.to(self.device)
        return self

    @property
    def prompt_encoder(self) -> PromptEncoder:
        """The sentence encoder named in router.json, loaded on first use."""
        if not isinstance(self._prompt_encoder, PromptEncoder):
            self._prompt_encoder = PromptEncoder(self._prompt_encoder, self.device)
        return self._prompt_encoder

    def route(self, prompts: Sequence[str], rule: str | None = None) -> list[int]:
        """The expert of each prompt, per prompt and deterministic: by the router's rule (``calibrated``, as
        ``aptp.filter_dataset``, unless loaded with ``routing="cosine"``) or ``rule``."""
        embeddings = self.prompt_encoder.embed(list(prompts))
        return self.router.route(embeddings.to(self.device), rule).tolist()

    def _check_expert(self, expert: int) -> None:
        if not (isinstance(expert, (int, np.integer)) and 0 <= expert < len(self.experts)):
            raise UserError(f"expert {expert!r}: the router of {self.source} has experts 0..{len(self.experts) - 1}")

    def expert_unet(self, expert: int) -> UNet2DConditionModel:
        """Expert ``expert``'s UNet (eval, on the pipeline's device and dtype): its fine-tuned folder, else sliced from
        the dense UNet."""
        self._check_expert(expert)
        code = torch.tensor(self.experts[expert]["code"])
        folder = self.expert_folders.get(expert)
        if folder is None and self.fetch_expert is not None:
            folder = self.expert_folders[expert] = self.fetch_expert(expert)
        if folder is not None:
            unet, saved = original.load_expert_folder(folder)
            if not torch.equal(saved.int(), code.int()):
                raise UserError(
                    f"expert folder {str(folder)!r} holds another architecture than expert {expert} of "
                    f"{self.source}/experts.json (an expert of another id or pruning run?)"
                )
        elif self.load_dense is None:
            raise UserError(
                f"expert {expert} has no fine-tuned folder (aptp.finetune writes "
                f"{expert_folder(Path(self.source) / FINETUNE_DIR, expert)}); fine-tune it, pass its folder, or allow "
                f"the dense fallback (missing_expert='dense')"
            )
        else:
            print(
                f"warning: expert {expert} has no fine-tuned folder; using its architecture sliced from the dense "
                f"UNet, not fine-tuned",
                file=sys.stderr,
            )
            if self._dense is None:
                self._dense = self.load_dense()
            unet = materialize(self._dense, code, self.router.layout)
        return _move(unet.requires_grad_(False).eval(), self.device, self.dtype)

    def expert_pipeline(self, expert: int) -> StableDiffusionPipeline:
        """A diffusers pipeline of expert ``expert``'s UNet and the shared vae, text encoder, tokenizer, scheduler."""
        if expert not in self._pipes:
            pipe = StableDiffusionPipeline(
                vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.expert_unet(expert),
                scheduler=self.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )  # fmt: skip
            pipe.set_progress_bar_config(disable=True)  # one bar over all prompts instead of one per batch
            self._pipes[expert] = pipe
        return self._pipes[expert]

    @torch.no_grad()
    def generate(
        self,
        expert: int,
        prompts: Sequence[str],
        generators: Sequence[torch.Generator],
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        batch_size: int = 8,
        bar: Progress | None = None,
    ) -> np.ndarray:
        """Images [N, H, W, 3] (float in [0, 1]) of ``prompts`` by expert ``expert``, one generator per prompt."""
        if len(generators) != len(prompts):
            raise ValueError(f"{len(generators)} generators for {len(prompts)} prompts: give one per prompt")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        pipe = self.expert_pipeline(expert)
        images = []
        for i in range(0, len(prompts), batch_size):
            batch = list(prompts[i : i + batch_size])
            images.append(
                pipe(
                    batch, height=height, width=width, num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale, generator=list(generators[i : i + batch_size]), output_type="np",
                ).images
            )  # fmt: skip
            if bar is not None:
                bar.update(len(batch))
        return np.concatenate(images)

    def __call__(
        self,
        prompts: str | Sequence[str],
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        seed: int | Sequence[int] = 0,
        generator: Sequence[torch.Generator] | None = None,
        height: int | None = None,
        width: int | None = None,
        batch_size: int = 8,
        output_type: str = "pil",
        progress: bool = True,
    ) -> APTPOutput:
        """Route each prompt, draw it with its expert (``generator``: one per prompt, else from ``seed``)."""
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts")
        generators = list(generator) if generator is not None else per_prompt_generators(seed, len(prompts))
        experts = self.route(prompts)
        images: list[np.ndarray | None] = [None] * len(prompts)
        with progress_bar(total=len(prompts), desc="APTP", unit="image", disable=not progress) as bar:
            for k in sorted(set(experts)):
                index = [i for i, e in enumerate(experts) if e == k]
                bar.set_postfix(expert=k)
                drawn = self.generate(
                    k, [prompts[i] for i in index], [generators[i] for i in index], num_inference_steps,
                    guidance_scale, height, width, batch_size, bar,
                )  # fmt: skip
                for i, image in zip(index, drawn):
                    images[i] = image
        array = np.stack(images)
        return APTPOutput(
            images=StableDiffusionPipeline.numpy_to_pil(array) if output_type == "pil" else array,
            experts=experts,
            macs=[int(self.experts[k]["macs"]) for k in experts],
        )
