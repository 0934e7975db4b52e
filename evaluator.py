"""The ADM evaluation suite: Inception Score, FID, sFID, precision and recall of a sample batch against a reference.

python evaluator.py VIRTUAL_imagenet256_labeled.npz samples/DiT-D14-...-cfg-1.5-seed-0.npz
python evaluator.py REF.npz SAMPLE.npz --backend tf          # the original frozen TensorFlow graph
python evaluator.py REF.npz SAMPLE.npz --inception-weights ~/pt_inception-2015-12-05-6726825d.pth

Batches are ``.npz`` files with ``arr_0`` uint8 [N, H, W, 3] (sample_ddp.py writes them; ADM's reference batches
also hold ``mu``, ``sigma``, ``mu_s``, ``sigma_s``, used when present). Backends:
  torch  (default) the same Inception graph ported to PyTorch, with its resize and normalisation; weights from
         --inception-weights, else $DIFFCOMPRESS_CACHE (default ~/.cache/diffcompress), else downloaded once.
  tf     the ADM evaluator's classify_image_graph_def.pb, needs `pip install -r requirements-tf.txt`.
Activations are cached per batch file (keyed by path, size, modification time and backend weights), so
evaluating many sample files against one reference computes the reference once.
"""

from __future__ import annotations

import argparse
import json

import torch

from diffcompress.adm_eval import (
    NpzImages,
    check_batches,
    default_cache,
    evaluate,
    load_backend,
    precomputed_statistics,
)
from diffcompress.checkpoint import write_json_atomic
from diffcompress.cli import ArgumentParser, positive_int, run
from diffcompress.distributed import resolve_device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ref_batch", help="reference batch .npz (arr_0, optional mu/sigma/mu_s/sigma_s)")
    p.add_argument("sample_batch", help="sample batch .npz (arr_0)")
    p.add_argument("--backend", choices=["torch", "tf"], default="torch")
    p.add_argument("--inception-weights", default=None, help="local pt_inception-2015-12-05-6726825d.pth (torch)")
    p.add_argument("--inception-graph", default=None, help="local classify_image_graph_def.pb (tf)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--cache-dir", default=None, help=f"activation cache (default: {default_cache()})")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached activations")
    p.add_argument("--recompute-ref-stats", action="store_true", help="ignore the reference file's mu/sigma")
    p.add_argument("--split-size", type=positive_int, default=5000, help="Inception Score split size")
    p.add_argument("--json-out", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    if args.batch_size < 1 or args.split_size < 1:
        raise ValueError("--batch-size and --split-size must be positive")
    # both batches readable and comparable, the reference's own statistics sound, before weights load or download
    check_batches(NpzImages(args.ref_batch), NpzImages(args.sample_batch))
    if not args.recompute_ref_stats:
        precomputed_statistics(args.ref_batch)
    device = str(resolve_device(args.device))
    if device.startswith("cuda"):  # full fp32 convolutions: the features feed a covariance, keep them exact
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    backend = load_backend(args.backend, args.inception_weights, args.inception_graph, device)
    cache = None if args.no_cache else (args.cache_dir or default_cache())
    results = evaluate(
        args.ref_batch,
        args.sample_batch,
        backend,
        batch_size=args.batch_size,
        cache=cache,
        recompute_ref_stats=args.recompute_ref_stats,
        split_size=args.split_size,
        device=device,
    )
    print(f"reference statistics: {results['ref_statistics']} ({results['num_ref']} reference images)")
    print("Computing evaluations...")
    print("Inception Score:", results["inception_score"])
    print("FID:", results["fid"])
    print("sFID:", results["sfid"])
    print("Precision:", results["precision"])
    print("Recall:", results["recall"])
    print(json.dumps(results))
    if args.json_out:
        write_json_atomic(args.json_out, results)
        print(f"wrote {args.json_out}")
    return results


if __name__ == "__main__":
    run(lambda: main(parse_args()))
