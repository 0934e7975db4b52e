"""APTP data: CC3M and COCO 2014 loaders on miniature trees (a corrupt image, a caption without an image), the
COCO-30k sampler, transforms and tokens, and the prompt-embedding cache."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import aptp.router
from aptp.data import (
    CaptionedImages,
    ImageTransform,
    StringArray,
    coco30k,
    collate,
    embedding_cache_path,
    load_captions,
    load_cc3m,
    load_coco,
    prompt_embeddings,
    random_flip,
    tokenize,
)
from aptp.make_tiny import build_sentence_encoder, cc3m_image_name, tiny_clip_tokenizer, write_cc3m
from aptp.router import PromptEncoder
from diffcompress.errors import UserError


@pytest.fixture(scope="module")
def cc3m(tmp_path_factory):
    root = write_cc3m(tmp_path_factory.mktemp("cc3m"), train_rows=12, val_rows=4, size=24)
    (root / "training" / "3_12345.json").write_text("{}")  # a downloader's sidecar: not row 3's image
    return root


def coco_tree(root, corrupt_id=3, missing_id=5):
    """val2014: images 1..8 with 2-3 captions each (image 5 has no file, image 3 is corrupt); train2014: image 11."""
    rng = np.random.RandomState(0)
    for split, ids in (("val", range(1, 9)), ("train", [11])):
        (root / "images" / f"{split}2014").mkdir(parents=True)
        annotations = []
        for image_id in ids:
            path = root / "images" / f"{split}2014" / f"COCO_{split}2014_{image_id:012d}.jpg"
            if image_id == corrupt_id:
                path.write_bytes(b"\xff\xd8 truncated")
            elif image_id != missing_id:
                Image.fromarray(rng.randint(0, 255, (20, 30, 3), dtype=np.uint8)).save(path)
            for j in range(2 + image_id % 2):
                annotations.append(
                    {"image_id": image_id, "id": 100 * image_id + j, "caption": f" image {image_id} #{j}"}
                )
        rng.shuffle(annotations)  # the file's order, not the ids, decides which caption comes first
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"captions_{split}2014.json").write_text(json.dumps({"annotations": annotations}))
    return root


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return coco_tree(tmp_path_factory.mktemp("coco"))


def test_string_array():
    strings = ["a", "", "ünïcode ✓", "tab\tinside", "x" * 300]
    arr = StringArray(strings)
    assert len(arr) == 5 and list(arr) == strings and arr[2] == strings[2]
    assert list(arr.take([4, 0, 0])) == [strings[4], strings[0], strings[0]]
    assert len(StringArray([])) == 0


def test_cc3m_rows_match_images_by_row_prefix(cc3m):
    lines = (cc3m / "Train_GCC-training.tsv").read_text().splitlines()
    table = load_cc3m(cc3m, "train")
    assert table.missing == 1 and len(table) == 11  # row 2 has no image file
    assert table.ids.tolist() == [r for r in range(12) if r != 2]
    for i, row in enumerate(table.ids):
        caption, url = lines[row].split("\t")
        assert table.captions[i] == caption
        assert table.paths[i] == str(cc3m / "training" / cc3m_image_name(row, url))  # not the .json sidecar
    val = load_cc3m(cc3m, "validation")
    assert len(val) == 4 and val.missing == 0 and val.paths[0].startswith(str(cc3m / "validation"))
    assert len(load_captions("cc3m", cc3m, "train", max_samples=5)) == 5


def test_unreadable_image_is_skipped_and_named(cc3m):
    table = load_cc3m(cc3m, "train")
    ds = CaptionedImages(table, 16, tokenizer=tiny_clip_tokenizer(), embeddings=np.eye(11, 4))
    item = ds[1]  # row 1's file is an HTML error page
    assert item["index"] == 2 and len(item["unreadable"]) == 1
    index, reason = item["unreadable"][0]
    assert index == 1 and "UnidentifiedImageError" in reason and str(cc3m / "training" / "1_") in reason
    assert item["pixel_values"].shape == (3, 16, 16)
    assert item["input_ids"].shape == (77,) and item["prompt_embeds"].tolist() == [0, 0, 1, 0]  # the used row's
    batch = collate([ds[i] for i in range(4)])
    assert batch["index"].tolist() == [0, 2, 2, 3] and batch["unreadable"] == [item["unreadable"][0]]
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["input_ids"].shape == (4, 77)
    torch.testing.assert_close(batch["prompt_embeds"], torch.eye(11, 4)[[0, 2, 2, 3]].float())


def test_all_unreadable_fails_with_a_message(tmp_path):
    root = write_cc3m(tmp_path, train_rows=3, val_rows=0, flaws=False)
    for f in (root / "training").iterdir():
        f.write_bytes(b"")
    with pytest.raises(UserError, match="consecutive images from row 0 cannot be read"):
        CaptionedImages(load_cc3m(root), 8)[0]


def test_coco_one_row_per_caption(coco):
    annotations = json.loads((coco / "annotations/captions_val2014.json").read_text())["annotations"]
    table = load_coco(coco, "val")
    kept = [a for a in annotations if a["image_id"] != 5]
    assert table.missing == len(annotations) - len(kept) == 3
    assert table.ids.tolist() == [a["id"] for a in kept]  # the file's order
    assert list(table.captions) == [a["caption"].strip() for a in kept]
    assert table.paths[0] == str(coco / "images/val2014" / f"COCO_val2014_{kept[0]['image_id']:012d}.jpg")
    assert len(load_coco(coco, "train")) == 3 and load_coco(coco, "validation").ids.tolist() == table.ids.tolist()

    ds = CaptionedImages(table, 12)
    corrupt = [i for i in range(len(table)) if "000000000003" in table.paths[i]]
    item = ds[corrupt[0]]
    assert item["unreadable"][0][0] == corrupt[0] and item["index"] != corrupt[0]


def test_coco30k_sampler(coco):
    annotations = json.loads((coco / "annotations/captions_val2014.json").read_text())["annotations"]
    first = {}
    for a in annotations:
        if a["image_id"] != 5:
            first.setdefault(a["image_id"], a)
    images = list(first)  # 7 images with files, in the order they first appear
    picked = coco30k(coco, count=5)
    assert len(picked) == 5 and len(set(picked.paths)) == 5
    # pandas' DataFrame.sample(n, random_state=42) draws RandomState(42).permutation(n)[:count]
    expected = [images[i] for i in np.random.RandomState(42).permutation(len(images))[:5]]
    assert picked.ids.tolist() == [first[i]["id"] for i in expected]
    assert list(picked.captions) == [first[i]["caption"].strip() for i in expected]
    again = coco30k(coco, count=5)
    assert again.ids.tolist() == picked.ids.tolist() and list(again.paths) == list(picked.paths)
    assert coco30k(coco, count=5, seed=0).ids.tolist() != picked.ids.tolist()
    assert sorted(coco30k(coco, count=7).ids.tolist()) == sorted(a["id"] for a in first.values())
    with pytest.raises(UserError, match="only 7 images"):
        coco30k(coco, count=8)


def test_loader_errors(tmp_path, coco):
    with pytest.raises(FileNotFoundError, match="Train_GCC-training.tsv"):
        load_cc3m(tmp_path)
    with pytest.raises(FileNotFoundError, match="captions_train2014.json"):
        load_coco(tmp_path)
    with pytest.raises(UserError, match="expected one of cc3m, coco"):
        load_captions("laion", tmp_path)
    with pytest.raises(UserError, match="split 'test'"):
        load_coco(coco, "test")
    (tmp_path / "training").mkdir()
    (tmp_path / "Train_GCC-training.tsv").write_text("a cat\thttp://x/0.jpg\n")
    with pytest.raises(UserError, match="none of its 1 captions has an image file"):
        load_cc3m(tmp_path)


def test_transform_resize_crop_flip_range():
    # 48x24 (w x h): red left half, blue right half -> short side 16 (32x16), center crop: cols 8..23
    arr = np.zeros((24, 48, 3), dtype=np.uint8)
    arr[:, :24, 0] = 255
    arr[:, 24:, 2] = 255
    img = Image.fromarray(arr)
    x = ImageTransform(16)(img)
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x[:, :, :6], torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 16, 6))
    torch.testing.assert_close(x[:, :, 10:], torch.tensor([-1.0, -1.0, 1.0])[:, None, None].expand(3, 16, 6))
    batch = x[None].repeat(20, 1, 1, 1)
    drawn = random_flip(batch, torch.Generator().manual_seed(0))
    flips = [bool(d[0, 0, 0] < 0) for d in drawn]
    assert 0 < sum(flips) < 20  # the random flip happens, about half the time
    assert torch.equal(drawn, random_flip(batch, torch.Generator().manual_seed(0)))  # seeded


def test_transform_equals_torchvision():
    from torchvision import transforms

    rng = np.random.RandomState(0)
    for shape in [(37, 53, 3), (64, 40, 3), (31, 31, 3), (17, 90, 3)]:
        img = Image.fromarray(rng.randint(0, 255, shape, dtype=np.uint8))
        for r in (16, 24):
            bilinear = transforms.InterpolationMode.BILINEAR
            ref = transforms.Compose([transforms.Resize(r, interpolation=bilinear), transforms.CenterCrop(r),
                                      transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])  # fmt: skip
            torch.testing.assert_close(ImageTransform(r)(img), ref(img), atol=1e-6, rtol=0)
            flipped = transforms.RandomHorizontalFlip(p=1.0)(ref(img))  # after the crop, as diffusers' scripts do
            draws = random_flip(ImageTransform(r)(img)[None].repeat(8, 1, 1, 1), torch.Generator().manual_seed(0))
            assert all(torch.allclose(d, ref(img), atol=1e-6) or torch.allclose(d, flipped, atol=1e-6) for d in draws)


def test_tokenize_pads_and_truncates():
    tok = tiny_clip_tokenizer()
    ids = tokenize(tok, ["a cat", "x " * 200])
    assert ids.shape == (2, 77)
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    words = tok.convert_tokens_to_ids(["a</w>", "c", "a", "t</w>"])
    assert ids[0].tolist() == [bos, *words, eos] + [pad] * 71
    assert ids[1].tolist() == [bos] + tok.convert_tokens_to_ids(["x</w>"]) * 75 + [eos]  # truncated


def test_embedding_cache_is_computed_once(tmp_path, monkeypatch):
    encoder = str(build_sentence_encoder(tmp_path / "enc"))
    captions = StringArray(["a red cat", "photo of a dog", "a blue car on the street"])
    emb = prompt_embeddings(captions, encoder, tmp_path / "cache")
    path = embedding_cache_path(tmp_path / "cache", encoder, captions)
    assert path.is_file() and isinstance(emb, np.memmap) and emb.shape == (3, 16)
    torch.testing.assert_close(torch.from_numpy(np.array(emb)), PromptEncoder(encoder).embed(list(captions)))

    def no_encoder(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(aptp.router, "PromptEncoder", no_encoder)
    assert np.array_equal(prompt_embeddings(captions, encoder, tmp_path / "cache"), emb)
    other = StringArray(["a red cat", "photo of a dog"])
    assert embedding_cache_path(tmp_path / "cache", encoder, other) != path
    config = next((tmp_path / "enc" / "encoder").glob("config.json"))
    os.utime(config, ns=(1, 1))  # a changed encoder folder is another encoder
    assert embedding_cache_path(tmp_path / "cache", encoder, captions) != path
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]  # no part files left behind


# ------------------------------------------------------------------------------------------- issue 21: bad input


def test_cc3m_tsv_rows_split_on_newline_only_bom_and_empty_captions(tmp_path, capsys):
    from aptp.data import load_cc3m

    root = write_cc3m(tmp_path, train_rows=4, val_rows=0, flaws=False)
    tsv = root / "Train_GCC-training.tsv"
    lines = tsv.read_bytes().split(b"\n")[:4]
    lines[0] = b"\xef\xbb\xbf" + lines[0]  # a BOM
    lines[1] = b"a caption with a stray \r inside" + lines[1][lines[1].index(b"\t") :]
    lines[2] = b"  " + lines[2][lines[2].index(b"\t") :]  # empty caption
    tsv.write_bytes(b"\n".join(lines) + b"\n")
    table = load_cc3m(root)
    assert len(table) == 4 and table.ids.tolist() == [0, 1, 2, 3] and table.empty == 1
    assert not table.captions[0].startswith("\ufeff") and table.captions[1] == "a caption with a stray \r inside"
    assert table.captions[2] == "" and "1 of its 4 captions with an image are empty (rows 2)" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"data\.on_empty=fail"):
        load_cc3m(root, on_empty="fail")


def test_16_bit_images_are_scaled_not_clipped():
    gray = (np.arange(24 * 24).reshape(24, 24) % 256).astype(np.uint8)
    transform = ImageTransform(16)
    expected = transform(Image.fromarray(gray).convert("RGB"))
    assert torch.equal(transform(Image.fromarray(gray.astype(np.uint16) * 257)), expected)


def test_corrupt_embedding_cache_is_computed_again(tmp_path, capsys):
    from aptp.data import StringArray, _cache_ok

    path = tmp_path / "cache.npy"
    path.write_bytes(b"\x93NUMPY truncated")
    assert not _cache_ok(path, 3) and "computing it again" in capsys.readouterr().out
    np.save(path, np.zeros((2, 4), np.float32))
    assert not _cache_ok(path, 3)
    np.save(path, np.zeros((3, 4), np.float32))
    assert _cache_ok(path, 3)
    assert len(StringArray(["a"])) == 1
