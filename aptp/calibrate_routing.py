"""Calibrate an APTP router's inference routing once: the per-expert log-scalings log v_k of the transport that
balances the training captions over the K expert codes (``aptp.router.calibrate``), written into ``router.json``.

    python -m aptp.calibrate_routing --pruning_dir results/aptp/pruning/cc3m

``aptp.prune`` does this at its end; a pruning directory written before it existed needs this command once (until
then filtering and ``APTPPipeline`` refuse to route it the calibrated way rather than silently route by cosine).
The captions are the pruning run's (its ``config.yaml``), their embeddings read from its cache when there.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffcompress.checkpoint import write_json_atomic
from diffcompress.cli import ArgumentParser, positive_int, run
from diffcompress.distributed import resolve_device

from .assignments import ROUTER_INFO, load_router, pruning_config, read_router_info
from .config import load_config
from .data import load_captions, prompt_embeddings
from .filter_dataset import load_unet_config
from .layout import ArchLayout


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description="APTP: calibrate a router's balanced inference routing")
    parser.add_argument("--pruning_dir", required=True, help="output_dir of a finished aptp.prune run")
    parser.add_argument("--data_dir", default=None, help="the dataset folder, if not the pruning run's")
    parser.add_argument("--batch_size", type=positive_int, default=256, help="captions per prompt-encoder batch")
    parser.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    args = parser.parse_args(argv)
    pruning_dir = Path(args.pruning_dir)
    info = read_router_info(pruning_dir)
    cfg = load_config(pruning_config(pruning_dir))
    device = resolve_device(args.device)
    layout = ArchLayout.from_config(load_unet_config(info["pretrained_model_name_or_path"], cfg.revision))
    router = load_router(pruning_dir, layout, device, routing="cosine")
    table = load_captions(
        cfg.data.dataset_name, args.data_dir or cfg.data.data_dir, "train", cfg.data.max_train_samples
    )
    cache_dir = cfg.data.embedding_cache_dir or pruning_dir / "prompt_embeddings"
    embeddings = torch.from_numpy(
        prompt_embeddings(table.captions, info["prompt_encoder"], cache_dir, device, args.batch_size).copy()
    ).to(device)
    log_v = router.calibrate(embeddings)
    counts = torch.bincount(router.route(embeddings, "calibrated").cpu(), minlength=router.num_experts).tolist()
    plain = torch.bincount(router.route(embeddings, "cosine").cpu(), minlength=router.num_experts).tolist()
    info["routing"] = dict(
        rule="calibrated", temperature=router.sinkhorn_temperature, log_v=log_v.tolist(), prompts=len(embeddings),
        train_counts=counts, cosine_counts=plain,
    )  # fmt: skip
    write_json_atomic(pruning_dir / ROUTER_INFO, info)
    print(
        f"calibrated over {len(embeddings)} training captions ({table.source}): per expert {counts} "
        f"(plain cosine: {plain}); wrote routing.log_v into {pruning_dir / ROUTER_INFO}\n"
        f"next: python -m aptp.filter_dataset --pruning_dir {pruning_dir}"
    )


if __name__ == "__main__":
    run(main)
