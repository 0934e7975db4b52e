"""Draw the decisions of a prune_by_learning run over training (the job of the authors' draw_decision.py).

    python draw_decision.py outputs/prune-DiT-XL-1-2

Top: the layers each log step keeps (dark = kept), from the EMA gates. Bottom: each group's confidence, the
softmax probability of its decided keep-pattern (1 = certain), one curve per group with a legend naming the
group's layers and its final decision. The run is read from, in order of preference:
  - ``decisions.json`` (what prune_by_learning.py writes at the end of a run) or the folder that holds it;
  - a training checkpoint (``checkpoints/0001000.pt``; with a folder, the latest), whose ``decision_history``
    covers the run up to that step (a preempted or unfinished run);
  - a text log of the run's stdout (lines ``(step=...) ... decisions/confidence [0]:0.55 ...``; the
    confidences have two decimals there).
Writes ``--out`` (default ``decision.png`` beside the source) and prints its path and the final decision.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from diffcompress.checkpoint import CheckpointError, load_file
from diffcompress.cli import ArgumentParser, run
from diffcompress.errors import UserError

LOG_LINE = re.compile(r"\(step=(\d+)\).*?kept=\[([\d, ]*)\] decisions/confidence (.*)$")
LOG_GROUP = re.compile(r"\[([\d, ]*)\]:([\d.]+)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="experiment folder, decisions.json, a checkpoint .pt, or a stdout log of the run")
    p.add_argument("--out", default=None, help="PNG path (default: decision.png beside the source)")
    p.add_argument(
        "--groups",
        default=None,
        help="N:M groups when the source does not record them (a log): '1:2' (every group) or '2:4,3:4'",
    )
    p.add_argument("--title", default=None, help="plot title (default: the source's name)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------- reading


def _groups_from_args(run_args: dict[str, Any], count: int) -> list[list[int]] | None:
    """The run's N:M groups from its arguments (--groups, else the model name's), if they fit ``count`` groups."""
    from models_with_layer_pruning import DiT_models, parse_groups

    model, spec = run_args.get("model"), run_args.get("groups")
    try:
        groups = parse_groups(spec) if spec else [list(g) for g in DiT_models[model].arch["groups"] or []]
    except (ValueError, KeyError):
        return None
    if len(groups) == 1 and count > 1:  # '1:2' tiles the depth
        groups = groups * count
    return groups if len(groups) == count else None


def _read_checkpoint(path: Path) -> dict[str, Any]:
    try:
        ckpt = load_file(path)
    except CheckpointError as e:
        raise UserError(str(e)) from None
    if "decision_history" not in ckpt:
        raise UserError(f"checkpoint {str(path)!r} has no decision_history: it is not from prune_by_learning.py")
    history = list(ckpt["decision_history"])
    count = len(history[-1]["confidence"]) if history else 0
    return dict(history=history, groups=_groups_from_args(dict(ckpt.get("args") or {}), count))


def _read_log(path: Path) -> dict[str, Any]:
    history = []
    for line in path.read_text(errors="replace").splitlines():
        m = LOG_LINE.search(line)
        if not m:
            continue
        pairs = LOG_GROUP.findall(m.group(3))
        history.append(dict(
            step=int(m.group(1)), kept=[int(v) for v in m.group(2).split(",") if v.strip()],
            decisions=[[int(v) for v in d.split(",") if v.strip()] for d, _ in pairs],
            confidence=[float(c) for _, c in pairs],
        ))  # fmt: skip
    if not history:
        raise UserError(f"{path} holds no decision lines ('(step=...) ... decisions/confidence ...'): not a run log")
    return dict(history=history, groups=None)


def read_run(source: str | Path, groups: str | None = None) -> dict[str, Any]:
    """``{"history": [...], "groups": [[N, M], ...], "source": Path}`` from any of the sources above."""
    path = Path(source)
    if path.is_dir():
        if (path / "decisions.json").is_file():
            path = path / "decisions.json"
        else:
            ckpts = sorted((path / "checkpoints").glob("[0-9]*.pt")) or sorted(path.glob("[0-9]*.pt"))
            if not ckpts:
                raise UserError(f"{path} holds neither decisions.json nor checkpoints/*.pt of a prune_by_learning run")
            path = ckpts[-1]
    elif not path.is_file():
        raise UserError(f"{path}: no such file or folder (give a prune_by_learning experiment folder)")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, dict) or "history" not in data:
            raise UserError(f"{path} has no 'history': not a decisions.json from prune_by_learning.py")
        run_data = dict(history=data["history"], groups=data.get("groups"))
    elif path.suffix in (".pt", ".pth", ".bin"):
        run_data = _read_checkpoint(path)
    else:
        run_data = _read_log(path)
    if not run_data["history"]:
        raise UserError(f"{path} records no log step yet (the run logs every --log-every steps)")
    if groups:
        from models_with_layer_pruning import parse_groups

        try:
            parsed = parse_groups(groups)
        except ValueError as e:
            raise UserError(f"--groups: {e}") from None
        count = len(run_data["history"][-1]["confidence"])
        run_data["groups"] = parsed * count if len(parsed) == 1 else parsed  # '1:2' tiles the run's groups
    run_data["source"] = path
    return run_data


# -------------------------------------------------------------------------------------------- the plot


def decision_series(history: list[dict], groups: list[list[int]] | None) -> dict[str, Any]:
    """The numbers behind the plot: steps [T], confidence [T, G], kept mask [depth, T] and group layer ranges."""
    steps = np.array([h["step"] for h in history])
    confidence = np.array([h["confidence"] for h in history], dtype=np.float64)
    if groups is None:  # decisions name positions within each group; the group sizes are not recorded
        depth = max(max(h["kept"], default=-1) for h in history) + 1
        spans = None
    else:
        depth = sum(m for _, m in groups)
        starts = np.cumsum([0] + [m for _, m in groups])
        spans = [(int(starts[g]), int(starts[g + 1]) - 1) for g in range(len(groups))]
        if len(groups) != confidence.shape[1]:
            raise UserError(f"the run has {confidence.shape[1]} groups, the given groups {len(groups)}")
    kept = np.zeros((depth, len(history)), dtype=np.int8)
    for j, h in enumerate(history):
        kept[h["kept"], j] = 1
    return dict(steps=steps, confidence=confidence, kept=kept, spans=spans, final=history[-1])


def group_label(g: int, series: dict[str, Any], groups: list[list[int]] | None) -> str:
    final = series["final"]
    if groups is None:
        return f"group {g}: keeps {final['decisions'][g]}"
    (a, b), (n, m) = series["spans"][g], groups[g]
    kept = [a + d for d in final["decisions"][g]]
    return f"g{g} {n}:{m} layers {a}-{b}: keeps {','.join(map(str, kept))} ({series['confidence'][-1, g]:.2f})"


def draw(series: dict[str, Any], groups: list[list[int]] | None, out: Path, title: str) -> list[str]:
    """Write the PNG; returns the legend's labels (one per group)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, conf, kept = series["steps"], series["confidence"], series["kept"]
    n_groups = conf.shape[1]
    legend_cols = 1 if n_groups <= 8 else 2
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(9 + 3.5 * legend_cols, 7), sharex=True, height_ratios=[3, 2], constrained_layout=True
    )
    half = (steps[1] - steps[0]) / 2 if len(steps) > 1 else 0.5
    top.imshow(kept, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest",
               extent=(steps[0] - half, steps[-1] + half, kept.shape[0] - 0.5, -0.5))  # fmt: skip
    if series["spans"]:
        for _, b in series["spans"][:-1]:
            top.axhline(b + 0.5, color="tab:red", lw=0.6, alpha=0.6)
    top.set_ylabel("layer (dark = kept)")
    top.set_title(title)
    cmap = plt.get_cmap("tab20" if n_groups > 10 else "tab10")
    for g in range(n_groups):
        bottom.plot(steps, conf[:, g], lw=1.4, marker="." if len(steps) < 30 else None, color=cmap(g % cmap.N),
                    label=group_label(g, series, groups))  # fmt: skip
    bottom.set_ylim(0, 1.02)
    bottom.set_ylabel("confidence (prob. of decided pattern)")
    bottom.set_xlabel("training step")
    bottom.grid(alpha=0.3)
    legend = bottom.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, ncol=legend_cols, title="group")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return [text.get_text() for text in legend.get_texts()]


def main(args: argparse.Namespace) -> dict[str, Any]:
    data = read_run(args.source, args.groups)
    series = decision_series(data["history"], data["groups"])
    source = data["source"]
    out = Path(args.out) if args.out else source.parent / "decision.png"
    if out.parent.name == "checkpoints" and not args.out:
        out = source.parent.parent / "decision.png"
    legend = draw(series, data["groups"], out, args.title or f"learned layer decisions (EMA gates): {source}")
    final = series["final"]
    print(f"read {len(series['steps'])} log steps (to step {final['step']}) from {source}")
    print(f"final kept layers {final['kept']}, confidence {[round(c, 3) for c in final['confidence']]}")
    print(f"wrote {out}")
    return dict(series, groups=data["groups"], output=out, legend=legend)


if __name__ == "__main__":
    run(lambda: main(parse_args()))
