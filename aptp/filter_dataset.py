"""APTP's filtering stage: assign every caption of the training and validation splits to an expert.

    python -m aptp.filter_dataset --pruning_dir results/aptp/pruning/cc3m [--splits train validation]
    accelerate launch -m aptp.filter_dataset --pruning_dir ...      # the prompt embeddings are shared out

The router of a finished pruning run (``router.pt``/``router.json``) routes each caption deterministically and
independently of the batch: ``argmax_k cos_k / 0.05 + log v_k`` with the per-expert scalings calibrated at the end
of pruning (``--routing cosine``: the plain cosine argmax; ``--routing authors``: the authors' rule, see
``aptp.original``; the default for their pruning folders, which hold no calibration). The dataset, its folder and
the prompt encoder are those of the pruning run (its ``config.yaml``); the prompt embeddings are read from the run's
cache or computed into it (the training split's are usually there already). Under ``accelerate launch`` the
processes share the embedding work and the main process routes and writes; routing itself is cheap.

Written to ``<pruning_dir>/filtered/`` (names: ``aptp.assignments``): per split, the expert of every caption row,
the rows of each expert and a summary; ``aptp.finetune --expert_id K`` trains expert K on its training rows. Also
written, for the authors' tools, into ``<pruning_dir>`` itself: ``{dataset}_{train,validation}_mapped_indices.pt``
in their format and row order (``aptp.mapped_indices``; CC3M with the ``{split}_cc3m_names.pkl`` that fixes it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState

from diffcompress.cli import ArgumentParser, positive_int, run
from diffcompress.errors import UserError
from diffcompress.progress import progress_bar

from .assignments import filtered_dir, load_router, pruning_config, read_router_info, write_assignments
from .config import load_config
from .data import embedding_cache_path, load_captions, prompt_embeddings
from .layout import ArchLayout
from .mapped_indices import FILE_SPLITS, write_for_table
from .router import AUTHORS_BATCH, ROUTING_RULES, Router, _hub_reachable


def load_unet_config(name: str, revision: str | None = None) -> dict[str, Any]:
    """The UNet config (``unet/config.json``) of an SD folder or hub id; offline, a hub id fails at once."""
    from diffusers import UNet2DConditionModel

    local = Path(name).expanduser()
    offline = not local.is_dir() and not _hub_reachable()
    try:
        return dict(
            UNet2DConditionModel.load_config(
                str(local) if local.is_dir() else name, subfolder="unet", revision=revision, local_files_only=offline
            )
        )
    except (OSError, ValueError) as e:
        raise UserError(
            f"Stable Diffusion {name!r} (router.json): cannot read unet/config.json "
            f"({next(iter(str(e).splitlines()), '')}); expected the diffusers folder the router was trained on"
        ) from None


def route_captions(router: Router, embeddings: np.ndarray, batch_size: int, desc: str = "route") -> np.ndarray:
    """The expert of each row of ``embeddings`` [N, d] (int64 [N]), routed in batches on the router's device (the
    batches do not change the result: ``Router.route`` is per prompt; the authors' rule depends on a row's place in
    its batch of 2048, so it gets those batches)."""
    device = next(router.parameters()).device
    if router.routing == "authors":
        batch_size = AUTHORS_BATCH
    ids = [np.zeros(0, dtype=np.int64)]
    for lo in progress_bar(range(0, len(embeddings), batch_size), desc=desc):
        batch = torch.from_numpy(np.array(embeddings[lo : lo + batch_size], dtype=np.float32)).to(device)
        ids.append(router.route(batch).cpu().numpy().astype(np.int64))
    return np.concatenate(ids)


def print_counts(summaries: list[dict[str, Any]], num_experts: int) -> None:
    """Captions per expert and split, as a table."""
    splits = [s["split"] for s in summaries]
    width = max(10, *(len(s) + 2 for s in splits))
    print(f"{'expert':>6}" + "".join(f"{s:>{width}}" for s in splits))
    for k in range(num_experts):
        print(f"{k:>6}" + "".join(f"{s['rows_per_expert'][k]:>{width}}" for s in summaries))
    print(f"{'total':>6}" + "".join(f"{s['rows']:>{width}}" for s in summaries))


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description="APTP filtering: route every caption to an expert")
    parser.add_argument("--pruning_dir", required=True, help="output_dir of a finished aptp.prune run")
    parser.add_argument("--splits", nargs="+", default=["train", "validation"], help="dataset splits to assign")
    parser.add_argument(
        "--batch_size", type=positive_int, default=256, help="captions per prompt-encoder / router batch"
    )
    parser.add_argument("--data_dir", default=None, help="the dataset folder, if not the pruning run's")
    parser.add_argument("--routing", choices=ROUTING_RULES, default=None,
                        help="calibrated: argmax_k cos_k / 0.05 + log v_k; cosine: the plain argmax; authors: their "
                             "rule (default: calibrated; theirs for their uncalibrated routers)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be positive, got {args.batch_size}")
    pruning_dir = Path(args.pruning_dir)
    info = read_router_info(pruning_dir)  # fails first, with a hint, when this is no pruning run
    cfg = load_config(pruning_config(pruning_dir))
    dataset, data_dir = cfg.data.dataset_name, args.data_dir or cfg.data.data_dir
    encoder = info["prompt_encoder"]
    cache_dir = cfg.data.embedding_cache_dir or pruning_dir / "prompt_embeddings"

    state = PartialState(cpu=not torch.cuda.is_available())  # several processes share the embedding work
    layout = ArchLayout.from_config(load_unet_config(info["pretrained_model_name_or_path"], cfg.revision))
    router = load_router(pruning_dir, layout, state.device, args.routing)

    summaries, notes = [], []
    for split in args.splits:
        table = load_captions(dataset, data_dir, split)
        embeddings = prompt_embeddings(table.captions, encoder, cache_dir, state.device, args.batch_size)
        if embeddings.shape[1] != info["prompt_dim"]:
            raise UserError(
                f"prompt encoder {encoder!r} gives {embeddings.shape[1]}-d embeddings, the router of {pruning_dir} "
                f"takes {info['prompt_dim']}"
            )
        if state.is_main_process:
            ids = route_captions(router, embeddings, args.batch_size, desc=f"route {split}")
            summaries.append(
                write_assignments(
                    pruning_dir, split, ids, router.num_experts, dataset=dataset, data_dir=str(data_dir),
                    routing=router.routing, source=table.source, missing=table.missing, prompt_encoder=encoder,
                    embeddings=os.fspath(embedding_cache_path(cache_dir, encoder, table.captions)),
                )
            )  # fmt: skip
            if split in FILE_SPLITS:  # the authors' file beside ours
                notes.append(write_for_table(pruning_dir, dataset, split, table, ids))
        state.wait_for_everyone()
    if state.is_main_process:
        print_counts(summaries, router.num_experts)
        for note in notes:
            print(f"authors' filtering file: {note}")
        print(
            f"expert assignments: {filtered_dir(pruning_dir)} ({{split}}_expert_ids.npy: the expert of every caption "
            f"row; {{split}}_expert_<k>.npy: the rows of expert k; {{split}}.json: counts)\n"
            f"next: python -m aptp.finetune --config configs/aptp/finetuning/<dataset>.yaml --expert_id <k> "
            f"pruning_dir={pruning_dir}"
        )


if __name__ == "__main__":
    run(main)
