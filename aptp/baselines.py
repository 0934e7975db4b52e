"""APTP's single-architecture baselines at the MAC budget of the router: magnitude, random and dense.

    python -m aptp.baselines --method magnitude --pretrained_model_name_or_path models/sd2.1 \\
        --output_dir results/aptp/baselines/magnitude-cc3m --budget 0.6 --resolution 256 \\
        --dataset_name cc3m --data_dir data/cc3m --prompt_encoder encoders/all-mpnet-base-v2
    python -m aptp.baselines --method random --seed 43 ...   # same flags, output_dir .../random-cc3m
    python -m aptp.baselines --method dense ...              # the dense UNet, fine-tuned as a baseline

Each run writes a pruning directory with one expert, read by the later stages exactly as the output of
``aptp.prune`` (see ``aptp.assignments``): ``router.pt`` + ``router.json`` (a 1-expert router: every prompt goes
to expert 0), ``experts.json`` (the code, its MACs and parameters) and ``config.yaml`` (the pruning config schema,
``aptp.config.PruneConfig``, with the dataset given here). The prompt encoder is recorded only because the stages
after pruning embed prompts before routing them; with one expert any encoder routes every prompt to 0.

- magnitude: every width unit (a GroupNorm group of a ResNet's conv1 output, an attention head, a group of GEGLU
  inner channels) is scored by the L2 norm of all the weights that removing it removes (the entries
  ``aptp.expert.materialize`` slices away: rows, columns, biases and norm scales), divided by the mean score of
  its sub-gate so that layers of different sizes compare. Units are removed globally from the lowest score up
  until the UNet's MACs (``aptp.macs.MacTable``) are at or below ``budget`` x dense; the last unit of a sub-gate
  is never removed and every block is kept (depth gates stay 1).
- random: the same greedy removal in a random order drawn from ``--seed``.
- dense: the all-ones code.

The learned baselines (one architecture for all prompts; APTP without optimal transport) are ``aptp.prune`` runs
with the configs in ``configs/aptp/baselines/``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import yaml
from diffusers import UNet2DConditionModel

from diffcompress.checkpoint import save_checkpoint, write_json_atomic
from diffcompress.cli import ArgumentParser, non_negative_int, positive_float, positive_int, run
from diffcompress.errors import UserError

from .assignments import EXPERTS, ROUTER_INFO, ROUTER_WEIGHTS
from .config import DataConfig, ModelConfig, PruneConfig, TrainingConfig, to_dict
from .layout import ArchLayout
from .macs import MacTable, mac_table
from .prune import describe_experts, load_stable_diffusion
from .router import DEFAULT_ENCODER, OFFSET, PromptEncoder, Router

METHODS = ("magnitude", "random", "dense")


def _sq(t: torch.Tensor | None, dim: int) -> torch.Tensor | float:
    """Sum of squares of ``t`` per index along ``dim`` (0 for a missing bias)."""
    if t is None:
        return 0.0
    t = t.detach().double()
    return t.pow(2).movedim(dim, 0).reshape(t.shape[dim], -1).sum(1)


def _channel_sq(module: torch.nn.Module, kind: str) -> torch.Tensor:
    """Per output channel of the sub-gate (ResNet conv1 channels, q/k/v rows, GEGLU inner channels): the sum of
    squares of every weight that slicing the channel away removes."""
    if kind == "resnet":
        temb = module.time_emb_proj
        return (
            _sq(module.conv1.weight, 0) + _sq(module.conv1.bias, 0)
            + (_sq(temb.weight, 0) + _sq(temb.bias, 0) if temb is not None else 0.0)
            + _sq(module.norm2.weight, 0) + _sq(module.norm2.bias, 0) + _sq(module.conv2.weight, 1)
        )  # fmt: skip
    if kind in ("attn1", "attn2"):
        rows = sum(_sq(lin.weight, 0) + _sq(lin.bias, 0) for lin in (module.to_q, module.to_k, module.to_v))
        return rows + _sq(module.to_out[0].weight, 1)
    if kind == "ff":
        proj, out = module.net[0].proj, module.net[2]
        both = _sq(proj.weight, 0) + _sq(proj.bias, 0)  # [value half; gate half]
        return both.view(2, out.in_features).sum(0) + _sq(out.weight, 1)
    raise ValueError(f"unknown sub-gate kind {kind!r}")


def magnitude_scores(unet: UNet2DConditionModel, layout: ArchLayout) -> torch.Tensor:
    """Score per width entry [layout.width_size] (float64): the L2 norm of the unit's weights / its sub-gate's mean."""
    scores = torch.empty(layout.width_size, dtype=torch.float64)
    for sg in layout.subgates:
        norms = _channel_sq(unet.get_submodule(sg.name), sg.kind).view(sg.size, -1).sum(1).sqrt()
        scores[sg.start : sg.stop] = norms / norms.mean().clamp_min(torch.finfo(torch.float64).tiny)
    return scores


def random_scores(layout: ArchLayout, seed: int) -> torch.Tensor:
    """Random scores per width entry: sorting them gives a uniformly random removal order for ``seed``."""
    return torch.rand(layout.width_size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def greedy_removal(scores: torch.Tensor, table: MacTable, budget: float) -> tuple[torch.Tensor, list[int]]:
    """Remove width units from the lowest score up (ties by index) until ``table.macs(code) <= budget * total``.

    The last unit of a sub-gate is skipped; depth entries stay 1. Returns the binary code (int64 [layout.size])
    and the removed entries in removal order.
    """
    layout = table.layout
    owner = torch.empty(layout.width_size, dtype=torch.long)
    for s, sg in enumerate(layout.subgates):
        owner[sg.start : sg.stop] = s
    left = [sg.size for sg in layout.subgates]
    code = torch.ones(layout.size, dtype=torch.int64)
    limit = budget * table.total
    macs, removed = table.macs(code).item(), []
    for i in torch.argsort(scores, stable=True).tolist():
        if macs <= limit:
            break
        if left[owner[i]] == 1:
            continue
        code[i], left[owner[i]] = 0, left[owner[i]] - 1
        removed.append(i)
        macs = table.macs(code).item()
    if macs > limit:
        raise UserError(
            f"--budget {budget}: removing all but one unit of every layer keeps {macs / table.total:.3f} of the "
            f"MACs; a smaller budget needs depth pruning (aptp.prune)"
        )
    return code, removed


def baseline_code(
    method: str, unet: UNet2DConditionModel, table: MacTable, budget: float, seed: int = 0
) -> torch.Tensor:
    """The binary architecture code (int64 [layout.size]) of a baseline ``method``."""
    if method == "dense":
        return torch.ones(table.layout.size, dtype=torch.int64)
    if method == "magnitude":
        scores = magnitude_scores(unet, table.layout)
    elif method == "random":
        scores = random_scores(table.layout, seed)
    else:
        raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    return greedy_removal(scores, table, budget)[0]


def code_logits(code: torch.Tensor, layout: ArchLayout) -> torch.Tensor:
    """Architecture logits whose noiseless gates binarise to ``code`` (every depth entry must be 1).

    Width: 0 for a kept unit (gate sigmoid(offset / T) ~ 1), -2 offset for a removed one (~ 0). Depth: log(D) on
    the first logit and 0 elsewhere puts over half the prior's mass first, so every ordered value exceeds 1/2 and
    every block is kept.
    """
    code = torch.as_tensor(code).flatten()
    W, D = layout.width_size, layout.depth_size
    if code.numel() != layout.size or not bool((code[W:] == 1).all()):
        raise ValueError(f"expected a code of {layout.size} entries that keeps every block")
    depth = torch.zeros(D)
    if D:
        depth[0] = math.log(D)
    return torch.cat([(code[:W].float() - 1) * 2 * OFFSET, depth])


def single_expert_router(code: torch.Tensor, layout: ArchLayout, prompt_dim: int) -> Router:
    """A 1-expert router whose expert is ``code``: its codebook, and the predictor's output for every prompt."""
    router = Router(layout, prompt_dim, num_experts=1)
    logits = code_logits(code, layout)
    with torch.no_grad():
        router.codebook.copy_(logits[None])
        router.predictor.weight.zero_()
        router.predictor.bias.copy_(logits)
    if not torch.equal(router.expert_mask(0).long(), torch.as_tensor(code).long()):
        raise ValueError("the code does not survive binarisation (a sub-gate keeps nothing)")
    return router.eval()


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description="APTP baselines: one architecture for all prompts at a MAC budget")
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="SD folder (unet/ vae/ ...) or hub id")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--output_dir", required=True, help="the pruning directory to write")
    parser.add_argument(
        "--budget", type=positive_float, default=0.6, help="keep this fraction of the UNet's MACs (not dense)"
    )
    parser.add_argument("--resolution", type=positive_int, default=256, help="image size the MACs are counted at")
    parser.add_argument(
        "--seed", type=non_negative_int, default=PruneConfig.seed, help="removal order of --method random"
    )
    parser.add_argument("--prompt_encoder", default=DEFAULT_ENCODER, help="sentence encoder the pipeline embeds with")
    parser.add_argument("--dataset_name", default="cc3m", choices=("cc3m", "coco"), help="written to config.yaml")
    parser.add_argument("--data_dir", default=None, help="written to config.yaml (default data/<dataset_name>)")
    args = parser.parse_args(argv)
    if not 0 < args.budget <= 1:
        raise UserError(f"--budget must be in (0, 1], got {args.budget}")
    if args.resolution <= 0 or args.resolution % 8:
        raise UserError(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    budget = 1.0 if args.method == "dense" else args.budget
    out = Path(args.output_dir)

    encoder = PromptEncoder(args.prompt_encoder)  # first: a missing encoder fails before the UNet loads
    parts = ("unet", "vae", "tokenizer")  # the vae and the tokenizer give the latent size and the text length
    sd = load_stable_diffusion(args.pretrained_model_name_or_path, args.revision, subfolders=parts)
    unet = sd["unet"]
    layout = ArchLayout.from_unet(unet)
    latent_hw = args.resolution // 2 ** (len(sd["vae"].config.block_out_channels) - 1)
    table = mac_table(unet.config, latent_hw, sd["tokenizer"].model_max_length, layout)
    code = baseline_code(args.method, unet, table, budget, args.seed)
    router = single_expert_router(code, layout, encoder.dim)

    cfg = PruneConfig(
        pretrained_model_name_or_path=args.pretrained_model_name_or_path, revision=args.revision,
        output_dir=str(out), seed=args.seed,
        data=DataConfig(dataset_name=args.dataset_name, data_dir=args.data_dir or f"data/{args.dataset_name}"),
        model=ModelConfig(prompt_encoder=args.prompt_encoder, num_experts=1, budget=budget),
        training=TrainingConfig(resolution=args.resolution),
    ).validate()  # fmt: skip
    target = table.budget(budget)
    info = dict(
        method=args.method, pretrained_model_name_or_path=args.pretrained_model_name_or_path,
        prompt_encoder=args.prompt_encoder, prompt_dim=encoder.dim, num_experts=1, layout_size=layout.size,
        resolution=args.resolution, budget=budget, target=target, steps=0, seed=args.seed,
        depth_order=list(router.order),
    )  # fmt: skip
    experts = describe_experts(router.expert_codes(), table, dict(unet.config))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    save_checkpoint(router.state_dict(), out / ROUTER_WEIGHTS)
    write_json_atomic(out / ROUTER_INFO, info)
    write_json_atomic(out / EXPERTS, dict(method=args.method, budget=budget, target=target, **experts))

    e, dense = experts["experts"][0], experts["dense"]
    print(f"{'method':>10} {'GMACs':>9} {'of dense':>8} {'params (M)':>10} {'of dense':>8}")
    for name, macs, params in ((args.method, e["macs"], e["params"]), ("unpruned", dense["macs"], dense["params"])):
        print(f"{name:>10} {macs / 1e9:>9.4f} {macs / dense['macs']:>8.1%} {params / 1e6:>10.3f} "
              f"{params / dense['params']:>8.1%}")  # fmt: skip
    print(
        f"router:       {out / ROUTER_WEIGHTS} (rebuilt from {out / ROUTER_INFO}; 1 expert)\n"
        f"expert code:  {out / EXPERTS} (binary code, MACs, parameters)\n"
        f"config:       {out / 'config.yaml'}\n"
        f"next:         python -m aptp.filter_dataset --pruning_dir {out} ..."
    )


if __name__ == "__main__":
    run(main)
