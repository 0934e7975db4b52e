"""Rows of tests/test_bad_input.py: checkpoints and weights.

Weights that would sample black images (a non-float dtype, NaN or inf), block scores that are not finite, a pruned
file's metadata that does not describe it, files named by the flag that took them, and pickles that refer to code
(refused as such, whatever the format: zip, legacy, plain pickle, protocol 0). Every world is a DiT-Ti/4 on 8x8
inputs (pixels for sample.py with ``--vae none``, 4-channel toy latents for the pruning and training scripts)."""

from __future__ import annotations

import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import torch

from diffcompress.checkpoint import save_pruned
from models_with_layer_pruning import create_model, pruned_state_dict
from tests.bad_input import MALICIOUS, NAMED, SILENT, Case, Result

MODEL = "DiT-Ti/4"  # depth 12, width 192
SAMPLE = ["--model", MODEL, "--image-size", "8", "--vae", "none", "--num-classes", "4", "--num-sampling-steps", "2",
          "--device", "cpu", "--class-labels", "0", "--out", "out.png"]  # fmt: skip
PRUNED = [0, 2, 4, 6, 8, 11]  # 12 -> 6 blocks


def state(channels: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """A DiT-Ti/4 state dict for 8x8 inputs and 4 classes (3 channels: sample.py on pixels; 4: toy latents)."""
    torch.manual_seed(seed)
    return create_model(MODEL, input_size=8, in_channels=channels, num_classes=4).state_dict()


def features(tmp: Path, n: int = 8) -> Path:
    """Packed toy latents [N, 2 views, 4, 8, 8] and labels in 0..3."""
    root = tmp / "features"
    root.mkdir(exist_ok=True)
    np.save(root / "features.npy", np.random.default_rng(0).standard_normal((n, 2, 4, 8, 8)).astype(np.float32))
    np.save(root / "labels.npy", np.arange(n) % 4)
    return root


def nothing_written(tmp: Path, result: Result) -> None:
    assert not (tmp / "out.png").exists() and not (tmp / "pruned.pt").exists(), "a refused run wrote output"
    assert not (tmp / "PWNED").exists(), "the pickle ran code"
    assert "weights_only" not in result.err, "the message suggests weights_only=False"


def sampled(tmp: Path, result: Result) -> None:
    assert (tmp / "out.png").is_file(), result.err


# --------------------------------------------------------------------------------- weights that sample black


def bad_weights(key: str, change, suffix: str = ".pt", script: str = "sample.py"):
    """``key`` of a DiT-Ti/4 state dict changed by ``change(tensor) -> tensor``, loaded by ``script``."""

    def prepare(tmp: Path):
        sd = state(3 if script == "sample.py" else 4)
        sd[key] = change(sd[key])
        path = tmp / f"weights{suffix}"
        if suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(sd, str(path))
        else:
            torch.save({"model": sd, "ema": sd}, path)
        if script == "sample.py":
            return ["sample.py", *SAMPLE, "--ckpt", path]
        return ["prune_by_index.py", "--model", MODEL, "--ckpt", path, "--kept-indices", "0,2,4",
                "--save-model", tmp / "pruned.pt"]  # fmt: skip

    return prepare


def with_nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[3] = float("nan")
    return t


def with_inf(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("-inf")
    return t


def overflowing_scores(tmp: Path):
    """Finite weights so large that block 1's output overflows: its similarity (and every later one) is NaN."""
    sd = state(4)
    sd["blocks.1.mlp.fc2.weight"] = torch.full_like(sd["blocks.1.mlp.fc2.weight"], 3e38)
    sd["blocks.1.adaLN_modulation.1.bias"] = torch.ones_like(sd["blocks.1.adaLN_modulation.1.bias"])
    torch.save(sd, tmp / "huge.pt")
    return ["prune_by_score.py", "--model", MODEL, "--ckpt", tmp / "huge.pt", "--data-path", features(tmp),
            "--num-classes", "4", "--nsamples", "8", "--batch-size", "8", "--n-pruned", "4", "--device", "cpu",
            "--save-model", tmp / "pruned.pt"]  # fmt: skip


# ----------------------------------------------------------------------------------- pruned files' metadata


def pruned_file(tweak, sidecar_text: str | None = None, suffix: str = ".pt"):
    """A DiT-Ti/4 pruned to ``PRUNED`` by save_pruned, its metadata changed by ``tweak(meta)`` (or the sidecar
    replaced by ``sidecar_text``), sampled by sample.py."""

    def prepare(tmp: Path):
        shallow = pruned_state_dict(state(3), PRUNED)
        path = save_pruned(shallow, tmp / f"pruned-in{suffix}", PRUNED, source_model=MODEL, groups=[[1, 2]] * 6)
        side = Path(f"{path}.json")
        if sidecar_text is not None:
            side.write_text(sidecar_text)
        else:
            import json

            meta = json.loads(side.read_text())
            tweak(meta)
            side.write_text(json.dumps(meta))
        return ["sample.py", *SAMPLE, "--depth", str(len(PRUNED)), "--ckpt", path]

    return prepare


def setter(**values):
    return lambda meta: meta.update(values)


# ------------------------------------------------------------------------------------- pickles holding code


class System:
    def __init__(self, fn=os.system, arg="touch PWNED"):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


def malicious(kind: str, script: str = "sample.py"):
    def prepare(tmp: Path):
        path = tmp / "evil.pt"
        payload = {"model": state(3), "args": System()}
        if kind == "zip":
            torch.save(payload, path)
        elif kind == "legacy":
            torch.save(payload, path, _use_new_zipfile_serialization=False)
        elif kind == "eval":
            torch.save({"ema": System(eval, "__import__('os').system('touch PWNED')")}, path)
        elif kind == "subprocess":
            torch.save([System(subprocess.check_output, ["touch", "PWNED"])], path)
        elif kind == "raw-pickle":
            path.write_bytes(pickle.dumps(System(), protocol=4))
        elif kind == "protocol-0":
            path.write_bytes(b"cposix\nsystem\n(S'touch PWNED'\ntR.")
        if script == "sample.py":
            return ["sample.py", *SAMPLE, "--ckpt", path]
        return ["prune_by_index.py", "--model", MODEL, "--ckpt", path, "--kept-indices", "0,2,4",
                "--save-model", tmp / "pruned.pt"]  # fmt: skip

    return prepare


# --------------------------------------------------------------------------------------- the flag is named


def wrong_teacher(tmp: Path):
    torch.save(state(4), tmp / "ti.pt")
    return ["train_masked_kd.py", "--model", MODEL, "--teacher", "DiT-S/4", "--load-teacher", tmp / "ti.pt",
            "--data-path", features(tmp), "--num-classes", "4", "--global-batch-size", "8", "--num-workers", "0",
            "--max-steps", "1"]  # fmt: skip


def vae_folder(config: str):
    def prepare(tmp: Path):
        (tmp / "myvae").mkdir()
        (tmp / "myvae" / "config.json").write_text(config)
        return ["sample.py", "--model", MODEL, "--random-init", "--vae", tmp / "myvae", "--device", "cpu"]

    return prepare


def sample_ckpt(channels: int = 3):
    def prepare(tmp: Path):
        torch.save(state(channels), tmp / "w.pt")
        return ["sample.py", *[a if a != MODEL else "DiT-S/4" for a in SAMPLE], "--ckpt", tmp / "w.pt"]

    return prepare


def truncated(tmp: Path):
    torch.save(state(3), tmp / "cut.pt")
    data = (tmp / "cut.pt").read_bytes()
    (tmp / "cut.pt").write_bytes(data[: len(data) // 3])
    return ["sample.py", *SAMPLE, "--ckpt", tmp / "cut.pt"]


W = "blocks.3.attn.qkv.weight"
CASES: list[Case] = [
    # weights that load and sample black images: refused with the tensor named
    Case(
        "weights-int64",
        SILENT,
        bad_weights(W, lambda t: t.round().long()),
        words=(W, "int64", "--ckpt", "DIFFCOMPRESS_ALLOW_NONFINITE_WEIGHTS"),
        check=nothing_written,
    ),
    Case(
        "weights-nan-one-value",
        SILENT,
        bad_weights("final_layer.linear.weight", with_nan),
        words=("final_layer.linear.weight", "1 NaN/inf value", "--ckpt"),
        check=nothing_written,
    ),
    Case(
        "weights-inf-safetensors-prune",
        SILENT,
        bad_weights("pos_embed", with_inf, ".safetensors", "prune_by_index"),
        words=("pos_embed", "NaN/inf", "weights.safetensors"),
        check=nothing_written,
    ),
    Case(
        "weights-bool-safetensors",
        SILENT,
        bad_weights("x_embedder.proj.bias", lambda t: t > 0, ".safetensors"),
        words=("x_embedder.proj.bias", "bool"),
        check=nothing_written,
    ),
    Case("weights-float16-loads", SILENT, bad_weights(W, lambda t: t.half()), code=0, check=sampled),
    # non-finite block scores: an error naming the blocks, nothing written
    Case(
        "score-nan-similarities",
        SILENT,
        overflowing_scores,
        words=("blocks [1,", "not finite", "--ckpt"),
        check=nothing_written,
    ),
    # a pruned file's metadata, checked against the state dict
    Case(
        "sidecar-index-out-of-range",
        SILENT,
        pruned_file(setter(kept_indices=[0, 2, 4, 6, 8, 12])),
        words=("pruned-in.pt.json", "[12]", "out of range", "depth 12"),
        check=nothing_written,
    ),
    Case(
        "sidecar-count-mismatch",
        SILENT,
        pruned_file(setter(kept_indices=[0, 2, 4, 6, 11], depth=5, groups=None)),
        words=("pruned-in.pt.json", "depth 5", "6 blocks"),
        check=nothing_written,
    ),
    Case(
        "sidecar-not-increasing",
        SILENT,
        pruned_file(setter(kept_indices=[2, 0, 4, 6, 8, 11])),
        words=("pruned-in.pt.json", "not increasing"),
        check=nothing_written,
    ),
    Case(
        "sidecar-groups-inconsistent",
        SILENT,
        pruned_file(setter(groups=[[1, 2]] * 5 + [[1, 3]])),
        words=("pruned-in.pt.json", "groups", "13 blocks"),
        check=nothing_written,
    ),
    Case(
        "sidecar-group-keeps-two",
        SILENT,
        pruned_file(setter(kept_indices=[0, 1, 4, 6, 8, 11])),
        words=("pruned-in.pt.json", "group 0", "expected 1"),
        check=nothing_written,
    ),
    Case(
        "sidecar-unknown-source",
        SILENT,
        pruned_file(setter(source_model="DiT-Q/2")),
        words=("pruned-in.pt.json", "'DiT-Q/2'", "not a registered model"),
        check=nothing_written,
    ),
    Case(
        "sidecar-of-safetensors-not-object",
        SILENT,
        pruned_file(None, suffix=".safetensors", sidecar_text="[]"),
        words=("pruned-in.safetensors.json", "JSON list"),
        check=nothing_written,
    ),
    # every line names the file or flag and what was expected
    Case(
        "sidecar-not-json",
        NAMED,
        pruned_file(None, sidecar_text="{kept: [0, 2"),
        words=("pruned-in.pt.json", "not valid JSON"),
        check=nothing_written,
    ),
    Case(
        "vae-mistyped-local-path",
        NAMED,
        lambda tmp: ["sample.py", "--model", MODEL, "--random-init", "--vae", "./vaes/sd-vae-ft-emma"],
        words=("--vae ./vaes/sd-vae-ft-emma", "no such folder"),
        check=nothing_written,
    ),
    Case(
        "vae-config-not-json",
        NAMED,
        vae_folder("{not json"),
        words=("--vae", "config.json", "not valid JSON"),
        check=nothing_written,
    ),
    Case(
        "vae-config-not-a-vae",
        NAMED,
        vae_folder('{"_class_name": "AutoencoderKL", "block_out_channels": "x"}'),
        words=("--vae", "myvae", "diffusion_pytorch_model.safetensors"),
        check=nothing_written,
    ),
    Case("wrong-teacher", NAMED, wrong_teacher, words=("--load-teacher", "use --teacher DiT-Ti/4")),
    Case(
        "wrong-model-for-ckpt", NAMED, sample_ckpt(), words=("(--ckpt)", "use --model DiT-Ti/4"), check=nothing_written
    ),
    Case(
        "truncated-ckpt-named",
        NAMED,
        truncated,
        words=("cut.pt", "(--ckpt)", "truncated or corrupt"),
        check=nothing_written,
    ),
    # pickles that refer to code: named as such, never "corrupt", never weights_only=False
    Case(
        "pickle-posix-system-zip",
        MALICIOUS,
        malicious("zip"),
        words=("evil.pt", "(--ckpt)", "holds code, refused", "posix.system"),
        check=nothing_written,
    ),
    Case(
        "pickle-posix-system-legacy",
        MALICIOUS,
        malicious("legacy"),
        words=("holds code, refused", "posix.system"),
        check=nothing_written,
    ),
    Case(
        "pickle-builtins-eval",
        MALICIOUS,
        malicious("eval"),
        words=("holds code, refused", "builtins.eval"),
        check=nothing_written,
    ),
    Case(
        "pickle-subprocess-prune",
        MALICIOUS,
        malicious("subprocess", "prune_by_index"),
        words=("holds code, refused", "subprocess.check_output"),
        check=nothing_written,
    ),
    Case(
        "pickle-plain-protocol-4",
        MALICIOUS,
        malicious("raw-pickle"),
        words=("holds code, refused", "posix.system"),
        check=nothing_written,
    ),
    Case(
        "pickle-protocol-0",
        MALICIOUS,
        malicious("protocol-0"),
        words=("holds code, refused", "posix.system"),
        check=nothing_written,
    ),
]
