"""Learn which layers to drop (TinyFusion): N:M Gumbel-softmax gates trained jointly with a weight update
that estimates how well the pruned model will recover.

    torchrun --nproc_per_node=8 prune_by_learning.py --model DiT-XL-1-2 --load-weight DiT-XL-2-256x256.pt \
        --data-path features --epochs 1 --global-batch-size 128 --delta-w --lora --save-model pruned/D14.pt
    python prune_by_learning.py --model DiT-XL/2 --groups "[[2,4],[2,4],[3,4],[2,4],[3,4],[2,4],[2,4]]" ...

What is trained, as in the authors' script:

    (no flag)            the gate logits only, on the frozen model
    --lora               the gate logits only as well: --lora chooses the form of the update, --delta-w
                         turns it on (the script prints what it trains)
    --delta-w            the gates and every other parameter of the model (embedders, blocks, final
                         layer; not the fixed pos_embed)
    --delta-w --lora     the gates and LoRA adapters (rank 8, alpha 16, torchtune's layout) on every
                         Linear of the model: 6,001,920 adapter parameters for DiT-XL/2
                         (until this version ours took --lora alone to mean this and put adapters on the
                         blocks' Linears only: 5,935,104)

Gate logits train at 10x the weights' lr. ``--load-weight`` takes a dense DiT, or a pruning checkpoint of
ours or of the authors' code (their ``gumbel_gates.{g}`` and torchtune ``lora_a``/``lora_b`` keys; the
``ema`` entry of a training checkpoint), so a run started there continues or finishes here (the optimiser
state starts fresh). Writes the kept blocks' original weights (``--merge-weights``: with the learned update
folded in) as a plain state dict for the shallow model, ``<file>.json`` with the kept indices and groups,
and in the experiment folder ``decisions.json`` and ``decisions.png`` (the decision of every group over
training).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffcompress.checkpoint import load_dit_weights, load_state_dict, save_pruned, select_state_dict
from diffcompress.cli import ArgumentParser, positive_float, positive_int, run
from diffcompress.data import open_features
from diffcompress.distributed import DistInfo, cleanup, seed_everything, setup_distributed
from diffcompress.downloads import resolve_checkpoint
from diffcompress.errors import UserError
from diffcompress.trainer import add_training_args, diffusion_objective, experiment_dir, total_steps, train
from diffusion import create_diffusion
from models_with_layer_pruning import (
    DiT,
    DiT_models,
    add_lora,
    create_model,
    from_authors_state_dict,
    lora_layers,
    lora_parameters,
    plain_weights,
    pruned_state_dict,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(DiT_models), default="DiT-XL-1-2")
    p.add_argument("--groups", default=None, help="custom N:M groups, e.g. '[[2,4],[3,4]]' or '1:2' (tiles the depth)")
    p.add_argument("--load-weight", default=None, help="the dense model to prune (any checkpoint format)")
    p.add_argument("--data-path", required=True, help="extracted features (either layout of extract_features.py)")
    p.add_argument(
        "--image-size", type=positive_int, default=None, help="checked against the features (latents = size / 8)"
    )
    p.add_argument("--num-classes", type=positive_int, default=1000)
    p.add_argument("--vae", choices=["ema", "mse"], default="ema",
                   help="the VAE the features came from (recorded; the two share one encoder, so, as in the authors' "
                   "script, the choice does not change pruning)")  # fmt: skip
    p.add_argument("--delta-w", action="store_true",
                   help="also learn a weight update (recoverability estimate): every parameter but the gates, or "
                   "LoRA with --lora")  # fmt: skip
    p.add_argument(
        "--lora",
        action="store_true",
        help="the update of --delta-w is LoRA on every Linear; without --delta-w only the gates train",
    )
    p.add_argument("--lora-rank", type=positive_int, default=8)
    p.add_argument("--lora-alpha", type=positive_float, default=16)
    p.add_argument("--merge-weights", action="store_true", help="save kept blocks with the learned update folded in")
    p.add_argument("--tau-range", type=positive_float, nargs=2, default=[4.0, 0.1], metavar=("START", "END"))
    p.add_argument("--scaling-range", type=positive_float, nargs=2, default=[100.0, 100.0], metavar=("START", "END"))
    p.add_argument("--gate-lr-mult", type=positive_float, default=10.0, help="gate logits' lr relative to --lr")
    p.add_argument("--save-model", default=None, help="output path (default: <experiment folder>/pruned.pt)")
    add_training_args(p, lr=1e-4, lr_min=1e-4, ema_decay=0.999, global_batch_size=128, schedule="constant")
    p.set_defaults(prefix="prune")
    args = p.parse_args(argv)
    if args.tau_range[0] < args.tau_range[1]:  # the Gumbel temperature anneals down: soft gates first, hard last
        p.error(f"argument --tau-range: START {args.tau_range[0]:g} must be >= END {args.tau_range[1]:g}")
    return args


def update_kind(args: argparse.Namespace) -> str:
    """What the weight update is: 'lora' (--delta-w --lora), 'full' (--delta-w) or 'none'."""
    return ("lora" if args.lora else "full") if args.delta_w else "none"


def configure_trainable(model: DiT, args: argparse.Namespace) -> tuple[DiT, list[dict]]:
    """Freeze everything but the gates and the requested update (see the module docstring); return the
    model (with LoRA adapters on every Linear for --delta-w --lora) and the optimiser groups."""
    if not model.prunable:
        raise ValueError(f"--model {args.model} has no pruning groups: pick e.g. DiT-XL-1-2 or pass --groups")
    kind = update_kind(args)
    if kind == "lora" and not lora_layers(model):
        add_lora(model, args.lora_rank, args.lora_alpha)
    elif kind != "lora" and lora_layers(model):
        raise UserError("the model carries LoRA adapters (from --load-weight): pass --delta-w --lora to train them")
    model.requires_grad_(False)
    if kind == "lora":
        weights = lora_parameters(model)
    elif kind == "full":  # every parameter but the gates; pos_embed is a fixed sin-cos table
        weights = [p for n, p in model.named_parameters() if not n.startswith("gate_logits") and n != "pos_embed"]
    else:
        weights = []
    gates = list(model.gate_logits)
    for p in [*gates, *weights]:
        p.requires_grad_(True)
    groups = [{"params": gates, "lr": args.lr * args.gate_lr_mult, "name": "gates"}]
    if weights:
        groups.append({"params": weights, "lr": args.lr, "name": "lora" if kind == "lora" else "delta_w"})
    return model, groups


def describe_trainable(model: DiT, groups: list[dict], args: argparse.Namespace) -> str:
    """One line saying what the run trains, at which lr."""
    gates = groups[0]
    parts = [f"the gate logits ({len(gates['params'])} groups, {sum(p.numel() for p in gates['params'])} logits, "
             f"lr {gates['lr']:g})"]  # fmt: skip
    kind = update_kind(args)
    if kind == "lora":
        layers = lora_layers(model)
        n = sum(p.numel() for p in lora_parameters(model))
        layer = next(iter(layers.values()))
        parts.append(f"LoRA rank {layer.rank} alpha {layer.alpha:g} on all {len(layers)} Linear layers ({n:,} "
                     f"parameters, lr {groups[1]['lr']:g})")  # fmt: skip
    elif kind == "full":
        n = sum(p.numel() for p in groups[1]["params"])
        parts.append(f"every other parameter ({n:,}, lr {groups[1]['lr']:g})")
    text = "trains " + " and ".join(parts)
    if kind == "none":
        text += " only; the weights stay frozen"
        if args.lora:
            text += " (--lora without --delta-w, as in the authors' script: add --delta-w to learn the LoRA update)"
    return text


def load_start_weights(model: DiT, source, args: argparse.Namespace) -> None:
    """Load ``--load-weight`` into the prunable ``model``: a dense DiT (the gates keep their initial logits,
    adapters start at zero), or a pruning checkpoint of ours or of the authors' code (gates and LoRA
    adapters too; a training checkpoint's ``ema`` entry). Call after ``configure_trainable``."""
    name = f"--load-weight {source}" if not isinstance(source, dict) else "--load-weight"
    if isinstance(source, dict):
        state = select_state_dict(source, source=name)
    else:
        state = load_state_dict(source, flag="--load-weight")
    state = from_authors_state_dict(state)
    adapters = {k for k in state if ".lora_a." in k or ".lora_b." in k}
    layers = lora_layers(model)
    if adapters and not layers:
        trained = [k for k in adapters if ".lora_b." in k and state[k].abs().max() > 0]
        if trained:
            raise UserError(f"{name} holds trained LoRA adapters: pass --delta-w --lora to continue them")
        state = {k: v for k, v in state.items() if k not in adapters}  # all B = 0: the adapters change nothing
    for layer_name, layer in layers.items():
        a = state.get(f"{layer_name}.lora_a.weight")
        if a is not None and a.shape[0] != layer.rank:
            raise UserError(f"{name} has LoRA rank {a.shape[0]}: pass --lora-rank {a.shape[0]}")
    own = model.state_dict()  # adapters and gates the file lacks keep their fresh values
    fresh = {k: v for k, v in own.items() if k not in state and (k.startswith("gate_logits") or ".lora_" in k)}
    load_dit_weights(model, {**state, **fresh}, use_ema=True, name=name)


def plain_state_dict(model: DiT, merge: bool) -> dict[str, torch.Tensor]:
    """The model's weights under DiT's own keys: LoRA adapters merged in (``merge``) or dropped."""
    return plain_weights(model, merge)


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
    params_before = sum(v.numel() for k, v in plain_weights(model).items() if not k.startswith("gate_logits"))
    keep_original = update_kind(args) == "full" and not args.merge_weights
    original = {k: v.detach().clone() for k, v in model.state_dict().items()} if keep_original else None
    model, param_groups = configure_trainable(model, args)
    if info.is_main:
        print(f"prune_by_learning {describe_trainable(model, param_groups, args)}")
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
                    update=update_kind(args), merged=args.merge_weights, load_weight=args.load_weight,
                    vae=args.vae, confidence=summary["confidence"])  # fmt: skip
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
    args.load_weight = resolve_checkpoint(args.load_weight, "--load-weight")  # a released name or run prefix
    seed_everything(args.global_seed, info.rank, info.world_size)
    dataset = open_features(args.data_path, args.image_size, args.num_classes)
    channels, latent, _ = dataset.latent_shape
    model = create_model(
        args.model, groups=args.groups, input_size=latent, num_classes=args.num_classes, in_channels=channels
    )
    model, _ = configure_trainable(model, args)  # adds the adapters first, so a file's adapters load into them
    if args.load_weight:
        load_start_weights(model, args.load_weight, args)
    try:
        return learn_pruning(args, info, model, dataset)
    finally:
        cleanup()


if __name__ == "__main__":
    run(lambda: main(parse_args()))
