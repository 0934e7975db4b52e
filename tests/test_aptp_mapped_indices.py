"""The authors' filtering files ({dataset}_{split}_mapped_indices.pt): written by aptp.filter_dataset beside our
filtered/ files, read by aptp.assignments (and so by fine-tuning and generation) when filtered/ has nothing, with
their row order mapped onto our caption tables, and bad files refused in one line naming them."""

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
import yaml

from aptp import assignments, filter_dataset, finetune, prune
from aptp import mapped_indices as mi
from aptp.config import FinetuneConfig, load_config
from aptp.data import load_captions
from aptp.make_tiny import build_world
from diffcompress.errors import UserError
from tests.aptp_helpers import reset_accelerate
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

K = 3


def fake_pruning_dir(path, dataset, data_dir, num_experts=K, config_in_parent=False):
    """What the reader needs of a pruning directory: the router's K (router.json) and the run's data config."""
    path.mkdir(parents=True)
    if num_experts is not None:
        (path / "router.json").write_text(json.dumps(dict(num_experts=num_experts)))
    where = path.parent if config_in_parent else path
    (where / "config.yaml").write_text(yaml.safe_dump(dict(data=dict(dataset_name=dataset, data_dir=str(data_dir)))))
    return path


def fake_coco(root, captions=10, without_image=(), duplicate_id=False):
    """COCO 2014 layout (train): 2 captions per image, empty image files (the tables only check names)."""
    (root / "annotations").mkdir(parents=True)
    (root / "images/train2014").mkdir(parents=True)
    anns = [dict(id=100 + 7 * i, image_id=i // 2, caption=f"caption {i}") for i in range(captions)]
    if duplicate_id:
        anns[-1]["id"] = anns[0]["id"]
    (root / "annotations/captions_train2014.json").write_text(json.dumps(dict(annotations=anns)))
    for image in {a["image_id"] for i, a in enumerate(anns) if i not in without_image}:
        (root / f"images/train2014/COCO_train2014_{image:012d}.jpg").touch()
    return root


def fake_cc3m(root, rows=8):
    (root / "training").mkdir(parents=True)
    (root / "Train_GCC-training.tsv").write_text("".join(f"caption {r}\thttp://x/{r}.jpg\n" for r in range(rows)))
    for r in range(rows):
        (root / f"training/{r}_{1000 + r}").touch()
    return root


def one_line(e, path):
    assert "\n" not in str(e.value) and str(path) in str(e.value), str(e.value)


def test_round_trip_and_a_view_saved_tensor(tmp_path):
    ids = np.array([2, 0, 1, 1, 0], dtype=np.int64)
    mi.save_mapped_indices(tmp_path / "a.pt", ids)
    loaded = torch.load(tmp_path / "a.pt", map_location="cpu", weights_only=True)
    assert loaded.dtype == torch.int64 and loaded.shape == (5,) and loaded.untyped_storage().size() == 5 * 8
    np.testing.assert_array_equal(mi.load_mapped_indices(tmp_path / "a.pt", K), ids)
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temporary file left

    big = torch.arange(40, dtype=torch.int64) % K
    torch.save(big[10:17], tmp_path / "view.pt")  # the whole storage travels with it
    np.testing.assert_array_equal(mi.load_mapped_indices(tmp_path / "view.pt", K), (np.arange(10, 17) % K))
    torch.save(torch.tensor([1, 2], dtype=torch.int32), tmp_path / "i32.pt")  # any integer type is an id
    assert mi.load_mapped_indices(tmp_path / "i32.pt", K).dtype == np.int64


class Code:
    def __reduce__(self):
        return (os.getcwd, ())


def test_bad_files_are_one_line_naming_them(tmp_path):
    bad = {
        "floats": (torch.tensor([0.0, 1.0]), "must be integers"),
        "bools": (torch.tensor([True, False]), "must be integers"),
        "matrix": (torch.zeros(2, 3, dtype=torch.int64), r"1-D tensor, got shape \(2, 3\)"),
        "range": (torch.tensor([0, 3, 1]), r"in \[0, 3\).*found 0\.\.3"),
        "negative": (torch.tensor([0, -1]), r"in \[0, 3\)"),
        "dict": ({"ids": torch.tensor([0])}, "holds a dict"),
        "code": ([Code()], "not a tensor file of expert ids"),
    }
    for name, (obj, message) in bad.items():
        path = tmp_path / f"{name}.pt"
        torch.save(obj, path)
        with pytest.raises(UserError, match=message) as e:
            mi.load_mapped_indices(path, K)
        one_line(e, path)
    raw = tmp_path / "raw_pickle.pt"
    raw.write_bytes(pickle.dumps(Code(), protocol=2))
    for path in (raw, tmp_path / "text.pt"):
        path.write_bytes(path.read_bytes() if path.exists() else b"not a pickle\nat all")
        with pytest.raises(UserError, match="not a tensor file of expert ids") as e:
            mi.load_mapped_indices(path, K)
        one_line(e, path)
    names = tmp_path / "train_cc3m_names.pkl"
    names.write_bytes(pickle.dumps([Code()]))
    with pytest.raises(UserError, match="not a pickled list of file names") as e:
        mi.load_cc3m_names(names)
    one_line(e, names)


def test_coco_file_read_through_assignments_and_finetuning(tmp_path):
    coco = fake_coco(tmp_path / "coco")
    prune_dir = fake_pruning_dir(tmp_path / "pruning", "coco", coco)
    theirs = np.array([0, 2, 2, 1, 0, 0, 1, 2, 2, 0])
    torch.save(torch.from_numpy(theirs), prune_dir / "coco_train_mapped_indices.pt")
    np.testing.assert_array_equal(assignments.read_expert_ids(prune_dir, "train"), theirs)
    for k in range(K):
        np.testing.assert_array_equal(assignments.read_expert_rows(prune_dir, "train", k), np.flatnonzero(theirs == k))
    summary = assignments.read_summary(prune_dir, "train")
    assert (summary["rows"], summary["num_experts"], summary["rows_per_expert"]) == (10, K, [4, 2, 4])
    assert (summary["dataset"], summary["data_dir"], "note" not in summary) == ("coco", str(coco), True)
    with pytest.raises(UserError, match=r"has experts 0\.\.2"):
        assignments.read_expert_rows(prune_dir, "train", 3)

    cfg = load_config(ROOT / "configs/aptp/finetuning/tiny.yaml", [f"pruning_dir={prune_dir}"], FinetuneConfig)
    data, routed, table = finetune.expert_captions(cfg, 2)
    assert routed == 4 and list(data.captions) == [f"caption {i}" for i in (1, 2, 7, 8)] and len(table) == 10

    # ours win when both exist
    assignments.write_assignments(prune_dir, "train", np.zeros(10, dtype=np.int64), K, dataset="coco")
    assert assignments.read_expert_ids(prune_dir, "train").tolist() == [0] * 10
    # no file for the split: our message
    with pytest.raises(UserError, match="validation not assigned"):
        assignments.read_expert_ids(prune_dir, "validation")


def test_coco_captions_without_images_are_mapped_or_refused(tmp_path):
    coco = fake_coco(tmp_path / "coco", without_image=(2, 3, 8, 9))  # images 1 and 4 missing
    prune_dir = fake_pruning_dir(tmp_path / "pruning", "coco", coco)
    theirs = np.array([0, 1, 2, 2, 1, 0, 1, 2, 0, 0])  # one per annotation, images or not
    path = prune_dir / "coco_train_mapped_indices.pt"
    torch.save(torch.from_numpy(theirs), path)
    ours = theirs[[0, 1, 4, 5, 6, 7]]
    np.testing.assert_array_equal(assignments.read_expert_ids(prune_dir, "train"), ours)
    assert assignments.read_summary(prune_dir, "train")["rows"] == 6
    table = load_captions("coco", coco, "train")
    cfg = load_config(ROOT / "configs/aptp/finetuning/tiny.yaml", [f"pruning_dir={prune_dir}"], FinetuneConfig)
    data, _, _ = finetune.expert_captions(cfg, 1)
    expected = [f"caption {i}" for i in (1, 4, 6)]
    assert list(data.captions) == [table.captions[j] for j in np.flatnonzero(ours == 1)] == expected

    torch.save(torch.from_numpy(theirs[:6]), path)  # as many rows as our table, but theirs has one per annotation
    with pytest.raises(UserError, match=r"has 6 rows, our coco train table 6 \(4 captions without an image dropped\)"):
        assignments.read_summary(prune_dir, "train")
    torch.save(torch.from_numpy(theirs[:9]), path)
    with pytest.raises(UserError, match="has 9 rows, our coco train table 6") as e:
        assignments.read_expert_ids(prune_dir, "train")
    one_line(e, path)

    dup = fake_coco(tmp_path / "dup", without_image=(2, 3), duplicate_id=True)
    prune_dup = fake_pruning_dir(tmp_path / "pruning-dup", "coco", dup)
    torch.save(torch.from_numpy(theirs), prune_dup / "coco_train_mapped_indices.pt")
    with pytest.raises(UserError, match="repeats annotation ids"):
        assignments.read_expert_ids(prune_dup, "train")


def test_their_folder_layout_without_a_router_and_several_datasets(tmp_path):
    coco = fake_coco(tmp_path / "coco")
    prune_dir = fake_pruning_dir(tmp_path / "run/checkpoint-5000", "coco", coco, None, config_in_parent=True)
    big = torch.tensor([0, 1, 4, 4, 1, 0, 2, 2, 3, 1, 4, 0], dtype=torch.int64)
    torch.save(big[2:], prune_dir / "coco_train_mapped_indices.pt")  # saved as a view
    summary = assignments.read_summary(prune_dir, "train")
    assert summary["num_experts"] == 5 and "largest id + 1" in summary["note"]
    np.testing.assert_array_equal(assignments.read_expert_rows(prune_dir, "train", 4), [0, 1, 8])

    torch.save(torch.zeros(10, dtype=torch.int64), prune_dir / "cc3m_train_mapped_indices.pt")
    assert assignments.read_summary(prune_dir, "train")["dataset"] == "coco"  # the config's
    (prune_dir.parent / "config.yaml").unlink()
    with pytest.raises(UserError, match="train files of cc3m and coco") as e:
        assignments.read_summary(prune_dir, "train")
    assert "\n" not in str(e.value)


def test_cc3m_needs_their_names(tmp_path):
    cc3m = fake_cc3m(tmp_path / "cc3m")
    prune_dir = fake_pruning_dir(tmp_path / "pruning", "cc3m", cc3m)
    names = [f"{r}_{1000 + r}" for r in (5, 2, 7, 0, 1, 6, 3, 4)]  # their os.listdir order
    theirs = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    path = prune_dir / "cc3m_train_mapped_indices.pt"
    torch.save(torch.from_numpy(theirs), path)
    with pytest.raises(UserError, match=r"has 8 rows, our cc3m train table 8 .*in another order.*names\.pkl") as e:
        assignments.read_expert_ids(prune_dir, "train")
    one_line(e, path)
    (prune_dir / "train_cc3m_names.pkl").write_bytes(pickle.dumps(["/their/data/training/" + n for n in names]))
    expected = np.empty(8, dtype=np.int64)
    expected[[5, 2, 7, 0, 1, 6, 3, 4]] = theirs
    np.testing.assert_array_equal(assignments.read_expert_ids(prune_dir, "train"), expected)
    (prune_dir / "train_cc3m_names.pkl").write_bytes(pickle.dumps(names[:7]))
    with pytest.raises(UserError, match="has 8 rows, .* names 7 images"):
        assignments.read_expert_ids(prune_dir, "train")


def test_write_for_coco_tables(tmp_path):
    coco = fake_coco(tmp_path / "coco")
    ids = np.arange(10) % K
    note = mi.write_for_table(tmp_path, "coco", "train", load_captions("coco", coco, "train"), ids)
    assert "annotation order" in note
    np.testing.assert_array_equal(mi.load_mapped_indices(tmp_path / "coco_train_mapped_indices.pt", K), ids)
    holes = fake_coco(tmp_path / "holes", without_image=(0, 1))
    note = mi.write_for_table(tmp_path / "holes", "coco", "train", load_captions("coco", holes, "train"), ids[:8])
    assert "not written: 2 captions" in note and not (tmp_path / "holes/coco_train_mapped_indices.pt").exists()


@pytest.mark.slow  # a whole pipeline end to end
def test_filter_writes_them_and_finetuning_runs_on_them_alone(tmp_path, capsys):
    from tests.test_aptp_finetune import make_experts_distinct  # 4 experts, captions of several

    root = tmp_path
    tiny = build_world(root, train_rows=12, val_rows=4, size=32)
    prune_dir = root / "pruning"
    prune.main([
        "--config", str(ROOT / "configs/aptp/pruning/tiny.yaml"), f"pretrained_model_name_or_path={root / 'sd'}",
        f"data.data_dir={root / 'cc3m'}", f"model.prompt_encoder={tiny['encoder']}", f"output_dir={prune_dir}",
        "data.embedding_cache_dir=null", "training.max_train_steps=1", "training.pretrain_steps=1",
    ])  # fmt: skip
    reset_accelerate()
    make_experts_distinct(prune_dir, root / "sd", tiny["encoder"], load_captions("cc3m", root / "cc3m").captions)
    filter_dataset.main(["--pruning_dir", str(prune_dir), "--batch_size", "5"])
    reset_accelerate()
    assert "authors' filtering file: " + str(prune_dir / "cc3m_train_mapped_indices.pt") in capsys.readouterr().out

    alone = root / "their-files-only"
    shutil.copytree(prune_dir, alone, ignore=shutil.ignore_patterns("filtered", "checkpoints"))
    for split in ("train", "validation"):
        ours = assignments.read_expert_ids(prune_dir, split)
        table = load_captions("cc3m", root / "cc3m", split)
        names = mi.load_cc3m_names(mi.cc3m_names_path(prune_dir, split))
        written = mi.load_mapped_indices(mi.mapped_indices_path(prune_dir, "cc3m", split), 4)
        row = {os.path.basename(table.paths[j]): j for j in range(len(table))}
        np.testing.assert_array_equal(written, ours[[row[n] for n in names]])  # the same ids, in listdir order
        np.testing.assert_array_equal(assignments.read_expert_ids(alone, split), ours)
        counts = [assignments.read_summary(d, split)["rows_per_expert"] for d in (alone, prune_dir)]
        assert counts[0] == counts[1]
    assert len(np.unique(assignments.read_expert_ids(prune_dir, "train"))) >= 2

    k = int(np.bincount(assignments.read_expert_ids(alone, "train")).argmax())
    out = root / "finetune"
    finetune.main([
        "--config", str(ROOT / "configs/aptp/finetuning/tiny.yaml"), f"pruning_dir={alone}", f"output_dir={out}",
        "--expert_id", str(k), "training.max_train_steps=1", "training.use_ema=false",
    ])  # fmt: skip
    reset_accelerate()
    routed = len(assignments.read_expert_rows(prune_dir, "train", k))
    assert f"{routed} training captions routed to expert {k}" in capsys.readouterr().out
    assert (out / "metrics.jsonl").is_file()
