"""APTP's pruning stage: learn a prompt router over K architecture codes of a frozen Stable Diffusion UNet.

    accelerate launch -m aptp.prune --config configs/aptp/pruning/cc3m.yaml [section.key=value ...]
    python -m aptp.prune --config configs/aptp/pruning/tiny.yaml          # one process, e.g. on CPU

Prompt embeddings are computed once and cached (``aptp.data``). Each step the router maps the batch's embeddings
to soft gate masks: each prompt's own predicted ones for the first ``pretrain_steps`` steps, then the codes that
Sinkhorn assigns over the whole (multi-process) batch. The dense UNet (gates cleared, no grad) is
the teacher of the same UNet under those masks; block outputs come from forward hooks. Gradients reach only the
router: during pre-training every loss trains the predictor; afterwards the contrastive loss trains the predictor
and the others train the selected codes (``Router.forward`` carries the gradients that way).

Written to ``output_dir``: ``config.yaml``, ``log.txt``, ``metrics.jsonl``; ``checkpoints/checkpoint-<step>/``
(accelerate state, ``router.pt``, ``state.json`` with the step and the budgets p and p'); at the end ``router.pt``
and ``router.json`` (what rebuilds the router) and ``experts.json`` (each expert's binary code, MACs, parameters).
SIGTERM or SIGUSR1 writes a checkpoint and exits 0; ``logging.resume_from_checkpoint: latest`` continues.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

from diffcompress.checkpoint import save_checkpoint, write_json_atomic
from diffcompress.cli import ArgumentParser, run
from diffcompress.distributed import get_logger
from diffcompress.errors import UserError
from diffcompress.trainer import StepSampler

from .config import PruneConfig, load_config, to_dict
from .data import CaptionedImages, collate, embedding_cache_path, load_captions, prompt_embeddings, random_flip
from .expert import materialize
from .gated_unet import GatedUNet
from .layout import meta_unet
from .loop import load_training_state, read_state, run_steps
from .losses import block_loss, contrastive_loss, ddpm_loss, distill_loss, max_loss, resource_loss, std_loss
from .macs import MacTable, mac_table
from .router import Router, _hub_reachable, gather_keeping_grad

STATE = "state.json"
# what a checkpoint's state.json must hold to be resumed (aptp.loop.read_state checks the types)
RESUMED_TYPES = {"budget": (int, float), "target": (int, float), "num_experts": int, "layout_size": int}


SD_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def load_stable_diffusion(
    name: str,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    subfolders: tuple[str, ...] = SD_SUBFOLDERS,
) -> dict[str, Any]:
    """{unet, vae, text_encoder (frozen, eval, in ``dtype``), tokenizer, scheduler} of an SD folder or hub id, or
    only those of them named in ``subfolders``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    local = Path(name).expanduser()
    source = str(local) if local.is_dir() else name
    offline = not local.is_dir() and not _hub_reachable()  # fail at once instead of after the hub's retries
    parts = {}
    for sub, cls in [
        ("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel),
        ("tokenizer", CLIPTokenizer), ("scheduler", DDPMScheduler),
    ]:  # fmt: skip
        if sub not in subfolders:
            continue
        kwargs = dict(torch_dtype=dtype) if sub in ("unet", "vae", "text_encoder") else {}
        try:
            parts[sub] = cls.from_pretrained(
                source, subfolder=sub, revision=revision, local_files_only=offline, **kwargs
            )
        except (OSError, ValueError) as e:
            raise UserError(
                f"Stable Diffusion {name!r}: cannot load {sub}/ ({next(iter(str(e).splitlines()), '')}); expected a "
                f"diffusers folder with unet/ vae/ text_encoder/ tokenizer/ scheduler/, e.g. `hf download "
                f"stabilityai/stable-diffusion-2-1 --local-dir models/sd2.1` and pretrained_model_name_or_path: "
                f"models/sd2.1"
            ) from None
    for sub in {"unet", "vae", "text_encoder"} & parts.keys():
        parts[sub].requires_grad_(False).eval()
    return parts


def capture_block_outputs(unet: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    """Forward hooks keeping the latest output of each down block, the mid block and each up block (in order)."""
    outputs: dict[str, torch.Tensor | None] = {}
    names = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))] + ["mid_block"]
    names += [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
    for name in names:
        outputs[name] = None  # fixes the order of the dict

        def hook(module, args, out, name=name):
            outputs[name] = out[0] if isinstance(out, tuple) else out  # down blocks also return their skips

        unet.get_submodule(name).register_forward_hook(hook)
    return outputs


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (their folder is renamed into place last), oldest first."""
    found = [p for p in (output_dir / "checkpoints").glob("checkpoint-*") if (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resume_path(cfg: PruneConfig) -> Path | None:
    existing, wanted = checkpoints(Path(cfg.output_dir)), cfg.logging.resume_from_checkpoint
    if wanted is None:
        if existing:
            raise UserError(
                f"{cfg.output_dir} already holds {existing[-1].name}: set logging.resume_from_checkpoint=latest to "
                f"continue that run, or choose another output_dir"
            )
        return None
    if wanted == "latest":
        latest = [existing[-1] if existing else None]
        if torch.distributed.is_initialized():  # rank 0's pick for all: a node's stale view must not split the run
            torch.distributed.broadcast_object_list(latest, src=0)
        return latest[0]
    if not (Path(wanted) / STATE).is_file():
        raise UserError(f"logging.resume_from_checkpoint {wanted!r} is not a checkpoint folder (no {STATE})")
    return Path(wanted)


def check_resume(state: dict[str, Any], cfg: PruneConfig, layout_size: int, where: Path) -> None:
    """A checkpoint continues only the run it came from: same experts, layout and budget."""
    if not 0 < state["target"] <= 1:
        raise UserError(f"{where / STATE}: target is {state['target']}, expected a MAC share in (0, 1]")
    for key, ours in (
        ("num_experts", cfg.model.num_experts),
        ("layout_size", layout_size),
        ("budget", cfg.model.budget),
    ):
        if state[key] != ours:
            raise UserError(
                f"{where} was trained with {key} {state[key]}, the config gives {ours}: use a new output_dir"
            )


def save_state(
    accelerator: Accelerator, router: torch.nn.Module, folder: Path, state: dict, keep: int | None,
    weights: str = "router.pt",
) -> None:  # fmt: skip
    """accelerate state + the module's weights (``weights``: router.pt) + state.json, written to a temporary folder
    renamed into place when complete."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    if accelerator.is_main_process:  # left by saves killed mid-way, of this step or of any other
        for stale in folder.parent.glob(".checkpoint-*.tmp"):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every process writes its RNG state there
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(accelerator.unwrap_model(router).state_dict(), tmp / weights)
        write_json_atomic(tmp / STATE, state)
        os.replace(tmp, folder)
        if keep:
            for old in checkpoints(folder.parent.parent)[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def describe_experts(codes: torch.Tensor, table: MacTable, unet_config: dict[str, Any]) -> dict[str, Any]:
    """Each expert's binary code, MACs and parameter count (its UNet sliced on the meta device)."""
    dense = meta_unet(unet_config)
    dense_params = sum(p.numel() for p in dense.parameters())
    experts = []
    for k, code in enumerate(codes.cpu()):
        macs = int(table.macs(code).item())
        params = sum(p.numel() for p in materialize(dense, code, table.layout).parameters())
        experts.append(dict(
            expert=k, macs=macs, macs_ratio=macs / table.total, params=params, params_ratio=params / dense_params,
            code=code.int().tolist(),
        ))  # fmt: skip
    return dict(dense=dict(macs=table.total, params=dense_params), experts=experts)


def write_results(
    out: Path, router: Router, table: MacTable, unet_config: dict[str, Any], info: dict,
    embeddings: torch.Tensor | np.ndarray,
    seed: int = 0,
) -> None:  # fmt: skip
    """The experts' codes (``router.expert_threshold``; a sampled code from ``seed``) and the routing calibration
    over the training prompts' ``embeddings``; router.pt, router.json and experts.json; print the experts' sizes
    and where everything is."""
    if not isinstance(embeddings, torch.Tensor):  # the memory-mapped cache
        embeddings = torch.from_numpy(np.array(embeddings, dtype=np.float32))
    embeddings = embeddings.to(router.codebook.device)
    router.fixed_codes = None  # the codes of the codebook as it is now
    router.fixed_codes = router.expert_codes(torch.Generator(router.codebook.device).manual_seed(seed))
    log_v = router.calibrate(embeddings)
    routed = torch.bincount(router.route(embeddings, "calibrated").cpu(), minlength=router.num_experts)
    plain = torch.bincount(router.route(embeddings, "cosine").cpu(), minlength=router.num_experts)
    save_checkpoint(router.state_dict(), out / "router.pt")
    info = dict(
        info, depth_order=list(router.order), assignment=router.assignment, expert_threshold=router.expert_threshold,
        routing=dict(rule="calibrated", temperature=router.sinkhorn_temperature, log_v=log_v.tolist(),
                     prompts=len(embeddings), train_counts=routed.tolist(), cosine_counts=plain.tolist()),
    )  # fmt: skip
    write_json_atomic(out / "router.json", info)
    experts = describe_experts(router.fixed_codes, table, unet_config)
    write_json_atomic(out / "experts.json", dict(budget=info["budget"], target=info["target"], **experts))
    rows = [(f"{e['expert']}", e) for e in experts["experts"]]
    rows.append(("dense", dict(experts["dense"], macs_ratio=1.0, params_ratio=1.0)))
    print(f"{'expert':>6} {'GMACs':>9} {'of dense':>8} {'params (M)':>10} {'of dense':>8} {'train prompts':>13}")
    for (name, e), n in zip(rows, [*routed.tolist(), len(embeddings)]):
        macs, params = e["macs"] / 1e9, e["params"] / 1e6
        print(f"{name:>6} {macs:>9.4f} {e['macs_ratio']:>8.1%} {params:>10.3f} {e['params_ratio']:>8.1%} {n:>13}")
    print(
        f"routing: calibrated over {len(embeddings)} training prompts, per expert {routed.tolist()} "
        f"(plain cosine: {plain.tolist()})\n"
        f"router:       {out / 'router.pt'} (rebuilt from {out / 'router.json'})\n"
        f"expert codes: {out / 'experts.json'} (binary codes, MACs, parameters)\n"
        f"checkpoints:  {out / 'checkpoints'}\n"
        f"log, metrics: {out / 'log.txt'}, {out / 'metrics.jsonl'}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description="APTP pruning: train the prompt router of a frozen SD UNet")
    parser.add_argument("--config", required=True, help="YAML file (configs/aptp/pruning/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.max_train_steps=100")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    t, out = cfg.training, Path(cfg.output_dir)
    if cfg.logging.report_to != "none" and importlib.util.find_spec(cfg.logging.report_to) is None:
        raise UserError(f"logging.report_to {cfg.logging.report_to} needs `pip install {cfg.logging.report_to}`")

    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # so that multi-process launches without CUDA run on gloo
        gradient_accumulation_steps=t.gradient_accumulation_steps, mixed_precision=t.mixed_precision,
        log_with=None if cfg.logging.report_to == "none" else cfg.logging.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        # the codebook gets no gradient while the predictor is pre-trained
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )  # fmt: skip
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    logger = get_logger("aptp.prune", out if accelerator.is_main_process else None, rank)
    set_seed(cfg.seed, device_specific=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = t.allow_tf32
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[t.mixed_precision]

    resume = resume_path(cfg)

    # Frozen Stable Diffusion; the UNet is gated in place: with its gates cleared it is the dense teacher.
    sd = load_stable_diffusion(cfg.pretrained_model_name_or_path, cfg.revision, weight_dtype)
    unet, vae, text_encoder, tokenizer, scheduler = sd.values()
    for model in (unet, vae, text_encoder):
        model.to(device)
    if t.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    gated = GatedUNet(unet)
    blocks = capture_block_outputs(unet)
    latent_hw = t.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    table = mac_table(unet.config, latent_hw, tokenizer.model_max_length, gated.layout)

    state = read_state(resume, STATE, RESUMED_TYPES) if resume else {}
    if resume:
        check_resume(state, cfg, gated.layout.size, resume)
    budget, target = cfg.model.budget, state.get("target") or table.budget(cfg.model.budget)

    data = load_captions(
        cfg.data.dataset_name, cfg.data.data_dir, "train", cfg.data.max_train_samples, cfg.data.on_empty
    )
    cache_dir = cfg.data.embedding_cache_dir or out / "prompt_embeddings"
    cache = embedding_cache_path(cache_dir, cfg.model.prompt_encoder, data.captions)
    how = "read from" if cache.is_file() else f"computed over {world} process(es) into"
    embeddings = prompt_embeddings(data.captions, cfg.model.prompt_encoder, cache_dir, device)
    logger.info(f"prompt embeddings of {len(data)} captions {how} {cache}")
    dataset = CaptionedImages(data, t.resolution, tokenizer, embeddings)
    sampler = StepSampler(len(dataset), t.train_batch_size * world, rank, world, cfg.seed)
    if sampler.steps_per_epoch == 0:
        raise UserError(f"{data.source}: {len(data)} captions with images, fewer than one batch of all processes")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=t.train_batch_size, sampler=sampler, num_workers=cfg.data.dataloader_num_workers,
        collate_fn=collate, pin_memory=device.type == "cuda", drop_last=True,
    )  # fmt: skip

    m = cfg.model
    router = Router(
        gated.layout, embeddings.shape[1], m.num_experts, optimal_transport=m.optimal_transport,
        assignment=m.assignment, expert_threshold=m.expert_threshold,
    )  # fmt: skip
    global_batch = t.train_batch_size * world * t.gradient_accumulation_steps
    lr = t.learning_rate * math.sqrt(global_batch) if t.scale_lr else t.learning_rate
    optimizer = torch.optim.AdamW(
        router.parameters(), lr=lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.adam_weight_decay,
        eps=t.adam_epsilon,
    )  # fmt: skip
    router, optimizer = accelerator.prepare(router, optimizer)
    step = 0
    if resume:
        load_training_state(accelerator, resume, logger)  # each file it reads, named when it is broken
        step = state["step"]
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        flat = {f"{s}.{k}": v for s, sec in to_dict(cfg).items() if isinstance(sec, dict) for k, v in sec.items()}
        accelerator.init_trackers(cfg.logging.tracker_project_name, {k: v for k, v in flat.items() if v is not None})
    logger.info(
        f"{data.source}: {len(data)} captions with images ({data.missing} without an image skipped); "
        f"{world} process(es) x {t.train_batch_size} x {t.gradient_accumulation_steps} accumulation = global batch "
        f"{global_batch}, lr {lr:.3g}"
    )
    logger.info(
        f"UNet {table.total / 1e9:.3f} GMACs at {t.resolution}px ({table.prunable / table.total:.1%} prunable); "
        f"budget p={budget} -> prunable target p'={target:.4f}; {cfg.model.num_experts} experts over "
        f"{gated.layout.size} gates" + (f"; resumed from {resume} at step {step}" if resume else "")
    )

    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    prediction_type = scheduler.config.prediction_type

    def losses(batch: dict[str, Any], pretrain: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        emb = batch["prompt_embeds"].to(device)
        with torch.no_grad():
            pixels = batch["pixel_values"].to(device, weight_dtype)
            latents = vae.encode(random_flip(pixels) if t.random_flip else pixels).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
            text = text_encoder(batch["input_ids"].to(device))[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target_v = scheduler.get_velocity(latents, noise, timesteps) if prediction_type == "v_prediction" else noise
        routing = router(emb, pretrain=pretrain)  # float32: the gates are compared and binarised
        with accelerator.autocast():
            gated.clear()  # the teacher first: gradient checkpointing re-runs the student under its gates
            with torch.no_grad():
                teacher = unet(noisy, timesteps, text).sample
            teacher_blocks = dict(blocks)
            gated.set_code(routing.mask)
            student = unet(noisy, timesteps, text).sample
            rho = table.rho(routing.mask)
            terms = dict(
                ddpm=ddpm_loss(student, target_v, timesteps, alphas_cumprod, t.snr_gamma, prediction_type),
                distill=distill_loss(student, teacher),
                block=block_loss([blocks[k] for k in teacher_blocks], list(teacher_blocks.values())),
                resource=resource_loss(rho, target),
                contrastive=contrastive_loss(  # over every process's prompts, as the authors
                    gather_keeping_grad(routing.arch), gather_keeping_grad(emb), t.contrastive_temperature
                ),
                std=std_loss(rho),
                max=max_loss(rho),
            )  # fmt: skip
        return terms, rho

    def micro_step(batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        terms, rho = losses(batch, pretrain=step < t.pretrain_steps)
        return {**terms, "loss": cfg.losses.total(terms), "rho": rho.mean()}

    def checkpoint(step: int) -> None:
        folder = out / "checkpoints" / f"checkpoint-{step}"
        meta = dict(
            step=step, budget=budget, target=target, num_experts=cfg.model.num_experts,
            layout_size=gated.layout.size, prompt_dim=int(embeddings.shape[1]), world_size=world,
            train_batch_size=t.train_batch_size, gradient_accumulation_steps=t.gradient_accumulation_steps,
        )  # fmt: skip
        save_state(accelerator, router, folder, meta, cfg.logging.checkpoints_total_limit)
        logger.info(f"saved {folder}")

    result = run_steps(
        accelerator, router, optimizer, loader, sampler, step=step, seed=cfg.seed, lr=lr, training=t,
        logging=cfg.logging, out=out, logger=logger, desc="prune", loss_fn=micro_step, checkpoint=checkpoint,
        phase=lambda step: "pretrain" if step < t.pretrain_steps else "routed", postfix={"loss": ".4g", "rho": ".3f"},
    )  # fmt: skip
    if result.preempted:
        return
    if accelerator.is_main_process:
        info = dict(
            pretrained_model_name_or_path=cfg.pretrained_model_name_or_path, prompt_encoder=cfg.model.prompt_encoder,
            prompt_dim=int(embeddings.shape[1]), num_experts=cfg.model.num_experts, layout_size=gated.layout.size,
            resolution=t.resolution, budget=budget, target=target, steps=result.step,
            optimal_transport=cfg.model.optimal_transport,
        )  # fmt: skip
        write_results(
            out, accelerator.unwrap_model(router).eval(), table, dict(unet.config), info, embeddings, cfg.seed
        )
        print(
            f"done: {result.step} steps; non-finite steps skipped: {result.nan_steps}; unreadable images met: "
            f"{result.unreadable}"
        )


if __name__ == "__main__":
    run(main)
