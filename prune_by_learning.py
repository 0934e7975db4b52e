"""Learn which layers to drop (TinyFusion): N:M Gumbel-softmax gates trained jointly with a weight update
that estimates how well the pruned model will recover.

    torchrun --nproc_per_node=8 prune_by_learning.py --model DiT-XL-1-2 --load-weight DiT-XL-2-256x256.pt \
        --data-path features --epochs 1 --global-batch-size 128 --delta-w --lora --save-model pruned/D14.pt
    python prune_by_learning.py --model DiT-XL/2 --groups "[[2,4],[2,4],[3,4],[2,4],[3,4],[2,4],[2,4]]" ...

Writes the kept blocks' original weights (``--merge-weights``: with the learned update folded in) as a
plain state dict for the shallow model, ``<file>.json`` with the kept indices and groups, and in the
experiment folder ``decisions.json`` and ``decisions.png`` (the decision of every group over training).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from diffcompress.checkpoint import load_dit_weights, save_pruned
from diffcompress.cli import run
from diffcompress.data import open_features
from diffcompress.distributed import DistInfo, cleanup, seed_everything, setup_distributed
from diffcompress.trainer import add_training_args, diffusion_objective, experiment_dir, total_steps, train
from diffusion import create_diffusion
from models_with_layer_pruning import DiT, DiT_models, create_model, pruned_state_dict

# Every Linear inside the transformer blocks: the update estimates the recoverability of the blocks.
LORA_TARGETS = r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2|adaLN_modulation\.1)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(DiT_models), default="DiT-XL-1-2")
    p.add_argument("--groups", default=None, help="custom N:M groups, e.g. '[[2,4],[3,4]]' or '1:2' (tiles the depth)")
    p.add_argument("--load-weight", default=None, help="the dense model to prune (any checkpoint format)")
    p.add_argument("--data-path", required=True, help="extracted features (either layout of extract_features.py)")
    p.add_argument("--image-size", type=int, default=None, help="checked against the features (latents = size / 8)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--delta-w", action="store_true", help="also learn a weight update (recoverability estimate)")
    p.add_argument("--lora", action="store_true", help="learn the update as LoRA (implies --delta-w)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--merge-weights", action="store_true", help="save kept blocks with the learned update folded in")
    p.add_argument("--tau-range", type=float, nargs=2, default=[4.0, 0.1], metavar=("START", "END"))
    p.add_argument("--scaling-range", type=float, nargs=2, default=[100.0, 100.0], metavar=("START", "END"))
    p.add_argument("--gate-lr-mult", type=float, default=10.0, help="gate logits' lr relative to --lr")
    p.add_argument("--save-model", default=None, help="output path (default: <experiment folder>/pruned.pt)")
    add_training_args(p, lr=1e-4, lr_min=1e-4, ema_decay=0.999, global_batch_size=128, schedule="constant")
    p.set_defaults(prefix="prune")
    args = p.parse_args(argv)
    args.delta_w = args.delta_w or args.lora
    return args


def configure_trainable(model: DiT, args: argparse.Namespace) -> tuple[DiT, list[dict]]:
    """Freeze everything but the gates and the requested update; return the model and optimiser groups."""
    if not model.prunable:
        raise ValueError(f"--model {args.model} has no pruning groups: pick e.g. DiT-XL-1-2 or pass --groups")
    model.requires_grad_(False)
    if args.lora:
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, target_modules=LORA_TARGETS)
        model = inject_adapter_in_model(config, model)
        model.requires_grad_(False)
        weights = [p for n, p in model.named_parameters() if "lora_" in n]
    elif args.delta_w:
        weights = [p for n, p in model.named_parameters() if n.startswith("blocks.")]
    else:
        weights = []
    gates = list(model.gate_logits)
    for p in [*gates, *weights]:
        p.requires_grad_(True)
    groups = [{"params": gates, "lr": args.lr * args.gate_lr_mult, "name": "gates"}]
    if weights:
        groups.append({"params": weights, "lr": args.lr, "name": "lora" if args.lora else "delta_w"})
    return model, groups


def plain_state_dict(model: DiT, merge: bool) -> dict[str, torch.Tensor]:
    """The model's weights under DiT's own keys: LoRA adapters merged in (``merge``) or dropped."""
    from peft.tuners.lora import LoraLayer

    if merge and any(isinstance(m, LoraLayer) for m in model.modules()):
        model = copy.deepcopy(model)
        for m in model.modules():
            if isinstance(m, LoraLayer):
                m.merge()
    return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}


def lerp(pair: list[float], progress: float) -> float:
    return pair[0] + (pair[1] - pair[0]) * progress


def pruning_objective(args: argparse.Namespace, max_steps: int):
    """The diffusion loss of the Gumbel-sampled sub-network; tau and scaling follow their linear schedules."""
    loss = diffusion_objective(create_diffusion(""))

    def objective(model, x, y, step):
        net = model.module if hasattr(model, "module") else model
        progress = step / max(1, max_steps - 1)
        net.set_gumbel(lerp(args.tau_range, progress), lerp(args.scaling_range, progress))
        return loss(model, x, y, step)

    return objective


def learn_pruning(args: argparse.Namespace, info: DistInfo, model: DiT, dataset) -> dict:
    """Train the gates (and update) of a prunable ``model``; save the shallow model; return the summary."""
    source_depth, groups = model.depth, model.groups
    params_before = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("gate_logits"))
    keep_original = args.delta_w and not args.lora and not args.merge_weights
    original = {k: v.detach().clone() for k, v in model.state_dict().items()} if keep_original else None
    model, param_groups = configure_trainable(model, args)
    max_steps = total_steps(args, len(dataset))
    history: list[dict] = []

    def on_log(step, record, model, ema):
        ema.set_gumbel(model.tau, model.scaling)  # confidences use the current scaling
        entry = dict(step=step, kept=ema.kept_indices(), decisions=ema.decisions(), confidence=ema.confidences(),
                     loss=record.get("loss"), tau=model.tau)  # fmt: skip
        history.append(entry)
        if info.is_main:
            groups_text = " ".join(f"{d}:{c:.2f}" for d, c in zip(entry["decisions"], entry["confidence"]))
            print(f"(step={step:07d}) tau={model.tau:.3f} kept={entry['kept']} decisions/confidence {groups_text}")

    result = train(
        args, info, model, pruning_objective(args, max_steps), dataset, param_groups, on_log=on_log,
        extra_state=lambda: {"decision_history": history},
        restore_extra=lambda state: history.extend(state.get("decision_history", [])),
    )  # fmt: skip
    ema = result.ema
    kept = ema.kept_indices()
    if original is None:  # LoRA base weights are the originals; merging uses the EMA adapters
        original = plain_state_dict(ema if args.merge_weights else model, args.merge_weights)
    shallow = pruned_state_dict(original, kept)
    params_after = sum(v.numel() for k, v in shallow.items() if k != "pos_embed") + shallow["pos_embed"].numel()
    out = Path(args.save_model) if args.save_model else experiment_dir(args) / "pruned.pt"
    summary = dict(kept_indices=kept, decisions=ema.decisions(), confidence=ema.confidences(), groups=groups,
                   source_depth=source_depth, params_before=params_before, params_after=params_after,
                   preempted=result.preempted, output=str(out))  # fmt: skip
    if info.is_main and not result.preempted:
        save_pruned(shallow, out, kept, source_model=args.model, groups=groups, method="learned",
                    update="lora" if args.lora else "full" if args.delta_w else "none", merged=args.merge_weights,
                    load_weight=args.load_weight, confidence=summary["confidence"])  # fmt: skip
        exp = experiment_dir(args)
        (exp / "decisions.json").write_text(json.dumps({"groups": groups, "history": history}, indent=1) + "\n")
        plot_decisions(history, source_depth, exp / "decisions.png")
        print(
            f"kept {len(kept)}/{source_depth} layers {kept}; params {params_before / 1e6:.2f}M -> "
            f"{params_after / 1e6:.2f}M; wrote {out} (+ .json), {exp / 'decisions.json'}, {exp / 'decisions.png'}"
        )
    summary["history"] = history
    return summary


def plot_decisions(history: list[dict], depth: int, path: Path) -> None:
    """Kept (dark) / dropped layers at every log step, and each group's confidence, as a PNG."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    mask = torch.zeros(depth, len(history))
    for j, h in enumerate(history):
        mask[h["kept"], j] = 1
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[2, 1])
    top.imshow(mask.numpy(), aspect="auto", cmap="Greys", interpolation="nearest",
               extent=(steps[0] - 0.5, steps[-1] + 0.5, depth - 0.5, -0.5))  # fmt: skip
    top.set_ylabel("layer (dark = kept)")
    top.set_title("learned layer decisions (EMA gates)")
    conf = torch.tensor([h["confidence"] for h in history])
    for g in range(conf.shape[1]):
        bottom.plot(steps, conf[:, g].numpy(), lw=1)
    bottom.set_ylabel("confidence per group")
    bottom.set_xlabel("step")
    bottom.set_ylim(0, 1.02)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> dict:
    info = setup_distributed(args.device)
    seed_everything(args.global_seed, info.rank, info.world_size)
    dataset = open_features(args.data_path, args.image_size, args.num_classes)
    channels, latent, _ = dataset.latent_shape
    model = create_model(
        args.model, groups=args.groups, input_size=latent, num_classes=args.num_classes, in_channels=channels
    )
    if args.load_weight:
        load_dit_weights(model, args.load_weight)
    try:
        return learn_pruning(args, info, model, dataset)
    finally:
        cleanup()


if __name__ == "__main__":
    run(lambda: main(parse_args()))
