"""Checkpoint I/O: every supported format round-trips exactly, bad files give one-line errors, writes are atomic."""

import argparse
import json

import pytest
import torch

from diffcompress.checkpoint import (
    CheckpointError,
    load_dit_weights,
    read_metadata,
    save_checkpoint,
    save_pruned,
    suggest_model,
    summarize_keys,
)
from models_with_layer_pruning import DiT, create_model, pruned_state_dict

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, num_heads=4, num_classes=10)


def tiny(depth=4, seed=0, **kw):
    torch.manual_seed(seed)
    return DiT(depth=depth, **TINY, **kw)


def assert_weights(model, expected):
    own = model.state_dict()
    assert own.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(own[k], v), k


def load_error(model, source, **kw):
    with pytest.raises(CheckpointError) as info:
        load_dit_weights(model, source, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


class NotATensor:
    pass


# ------------------------------------------------------------------------------------------ formats


def test_raw_state_dict_round_trip(tmp_path):
    sd = tiny(seed=1).state_dict()
    torch.save(sd, tmp_path / "raw.pt")
    model = tiny(seed=2)
    load_dit_weights(model, tmp_path / "raw.pt")
    assert_weights(model, sd)


def test_training_checkpoint_prefers_ema(tmp_path):
    ema, raw = tiny(seed=1).state_dict(), tiny(seed=2).state_dict()
    assert not torch.equal(ema["blocks.0.attn.qkv.weight"], raw["blocks.0.attn.qkv.weight"])
    torch.save({"model": raw, "ema": ema, "opt": {}, "args": {"lr": 1e-4}}, tmp_path / "train.pt")
    model = tiny(seed=3)
    load_dit_weights(model, tmp_path / "train.pt")
    assert_weights(model, ema)
    load_dit_weights(model, tmp_path / "train.pt", use_ema=False)
    assert_weights(model, raw)


def test_training_checkpoint_with_namespace_args(tmp_path):
    sd = tiny(seed=1).state_dict()
    torch.save({"model": sd, "ema": sd, "args": argparse.Namespace(model="DiT-XL/2", lr=1e-4)}, tmp_path / "t.pt")
    model = tiny(seed=2)
    load_dit_weights(model, tmp_path / "t.pt")
    assert_weights(model, sd)


def test_safetensors_round_trip(tmp_path):
    sd = tiny(seed=1).state_dict()
    save_checkpoint(sd, tmp_path / "w.safetensors")
    model = tiny(seed=2)
    load_dit_weights(model, tmp_path / "w.safetensors")
    assert_weights(model, sd)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_prefixes_are_stripped(tmp_path, prefix):
    sd = tiny(seed=1).state_dict()
    torch.save({prefix + k: v for k, v in sd.items()}, tmp_path / "p.pt")
    model = tiny(seed=2)
    load_dit_weights(model, tmp_path / "p.pt")
    assert_weights(model, sd)


def test_prunable_model_takes_plain_checkpoint(tmp_path):
    sd = tiny(seed=1).state_dict()
    torch.save(sd, tmp_path / "plain.pt")
    model = tiny(seed=2, groups=[[1, 2], [1, 2]])
    load_dit_weights(model, tmp_path / "plain.pt")
    own = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(own[k], v), k
    gates = [k for k in own if k.startswith("gate_logits")]
    assert len(gates) == 2
    for k in gates:
        assert torch.equal(own[k], torch.full((2,), 0.02))


# ------------------------------------------------------------------------------------------- errors


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save(tiny().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in load_error(tiny(), path)


def test_empty_file(tmp_path):
    (tmp_path / "empty.pt").touch()
    assert "is empty (0 bytes)" in load_error(tiny(), tmp_path / "empty.pt")


def test_missing_file(tmp_path):
    assert "does not exist" in load_error(tiny(), tmp_path / "nope.pt")


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"model": NotATensor()}, tmp_path / "evil.pt")
    assert "Python objects other than tensors" in load_error(tiny(), tmp_path / "evil.pt")


def test_wrong_depth_names_missing_blocks(tmp_path):
    torch.save(tiny(depth=2).state_dict(), tmp_path / "d2.pt")
    msg = load_error(tiny(depth=4), tmp_path / "d2.pt")
    assert "missing" in msg and "blocks.2-3.*" in msg
    assert "depth 2" in msg


def test_wrong_width_is_mis_shaped(tmp_path):
    torch.manual_seed(0)
    wide = DiT(depth=4, **{**TINY, "hidden_size": 32})
    msg = load_error(tiny(), wide.state_dict())
    assert "mis-shaped" in msg and "width 32" in msg


def test_suggest_model_for_real_sizes():
    with torch.device("meta"):
        d14, xl = create_model("DiT-D14/2"), create_model("DiT-XL/2")
    assert suggest_model(d14.state_dict()) == "DiT-D14/2"
    assert suggest_model(xl.state_dict()) == "DiT-XL/2"
    msg = load_error(xl, d14.state_dict())
    assert "blocks.14-27.*" in msg and "use --model DiT-D14/2" in msg


# ------------------------------------------------------------------------------------------ writing


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"previous checkpoint")

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tiny().state_dict(), path)
    assert path.read_bytes() == b"previous checkpoint"
    assert list(tmp_path.glob(".*.tmp")) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_pruned(tmp_path, suffix):
    kept = [0, 3]
    src = tiny(seed=1, groups=[[1, 2], [1, 2]])
    sd = pruned_state_dict(src.state_dict(), kept)
    path = save_pruned(sd, tmp_path / f"pruned{suffix}", kept_indices=kept, source_model="tiny")

    if suffix == ".pt":
        loaded = torch.load(path, weights_only=True)
    else:
        from safetensors.torch import load_file

        loaded = load_file(path)
    shallow = tiny(depth=2)
    shallow.load_state_dict(loaded, strict=True)
    assert torch.equal(shallow.blocks[1].mlp.fc1.weight, src.blocks[3].mlp.fc1.weight)

    meta = read_metadata(path)
    assert meta["kept_indices"] == kept and meta["source_model"] == "tiny" and meta["depth"] == 2
    assert json.loads((tmp_path / f"pruned{suffix}.json").read_text()) == meta
    (tmp_path / f"pruned{suffix}.json").unlink()
    assert read_metadata(path) == (meta if suffix == ".safetensors" else None)


def test_summarize_keys_compacts_block_ranges():
    keys = [f"blocks.{i}.attn.qkv.weight" for i in (2, 3, 4, 7)] + ["blocks.3.mlp.fc1.weight", "pos_embed"]
    summary = summarize_keys(keys)
    assert summary == "6 keys (blocks.2-4,7.*, pos_embed)"
    assert summarize_keys(["blocks.5.x"]) == "1 key (blocks.5.*)"


# ------------------------------------------------------------------------------------------ regressions


@pytest.mark.parametrize(
    "content,expected",
    [
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 2700000000\n", "Git LFS pointer"),
        (b"<html><body>404 Not Found</body></html>", "truncated or corrupt"),
        (b"hello world" * 10, "truncated or corrupt"),
    ],
)
def test_non_checkpoint_files_are_not_called_unsafe(tmp_path, content, expected):
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    msg = load_error(tiny(), path)
    assert expected in msg and "Python objects" not in msg


def test_directory_is_reported_as_such(tmp_path):
    assert "is a directory" in load_error(tiny(), tmp_path)


def test_resave_without_metadata_removes_stale_sidecar(tmp_path):
    model = tiny()
    path = save_pruned(pruned_state_dict(model.state_dict(), [0, 1]), tmp_path / "p.pt", [0, 1], "tiny")
    assert read_metadata(path)["kept_indices"] == [0, 1]
    save_checkpoint(model.state_dict(), path)
    assert read_metadata(path) is None


# ------------------------------------------------------------------------- issue 21: weights, metadata, code


def test_non_finite_and_non_float_weights_are_refused_unless_allowed(tmp_path, monkeypatch):
    sd = tiny().state_dict()
    sd["blocks.1.mlp.fc1.weight"] = sd["blocks.1.mlp.fc1.weight"].clone()
    sd["blocks.1.mlp.fc1.weight"][0, :2] = float("nan")
    sd["pos_embed"] = sd["pos_embed"].long()
    msg = load_error(tiny(), sd, flag="--ckpt")
    assert "'blocks.1.mlp.fc1.weight' has 2 NaN/inf values" in msg and "'pos_embed' is int64" in msg
    assert "DIFFCOMPRESS_ALLOW_NONFINITE_WEIGHTS=1" in msg and "--ckpt" in msg
    monkeypatch.setenv("DIFFCOMPRESS_ALLOW_NONFINITE_WEIGHTS", "1")
    model = tiny()
    load_dit_weights(model, sd)
    assert torch.isnan(model.blocks[1].mlp.fc1.weight).any()


def test_flags_name_the_file_and_the_model_flag(tmp_path):
    torch.save(tiny(depth=2).state_dict(), tmp_path / "t.pt")
    msg = load_error(tiny(depth=4), tmp_path / "t.pt", flag="--load-teacher", model_flag="--teacher")
    assert msg.startswith(f"checkpoint {str(tmp_path / 't.pt')!r} (--load-teacher) does not fit")
    assert "--model" not in msg


def _sidecar(tmp_path, **changes):
    kept = [0, 3]
    path = save_pruned(pruned_state_dict(tiny().state_dict(), kept), tmp_path / "p.pt", kept, "DiT-Ti/4")
    meta = json.loads((tmp_path / "p.pt.json").read_text())
    meta.update(changes)
    (tmp_path / "p.pt.json").write_text(json.dumps(meta))
    return path


@pytest.mark.parametrize(
    "changes,words",
    [
        (dict(kept_indices=[0, 12]), "[12] are out of range for DiT-Ti/4 of depth 12"),
        (dict(kept_indices=[3, 0]), "not increasing"),
        (dict(kept_indices=[0, True]), "not a non-empty list"),
        (dict(kept_indices=[0, 1, 2], depth=3), "says depth 3, the checkpoint holds 2 blocks"),
        (dict(groups=[[1, 6], [1, 6]]), "group 0 [1, 6] (blocks 0-5) keeps [0, 3], expected 1"),
        (dict(groups=[[1, 2]]), "cover 2 blocks, DiT-Ti/4 has 12"),
        (dict(groups="1:2"), "not a list of [N, M] pairs"),
        (dict(source_model=None), "None is not a registered model"),
    ],
)
def test_pruned_metadata_is_checked_against_the_file(tmp_path, changes, words):
    path = _sidecar(tmp_path, **changes)
    msg = load_error(tiny(depth=2), path)
    assert "p.pt.json" in msg
    assert words in msg


def test_metadata_not_json_is_one_line(tmp_path):
    path = _sidecar(tmp_path)
    (tmp_path / "p.pt.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"p\.pt\.json.*not valid JSON"):
        read_metadata(path)


def _payload(fn, arg):
    class Payload:
        def __reduce__(self):
            return (fn, (arg,))

    return Payload()


@pytest.mark.parametrize("legacy", [False, True])
def test_code_is_named_never_corrupt_never_weights_only_false(tmp_path, legacy):
    import os

    path = tmp_path / "evil.pt"
    torch.save({"a": torch.zeros(2), "b": _payload(os.system, "true")}, path, _use_new_zipfile_serialization=not legacy)
    msg = load_error(tiny(), path)
    assert "holds code, refused" in msg and "posix.system" in msg
    assert "corrupt" not in msg and "weights_only" not in msg


def test_truncated_zip_with_code_is_still_code(tmp_path):
    import os

    path = tmp_path / "evil.pt"
    torch.save({"b": _payload(os.system, "true"), "a": torch.zeros(100000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg = load_error(tiny(), path)
    assert "holds code, refused" in msg and "posix.system" in msg


def test_corrupt_pickle_reason_never_suggests_weights_only_false(tmp_path):
    import pickle

    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"a": [1, 2, 3]}, protocol=4))  # no code, but not a torch file
    msg = load_error(tiny(), path)
    assert "weights_only" not in msg and "holds code" not in msg


def test_aptp_tensor_files_go_through_the_same_loader(tmp_path):
    import os

    from diffcompress.checkpoint import load_tensor

    torch.save(_payload(os.system, "true"), tmp_path / "arch_vector.pt")
    with pytest.raises(CheckpointError, match="holds code, refused"):
        load_tensor(tmp_path / "arch_vector.pt")
