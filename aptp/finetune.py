"""APTP's fine-tuning stage: train one expert, the dense UNet sliced by its architecture code, on its prompts.

    accelerate launch -m aptp.finetune --config configs/aptp/finetuning/cc3m.yaml --expert_id 0 [section.key=value ...]
    python -m aptp.finetune --config configs/aptp/finetuning/tiny.yaml --expert_id 1    # one process, e.g. on CPU

Needs a finished pruning run (``pruning_dir``) whose captions ``python -m aptp.filter_dataset`` assigned to experts.
The expert is the dense UNet with its weights loaded first, then sliced by expert K's binary code
(``aptp.expert.materialize``). It is trained on the training captions routed to K with the min-SNR v-prediction
DDPM loss, output distillation and block distillation from the dense UNet (frozen, no grad); block outputs (each
down block, the mid block, each up block) come from forward hooks, a dropped layer being an identity inside its
block. An expert that no training caption was routed to has nothing to train: one line, exit 0, nothing written
(``--all_prompts_if_empty`` trains it on all the training captions instead). One with fewer captions than a batch of
all processes trains on them repeated to one full batch (each caption the same number of times, give or take one),
so every step sees all of them at the configured batch size and learning rate.

Written to ``output_dir`` (default ``<pruning_dir>/finetuning/expert_<K>``): ``config.yaml``, ``log.txt``,
``metrics.jsonl``; ``checkpoints/checkpoint-<step>/`` (accelerate state; ``expert.safetensors``: the weights the run
saves at the end, the EMA when used; ``state.json``: step, expert, code, training rows); at the end ``expert/``: the
EMA weights when ``training.use_ema`` (the raw ones then in ``expert_raw/``), with the code and the dense UNet's
config, loaded by ``aptp.expert.load_expert``. SIGTERM or SIGUSR1 writes a checkpoint and exits 0;
``logging.resume_from_checkpoint: latest`` continues (the same expert and code only).
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import UNet2DConditionModel

from diffcompress.checkpoint import load_file
from diffcompress.cli import ArgumentParser, non_negative_int, run
from diffcompress.distributed import get_logger
from diffcompress.ema import create_ema, update_ema
from diffcompress.errors import UserError
from diffcompress.trainer import StepSampler

from .assignments import expert_code, read_expert_rows, read_experts, read_router_info, read_summary, summary_path
from .config import FinetuneConfig, load_config, to_dict
from .data import CaptionedImages, CaptionTable, collate, load_captions, random_flip
from .expert import materialize, save_expert
from .layout import ArchLayout
from .loop import load_training_state, read_state, run_steps
from .losses import block_loss, ddpm_loss, distill_loss
from .prune import STATE, capture_block_outputs, load_stable_diffusion, resume_path, save_state

WEIGHTS = "expert.safetensors"  # in each checkpoint: the weights the run would save now


def expert_captions(
    cfg: FinetuneConfig, expert_id: int, all_if_empty: bool = False
) -> tuple[CaptionTable | None, int, CaptionTable]:
    """The training captions routed to ``expert_id`` (``filtered/train_expert_<K>.npy`` rows of the caption table
    they were filtered from, the first ``data.max_train_samples``), how many were routed to it, and the whole table.
    None when none was routed to it, unless ``all_if_empty``: then all training captions (the first
    ``data.max_train_samples``)."""
    rows = read_expert_rows(cfg.pruning_dir, "train", expert_id)
    summary = read_summary(cfg.pruning_dir, "train")
    dataset = cfg.data.dataset_name or summary["dataset"]
    data_dir = cfg.data.data_dir or summary["data_dir"]
    table = load_captions(dataset, data_dir, "train", on_empty=cfg.data.on_empty)
    if dataset != summary["dataset"] or len(table) != summary["rows"]:
        raise UserError(
            f"{summary_path(cfg.pruning_dir, 'train')} assigns {summary['rows']} {summary['dataset']} captions, "
            f"{table.source} has {len(table)}: run `python -m aptp.filter_dataset --pruning_dir {cfg.pruning_dir} "
            f"--data_dir {data_dir}` again"
        )
    routed = len(rows)
    if routed == 0:
        if not all_if_empty:
            return None, 0, table
        rows = np.arange(len(table))
    return table.take(rows[: cfg.data.max_train_samples]), routed, table


def fill_one_batch(data: CaptionTable, batch: int) -> CaptionTable:
    """``data`` repeated (each caption the same number of times, give or take one) to ``batch`` rows when it has
    fewer, so that every step of a tiny expert still sees a full batch of all its captions."""
    return data if len(data) >= batch else data.take(np.resize(np.arange(len(data)), batch))


def load_models(
    name: str, revision: str | None, code: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, Any], UNet2DConditionModel]:
    """Stable Diffusion (frozen, eval; unet, vae and text encoder in ``dtype``; the UNet is the dense teacher) and
    the expert: the dense UNet's float32 weights, loaded first, sliced by ``code`` (trainable, train mode)."""
    sd = load_stable_diffusion(name, revision)  # float32: the expert's master weights are sliced from these
    layout = ArchLayout.from_unet(sd["unet"])
    if len(code) != layout.size:
        raise UserError(
            f"the expert's code has {len(code)} gates, the UNet of {name!r} {layout.size}: "
            f"pretrained_model_name_or_path must be the model that was pruned"
        )
    expert = materialize(sd["unet"], code, layout).requires_grad_(True).train()
    if dtype != torch.float32:
        for sub in ("unet", "vae", "text_encoder"):
            sd[sub].to(dtype)
    return sd, expert


def check_resume(state: dict[str, Any], expert_id: int, code: torch.Tensor, use_ema: bool, where: Path) -> None:
    """A checkpoint continues only the run it came from: same expert, same code, same EMA setting."""
    if state["expert_id"] != expert_id:
        raise UserError(
            f"{where} is a checkpoint of expert {state['expert_id']}, not {expert_id}: use another output_dir"
        )
    if state["code"] != code.tolist():
        raise UserError(
            f"{where} trained another architecture than expert {expert_id}'s code in experts.json (was the pruning "
            f"run redone?): use another output_dir"
        )
    if state["use_ema"] != use_ema:
        raise UserError(f"{where} was trained with training.use_ema={state['use_ema']}: keep that setting to resume")


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description="APTP fine-tuning: train one expert on the prompts routed to it")
    parser.add_argument("--config", required=True, help="YAML file (configs/aptp/finetuning/*.yaml)")
    parser.add_argument("--expert_id", type=non_negative_int, required=True, help="the expert to train (0..K-1)")
    parser.add_argument(
        "--all_prompts_if_empty", action="store_true",
        help="an expert that no training caption was routed to trains on all of them (default: nothing to do, exit 0)",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.max_train_steps=100")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after --expert_id
    cfg = load_config(args.config, args.overrides, FinetuneConfig)
    expert_id, pruning_dir = args.expert_id, Path(cfg.pruning_dir)
    cfg.output_dir = cfg.output_dir or str(pruning_dir / "finetuning" / f"expert_{expert_id}")
    t, out = cfg.training, Path(cfg.output_dir)
    if cfg.logging.report_to != "none" and importlib.util.find_spec(cfg.logging.report_to) is None:
        raise UserError(f"logging.report_to {cfg.logging.report_to} needs `pip install {cfg.logging.report_to}`")
    data, routed, table = expert_captions(cfg, expert_id, args.all_prompts_if_empty)  # bad input fails here
    if data is None:  # one line (from the main process of a launch), nothing written
        if int(os.environ.get("RANK", "0")) == 0:
            print(
                f"expert {expert_id}: no training caption of {table.source} was routed to it; nothing to train "
                f"(--all_prompts_if_empty trains it on all {len(table)} training captions)"
            )
        return
    code = expert_code(pruning_dir, expert_id)
    described = read_experts(pruning_dir)["experts"][expert_id]

    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # so that multi-process launches without CUDA run on gloo
        gradient_accumulation_steps=t.gradient_accumulation_steps, mixed_precision=t.mixed_precision,
        log_with=None if cfg.logging.report_to == "none" else cfg.logging.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )  # fmt: skip
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    logger = get_logger("aptp.finetune", out if accelerator.is_main_process else None, rank)
    set_seed(cfg.seed, device_specific=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = t.allow_tf32
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[t.mixed_precision]

    resume = resume_path(cfg)
    state = read_state(resume, STATE, {"expert_id": int, "code": list, "use_ema": bool}) if resume else {}
    if resume:
        check_resume(state, expert_id, code, t.use_ema, resume)

    name = cfg.pretrained_model_name_or_path or read_router_info(pruning_dir)["pretrained_model_name_or_path"]
    sd, expert = load_models(name, cfg.revision, code, weight_dtype)
    dense, vae, text_encoder = sd["unet"], sd["vae"], sd["text_encoder"]
    tokenizer, scheduler = sd["tokenizer"], sd["scheduler"]
    # Without distillation (both weights 0, e.g. training a dense model) the dense UNet never runs: no forward, no
    # device memory.
    distill = cfg.losses.distill != 0 or cfg.losses.block != 0
    for model in (dense, vae, text_encoder, expert) if distill else (vae, text_encoder, expert):
        model.to(device)
    ema = create_ema(expert) if t.use_ema else None  # before the hooks: the copy would share their outputs
    if t.gradient_checkpointing:
        expert.enable_gradient_checkpointing()
    if distill:
        teacher_blocks, student_blocks = capture_block_outputs(dense), capture_block_outputs(expert)
    dense_params = sum(p.numel() for p in dense.parameters())
    expert_params = sum(p.numel() for p in expert.parameters())

    dataset = CaptionedImages(fill_one_batch(data, t.train_batch_size * world), t.resolution, tokenizer)
    sampler = StepSampler(len(dataset), t.train_batch_size * world, rank, world, cfg.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=t.train_batch_size, sampler=sampler, num_workers=cfg.data.dataloader_num_workers,
        collate_fn=collate, pin_memory=device.type == "cuda", drop_last=True,
    )  # fmt: skip

    global_batch = t.train_batch_size * world * t.gradient_accumulation_steps
    lr = t.learning_rate * math.sqrt(global_batch) if t.scale_lr else t.learning_rate
    optimizer = torch.optim.AdamW(
        expert.parameters(), lr=lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.adam_weight_decay,
        eps=t.adam_epsilon,
    )  # fmt: skip
    expert, optimizer = accelerator.prepare(expert, optimizer)
    step = 0
    if resume:
        load_training_state(accelerator, resume, logger)  # each file it reads, named when it is broken
        if ema is not None:  # the checkpoint's weights file holds the EMA
            try:
                ema.load_state_dict(load_file(resume / WEIGHTS), strict=True)
            except RuntimeError as e:  # keys or shapes of another model
                raise UserError(
                    f"{resume / WEIGHTS}: not this expert's EMA weights ({str(e).splitlines()[0]})"
                ) from None
        step = state["step"]
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        flat = {f"{s}.{k}": v for s, sec in to_dict(cfg).items() if isinstance(sec, dict) for k, v in sec.items()}
        flat.update(expert_id=expert_id, train_rows=len(data))
        accelerator.init_trackers(cfg.logging.tracker_project_name, {k: v for k, v in flat.items() if v is not None})
    logger.info(
        f"expert {expert_id} of {pruning_dir}: {expert_params / 1e6:.3f}M parameters "
        f"({expert_params / dense_params:.1%} of the dense UNet), {described['macs_ratio']:.1%} of its MACs; "
        f"sliced from the weights of {name}"
    )
    if routed:
        captions = f"{len(data)} training captions routed to expert {expert_id} (of {routed})"
    else:
        captions = f"no training caption was routed to expert {expert_id}, so all {len(data)} (--all_prompts_if_empty)"
    if len(dataset) > len(data):
        captions += f", fewer than one batch of all processes: each batch holds them all, repeated to {len(dataset)}"
    logger.info(
        f"{data.source}: {captions}; {world} process(es) x {t.train_batch_size} x {t.gradient_accumulation_steps} "
        f"accumulation = global batch {global_batch}, lr {lr:.3g}"
        + (f"; resumed from {resume} at step {step}" if resume else "")
    )

    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    prediction_type = scheduler.config.prediction_type

    def losses(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            pixels = batch["pixel_values"].to(device, weight_dtype)
            latents = vae.encode(random_flip(pixels) if t.random_flip else pixels).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
            text = text_encoder(batch["input_ids"].to(device))[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target_v = scheduler.get_velocity(latents, noise, timesteps) if prediction_type == "v_prediction" else noise
        with accelerator.autocast():
            student = expert(noisy, timesteps, text).sample
            terms = dict(ddpm=ddpm_loss(student, target_v, timesteps, alphas_cumprod, t.snr_gamma, prediction_type))
            if distill:
                with torch.no_grad():
                    teacher = dense(noisy, timesteps, text).sample
                terms["distill"] = distill_loss(student, teacher)
                terms["block"] = block_loss(list(student_blocks.values()), list(teacher_blocks.values()))
            return terms

    def micro_step(batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        terms = losses(batch)
        return {**terms, "loss": cfg.losses.total(terms)}

    def checkpoint(step: int) -> None:
        folder = out / "checkpoints" / f"checkpoint-{step}"
        meta = dict(
            step=step, expert_id=expert_id, code=code.tolist(), pruning_dir=str(pruning_dir), train_rows=len(data),
            use_ema=t.use_ema, world_size=world, train_batch_size=t.train_batch_size,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
        )  # fmt: skip
        weights = expert if ema is None else ema
        save_state(accelerator, weights, folder, meta, cfg.logging.checkpoints_total_limit, weights=WEIGHTS)
        logger.info(f"saved {folder}")

    result = run_steps(
        accelerator, expert, optimizer, loader, sampler, step=step, seed=cfg.seed, lr=lr, training=t,
        logging=cfg.logging, out=out, logger=logger, desc=f"expert {expert_id}", loss_fn=micro_step,
        checkpoint=checkpoint,
        after_update=None if ema is None else lambda: update_ema(ema, accelerator.unwrap_model(expert), t.ema_decay),
    )  # fmt: skip
    if result.preempted:
        return
    if accelerator.is_main_process:
        raw = accelerator.unwrap_model(expert)
        saved = save_expert(ema if ema is not None else raw, code, out / "expert")
        print(f"expert {expert_id}: {saved} ({'EMA' if ema is not None else 'trained'} weights, code and base config)")
        if ema is not None:
            print(f"raw weights:  {save_expert(raw, code, out / 'expert_raw')}")
        print(
            f"checkpoints:  {out / 'checkpoints'}\nlog, metrics: {out / 'log.txt'}, {out / 'metrics.jsonl'}\n"
            f"done: {result.step} steps; non-finite steps skipped: {result.nan_steps}; unreadable images met: "
            f"{result.unreadable}; load the expert with aptp.expert.load_expert({str(saved)!r})"
        )


if __name__ == "__main__":
    run(main)
