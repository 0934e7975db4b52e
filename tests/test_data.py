"""diffcompress.data: the ADM center crop, the image folder index, both feature layouts and packing."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from diffcompress.data import FeatureDataset, ImageFolderIndex, center_crop_arr, pack_features, to_model_range

# ------------------------------------------------------------------------------------- center crop


def test_center_crop_box_halves_then_crops_the_middle():
    # 512x256 with a pattern constant on 4x4 blocks: two exact BOX halvings give the block values, no bicubic
    # step is needed (short side already 64), and the crop keeps columns 32..95 of the 128-wide result.
    by, bx = np.meshgrid(np.arange(64), np.arange(128), indexing="ij")
    blocks = np.stack([bx * 2 % 256, by * 4, (bx * 3 + by * 7) % 256], axis=-1).astype(np.uint8)
    image = Image.fromarray(blocks.repeat(4, axis=0).repeat(4, axis=1))
    assert image.size == (512, 256)
    out = center_crop_arr(image, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, blocks[:, 32:96])


def test_center_crop_bicubic_step_and_rounding():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)  # 20 wide, 12 high; 12 < 2 * 8: no halving
    out = center_crop_arr(Image.fromarray(arr), 8)
    resized = np.asarray(Image.fromarray(arr).resize((13, 8), Image.BICUBIC))  # round(20 * 8 / 12) = 13
    np.testing.assert_array_equal(out, resized[:, 2:10])  # (13 - 8) // 2 = 2
    # the short side exactly 2x the target still halves (>=), after which no resize is needed
    arr = rng.integers(0, 256, (32, 33, 3), dtype=np.uint8)
    out = center_crop_arr(Image.fromarray(arr), 16)
    np.testing.assert_array_equal(out, np.asarray(Image.fromarray(arr).resize((16, 16), Image.BOX)))


def test_center_crop_any_mode_to_rgb():
    gray = Image.fromarray(np.arange(100, dtype=np.uint8).reshape(10, 10), mode="L")
    out = center_crop_arr(gray, 10)
    assert out.shape == (10, 10, 3)
    np.testing.assert_array_equal(out[..., 0], np.arange(100).reshape(10, 10))
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    rgba = Image.new("RGBA", (10, 10), (10, 20, 30, 40))
    assert center_crop_arr(rgba, 10)[3, 3].tolist() == [10, 20, 30]


def test_to_model_range():
    arr = np.array([[[0, 255, 51]]], dtype=np.uint8)
    x = to_model_range(arr)
    assert x.shape == (3, 1, 1)
    assert torch.allclose(x.flatten(), torch.tensor([-1.0, 1.0, 51 / 127.5 - 1]))


# --------------------------------------------------------------------------------------- the index


def test_image_folder_index_order_and_labels(tmp_path):
    for rel in ["b/z.png", "b/a.JPEG", "a/sub/x.webp", "a/m.jpg", "c/1.Png", "c/10.bmp", "c/2.jpeg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.png").write_bytes(b"")
    (tmp_path / "a" / ".cache").mkdir()
    (tmp_path / "a" / ".cache" / "x.png").write_bytes(b"")
    (tmp_path / "root.png").write_bytes(b"")
    index = ImageFolderIndex(tmp_path)
    assert index.classes == ["a", "b", "c"]
    assert index.class_to_idx == {"a": 0, "b": 1, "c": 2}
    got = [(p.relative_to(tmp_path).as_posix(), y) for p, y in index.samples]
    assert got == [
        ("a/m.jpg", 0), ("a/sub/x.webp", 0), ("b/a.JPEG", 1), ("b/z.png", 1),
        ("c/1.Png", 2), ("c/10.bmp", 2), ("c/2.jpeg", 2),
    ]  # fmt: skip
    assert len(index) == 7 and index[2] == (tmp_path / "b" / "a.JPEG", 1)


def test_image_folder_index_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        ImageFolderIndex(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "loose.png").write_bytes(b"")
    with pytest.raises(ValueError, match="has no class folders") as e:
        ImageFolderIndex(tmp_path)
    assert str(tmp_path) in str(e.value)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "readme.txt").write_text("")
    with pytest.raises(ValueError, match="has 1 class folders but no images") as e:
        ImageFolderIndex(tmp_path)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------- per-file layout


def write_files(root, arrays, labels, name="imagenet256"):
    feats, labs = root / f"{name}_features", root / f"{name}_labels"
    feats.mkdir(parents=True)
    labs.mkdir(parents=True)
    for stem, (x, y) in zip(range(len(arrays)), zip(arrays, labels)):
        np.save(feats / f"{stem}.npy", x)
        np.save(labs / f"{stem}.npy", y)
    return root


def test_files_layout_two_views_numeric_order(tmp_path):
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((2, 4, 3, 3)).astype(np.float32) for _ in range(12)]
    write_files(tmp_path, arrays, [np.array([i % 5]) for i in range(12)])
    ds = FeatureDataset(tmp_path)
    assert (ds.layout, ds.views, ds.latent_shape, len(ds)) == ("files", 2, (4, 3, 3), 12)
    x, y = ds[10]  # file 10.npy, not the 10th name in text order ("2.npy")
    assert x.dtype == torch.float32 and x.shape == (2, 4, 3, 3)
    assert torch.equal(x, torch.from_numpy(arrays[10])) and y == 0
    assert ds.num_classes == 5  # no manifest: largest label + 1
    (tmp_path / "manifest.json").write_text(json.dumps({"num_classes": 1000}))
    assert FeatureDataset(tmp_path).num_classes == 1000


@pytest.mark.parametrize("shape,views", [((1, 2, 4, 2, 2), 2), ((1, 4, 2, 2), 1), ((4, 2, 2), 1), ((2, 4, 2, 2), 2)])
def test_files_layout_shape_variants(tmp_path, shape, views):
    rng = np.random.default_rng(2)
    arrays = [rng.standard_normal(shape).astype(np.float16) for _ in range(3)]
    write_files(tmp_path, arrays, [np.array(7), np.array([3]), np.array([[1]])])  # scalar, [1], [1, 1]
    ds = FeatureDataset(tmp_path)
    assert (ds.views, ds.latent_shape) == (views, (4, 2, 2))
    for i in range(3):
        x, y = ds[i]
        assert x.shape == (views, 4, 2, 2) and x.dtype == torch.float32
        np.testing.assert_array_equal(x.numpy(), arrays[i].astype(np.float32).reshape(views, 4, 2, 2))
        assert y == [7, 3, 1][i]


def test_files_layout_other_resolution_and_several_sets(tmp_path):
    write_files(tmp_path, [np.ones((2, 4, 8, 8), np.float32)], [np.array([2])], name="imagenet512")
    ds = FeatureDataset(tmp_path)
    assert ds.latent_shape == (4, 8, 8) and ds[0][1] == 2
    write_files(tmp_path, [np.ones((2, 4, 4, 4), np.float32)], [np.array([1])], name="imagenet256")
    with pytest.raises(ValueError, match=r"several feature sets \(imagenet256, imagenet512\)"):
        FeatureDataset(tmp_path)
    assert FeatureDataset(tmp_path, name="imagenet256").latent_shape == (4, 4, 4)


def test_files_layout_mismatch_is_one_line(tmp_path):
    x = np.zeros((2, 4, 2, 2), np.float32)
    write_files(tmp_path, [x, x, x, x], [np.array([0])] * 4)
    (tmp_path / "imagenet256_labels" / "2.npy").unlink()
    (tmp_path / "imagenet256_labels" / "3.npy").unlink()
    np.save(tmp_path / "imagenet256_labels" / "9.npy", np.array([0]))
    with pytest.raises(ValueError) as e:
        FeatureDataset(tmp_path)
    msg = str(e.value)
    assert "4 feature files, 3 label files" in msg
    assert "features without labels, e.g. ['2', '3']" in msg and "labels without features, e.g. ['9']" in msg
    assert str(tmp_path) in msg and "\n" not in msg


def test_files_layout_mixed_shapes_raise_on_read(tmp_path):
    write_files(tmp_path, [np.zeros((2, 4, 2, 2), np.float32), np.zeros((4, 2, 2), np.float32)], [0, 1])
    ds = FeatureDataset(tmp_path)
    with pytest.raises(ValueError, match=r"1\.npy' has 1 view\(s\) of \[4, 2, 2\], the others 2"):
        ds[1]


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        FeatureDataset(tmp_path / "absent")
    assert str(tmp_path / "absent") in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        FeatureDataset(tmp_path)  # exists, holds nothing
    msg = str(e.value)
    assert msg.startswith(f"no features found in {str(tmp_path)!r}")
    assert "imagenet256_features" in msg and "features.npy" in msg and "run extract_features.py first" in msg
    assert "\n" not in msg
    (tmp_path / "imagenet256_features").mkdir()
    (tmp_path / "imagenet256_labels").mkdir()
    with pytest.raises(ValueError, match="the folder has no .npy files") as e:
        FeatureDataset(tmp_path)
    assert str(tmp_path / "imagenet256_features") in str(e.value)


# ----------------------------------------------------------------------------------------- packed layout


def test_packed_layout_reads_float16_memmap(tmp_path):
    rng = np.random.default_rng(3)
    feats = rng.standard_normal((5, 2, 4, 2, 2)).astype(np.float16)
    np.save(tmp_path / "features.npy", feats)
    np.save(tmp_path / "labels.npy", np.array([4, 0, 1, 2, 3], dtype=np.int64))
    ds = FeatureDataset(tmp_path)
    assert (ds.layout, ds.views, ds.latent_shape, len(ds), ds.num_classes) == ("packed", 2, (4, 2, 2), 5, 5)
    assert isinstance(ds.features, np.memmap)
    x, y = ds[3]
    assert x.dtype == torch.float32 and torch.equal(x, torch.from_numpy(feats[3].astype(np.float32))) and y == 2

    np.save(tmp_path / "labels.npy", np.arange(4))
    with pytest.raises(ValueError, match="5 features, 4 labels") as e:
        FeatureDataset(tmp_path)
    assert "\n" not in str(e.value)
    np.save(tmp_path / "features.npy", feats[:, 0])
    with pytest.raises(ValueError, match=r"has shape \[5, 4, 2, 2\]: expected \[N, V, C, H, W\]"):
        FeatureDataset(tmp_path)


@pytest.mark.parametrize("single_view", [False, True])
def test_pack_features_round_trip(tmp_path, single_view):
    rng = np.random.default_rng(4)
    shape = (4, 2, 2) if single_view else (2, 4, 2, 2)
    arrays = [rng.standard_normal(shape).astype(np.float32) for _ in range(11)]
    src = write_files(tmp_path / "src", arrays, [np.array([i % 3]) for i in range(11)])
    (src / "imagenet256_features" / "5.npy").unlink()  # a gap, as a skipped image leaves
    (src / "imagenet256_labels" / "5.npy").unlink()
    (src / "manifest.json").write_text(json.dumps({"num_classes": 3, "vae": "ema"}))
    files = FeatureDataset(src)

    out = pack_features(src, tmp_path / "p32", dtype="float32")
    packed = FeatureDataset(out)
    assert packed.layout == "packed" and len(packed) == len(files) == 10 and packed.views == files.views
    for i in range(len(files)):
        (a, ya), (b, yb) = files[i], packed[i]
        assert torch.equal(a, b) and ya == yb
    np.testing.assert_array_equal(np.load(out / "indices.npy"), [0, 1, 2, 3, 4, 6, 7, 8, 9, 10])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vae"] == "ema" and manifest["layout"] == "packed" and manifest["count"] == 10
    assert manifest["packed_dtype"] == "float32" and manifest["num_classes"] == 3

    pack_features(src)  # default: float16, beside the files; auto-detection then prefers the packed copy
    half = FeatureDataset(src)
    assert half.layout == "packed" and half.features.dtype == np.float16
    assert FeatureDataset(src, layout="files").layout == "files"
    for i in range(len(files)):
        assert torch.equal(half[i][0], files[i][0].half().float()) and half[i][1] == files[i][1]
    assert json.loads((src / "manifest.json").read_text())["layout"] == "files+packed"
    assert not list(src.glob(".*tmp")) and not list((tmp_path / "p32").glob(".*tmp"))


# ------------------------------------------------------------------------------------------- issue 21: bad input


def test_to_rgb8_scales_16_bit_and_refuses_float():
    from diffcompress.data import to_rgb8
    from diffcompress.errors import DataError

    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    for sixteen in (gray.astype(np.uint16) * 257, gray.astype(np.uint16) << 8):  # both 8 -> 16-bit conventions
        out = np.asarray(to_rgb8(Image.fromarray(sixteen)))  # mode I;16
        assert out.dtype == np.uint8 and np.array_equal(out, np.repeat(gray[..., None], 3, axis=2))
    wide = Image.fromarray(gray.astype(np.int32) * 257)  # mode I
    assert np.array_equal(np.asarray(to_rgb8(wide))[..., 0], gray)
    with pytest.raises(DataError, match=r"'x\.tif' has 32-bit integer pixels in 0\.\.16515072"):
        to_rgb8(Image.fromarray(gray.astype(np.int32) << 16), "x.tif")
    with pytest.raises(DataError, match=r"'f\.tif' has 32-bit float pixels"):
        to_rgb8(Image.fromarray(gray.astype(np.float32)), "f.tif")


def test_labels_integral_floats_accepted_others_refused():
    from diffcompress.data import check_labels
    from diffcompress.errors import DataError

    assert check_labels(np.array([0.0, 3.0]), "l.npy", (4, "--num-classes 4")).tolist() == [0, 3]
    for bad, words in (([3.7], "3.7"), ([np.nan], "nan"), ([True], "bool"), ([4], "0..3"), ([-1], ">= 0")):
        with pytest.raises(DataError, match=re.escape(words)):
            check_labels(np.array(bad), "l.npy", (4, "--num-classes 4"))


def test_worker_error_is_one_line_naming_the_file():
    from diffcompress.errors import DataError

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise DataError(f"features file '{i}.npy' is broken")

    loader = torch.utils.data.DataLoader(Broken(), num_workers=1)
    it = iter(loader)
    with pytest.raises(DataError) as e:
        next(it)
    it._shutdown_workers()
    assert str(e.value) == "features file '0.npy' is broken (DataLoader worker process 0)"


def test_empty_class_folders_keep_their_labels(tmp_path):
    from diffcompress.errors import UserError

    for c in ("a", "b", "c"):
        (tmp_path / c).mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "c" / "x.png")
    index = ImageFolderIndex(tmp_path)
    assert index.empty_classes == ["a", "b"] and index.samples[0][1] == 2
    assert "2 of the 3 class folders" in index.empty_classes_line() and "(e.g. a, b)" in index.empty_classes_line()
    with pytest.raises(UserError, match="--on-empty fail"):
        index.empty_classes_line("fail")
