"""APTP generation on a tiny world: APTPPipeline (routing, order, per-prompt seeds, fine-tuned vs fallback experts)
and `python -m aptp.generate` (per-expert FID sets with resume, routed prompts), against independent computations."""

import json

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image

from aptp import generate, prune
from aptp.assignments import load_router, read_expert_rows, read_router_info, write_assignments
from aptp.data import load_captions
from aptp.expert import load_expert, materialize, save_expert
from aptp.layout import ArchLayout
from aptp.macs import mac_table
from aptp.make_tiny import build_world
from aptp.pipeline import APTPPipeline
from aptp.router import PromptEncoder
from diffcompress.errors import UserError
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 2  # denoising steps: enough to run every part of the pipelines
# One anchor prompt per expert: the fixture makes expert k's code the predicted architecture of ANCHORS[k].
ANCHORS = [
    "a photo of a red cat sitting on the beach",
    "a drawing of a blue car running on the street",
    "a painting of a green horse standing on the mountain",
    "a picture of a yellow house in the city",
]
FINETUNED = (0, 1, 2)  # expert 3 has no fine-tuned folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny SD, encoder and CC3M set; a 2-step pruning run whose router is then sharpened; 'fine-tuned' experts 0-2;
    the validation captions assigned to experts (what aptp.filter_dataset writes)."""
    root = tmp_path_factory.mktemp("aptp-gen")
    tiny = build_world(root, train_rows=8, val_rows=10, size=40)
    encoder = tiny["encoder"]
    prune_dir = root / "pruning"
    prune.main([
        "--config", str(ROOT / "configs/aptp/pruning/tiny.yaml"), f"pretrained_model_name_or_path={root / 'sd'}",
        f"data.data_dir={root / 'cc3m'}", f"model.prompt_encoder={encoder}", f"output_dir={prune_dir}",
        f"data.embedding_cache_dir={root / 'cache'}", "training.max_train_steps=2", "training.pretrain_steps=1",
        "logging.logging_steps=1",
    ])  # fmt: skip
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()

    # Two steps leave the router near its init, where every prompt goes to one expert. Sharpen it: a larger,
    # centred predictor, and code k = the predicted architecture of ANCHORS[k], so each expert gets prompts.
    dense = UNet2DConditionModel.from_pretrained(str(root / "sd"), subfolder="unet")
    layout = ArchLayout.from_unet(dense)
    router = load_router(prune_dir, layout)
    prompt_encoder = PromptEncoder(str(encoder))
    val = load_captions("cc3m", root / "cc3m", "validation")
    with torch.no_grad():
        router.predictor.weight.mul_(20)
        mean = prompt_encoder.embed(list(val.captions) + ANCHORS).mean(0)
        router.predictor.bias.copy_(-router.predictor.weight @ mean)
        router.codebook.copy_(router.predict(prompt_encoder.embed(ANCHORS)))
    info = {k: v for k, v in read_router_info(prune_dir).items() if k != "depth_order"}
    train = list(load_captions("cc3m", root / "cc3m", "train").captions) + list(val.captions)
    table = mac_table(dense.config, 32 // 2, 77, layout)
    prune.write_results(prune_dir, router, table, dict(dense.config), info, prompt_encoder.embed(train))
    experts = json.loads((prune_dir / "experts.json").read_text())["experts"]
    assert len({tuple(e["code"]) for e in experts}) == 4  # four distinct architectures

    torch.manual_seed(0)
    for k in FINETUNED:  # "fine-tuned": the sliced dense weights, perturbed
        expert = materialize(dense, experts[k]["code"], layout)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.05 * torch.randn_like(p))
        save_expert(expert, experts[k]["code"], prune_dir / "finetuning" / f"expert_{k}" / "expert")
    val_experts = router.route(prompt_encoder.embed(list(val.captions))).numpy()
    write_assignments(prune_dir, "validation", val_experts, 4, dataset="cc3m", data_dir=str(root / "cc3m"))
    return dict(root=root, prune_dir=prune_dir, encoder=encoder, experts=experts, val=val, val_experts=val_experts)


@pytest.fixture(scope="module")
def pipe(world):
    return APTPPipeline.from_pretrained(world["prune_dir"])


def hand_built(world, unet: UNet2DConditionModel, prompt: str, seed: int) -> np.ndarray:
    """The image a plain diffusers pipeline of ``unet`` draws: PNDM (PLMS steps), noise from a CPU generator."""
    sd = StableDiffusionPipeline.from_pretrained(world["root"] / "sd", unet=unet, safety_checker=None)
    sd.scheduler = PNDMScheduler.from_config(sd.scheduler.config, skip_prk_steps=True)
    sd.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    return sd(prompt, num_inference_steps=STEPS, generator=generator, output_type="np").images[0]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


# ----------------------------------------------------------------------------------------------------
# APTPPipeline


def test_pipeline_routes_each_prompt_and_keeps_order(world, pipe):
    prompts = [ANCHORS[3], world["val"].captions[0], ANCHORS[0], ANCHORS[2], ANCHORS[1], world["val"].captions[5]]
    out = pipe(prompts, num_inference_steps=STEPS, seed=7, batch_size=2, output_type="np", progress=False)

    layout = ArchLayout.from_config(json.loads((world["root"] / "sd/unet/config.json").read_text()))
    router = load_router(world["prune_dir"], layout)
    expected = router.route(PromptEncoder(str(world["encoder"])).embed(prompts)).tolist()
    assert out.experts == expected
    assert [out.experts[i] for i in (2, 4, 3, 0)] == [0, 1, 2, 3]  # each anchor goes to its own expert
    assert out.macs == [world["experts"][k]["macs"] for k in expected]
    assert len(set(out.macs)) > 1 and len(set(out.experts)) < len(prompts)  # some batch holds two prompts
    assert out.images.shape == (6, 32, 32, 3) and out.images.dtype == np.float32

    # Alone (with the seed it had in the batch: seed + its index) each prompt gives the same expert and image.
    for i, prompt in enumerate(prompts):
        alone = pipe(prompt, num_inference_steps=STEPS, seed=[7 + i], batch_size=1, output_type="np", progress=False)
        assert alone.experts == [out.experts[i]]
        np.testing.assert_allclose(alone.images[0], out.images[i], atol=1e-4, rtol=0)
    for i in range(1, len(prompts)):  # distinct prompts and seeds draw distinct images: the check above can fail
        assert np.abs(out.images[i] - out.images[0]).max() > 0.1

    as_pil = pipe(prompts[:2], num_inference_steps=STEPS, seed=7, progress=False)
    assert [im.size for im in as_pil.images] == [(32, 32)] * 2
    np.testing.assert_allclose(np.asarray(as_pil.images[1]) / 255, out.images[1], atol=1 / 255 + 1e-4, rtol=0)


@pytest.mark.slow  # a whole pipeline end to end
def test_finetuned_folders_are_used_and_missing_ones_fall_back(world, pipe, tmp_path, capsys):
    code = world["experts"][0]["code"]
    finetuned, _ = load_expert(world["prune_dir"] / "finetuning/expert_0/expert")
    dense = UNet2DConditionModel.from_pretrained(str(world["root"] / "sd"), subfolder="unet")
    out = pipe(ANCHORS[0], num_inference_steps=STEPS, seed=5, output_type="np", progress=False)
    assert out.experts == [0]
    np.testing.assert_allclose(out.images[0], hand_built(world, finetuned, ANCHORS[0], 5), atol=1e-5, rtol=0)

    (tmp_path / "none").mkdir()  # no expert_<K>/expert inside: every expert falls back to the sliced dense UNet
    fallback = APTPPipeline.from_pretrained(world["prune_dir"], tmp_path / "none")
    capsys.readouterr()
    sliced = fallback(ANCHORS[0], num_inference_steps=STEPS, seed=5, output_type="np", progress=False)
    assert "warning: expert 0 has no fine-tuned folder" in capsys.readouterr().err
    np.testing.assert_allclose(sliced.images[0], hand_built(world, materialize(dense, code), ANCHORS[0], 5), atol=1e-5)
    assert np.abs(sliced.images[0] - out.images[0]).max() > 0.05  # the fine-tuned weights made a difference

    # Expert 3 has no folder in the default layout either; the fine-tuned ones load from theirs.
    for k in range(4):
        unet = pipe.expert_unet(k)
        reference = materialize(dense, world["experts"][k]["code"])
        if k in FINETUNED:
            reference, _ = load_expert(world["prune_dir"] / f"finetuning/expert_{k}/expert")
        for (name, a), (_, b) in zip(unet.state_dict().items(), reference.state_dict().items(), strict=True):
            assert torch.equal(a, b), (k, name)


# ----------------------------------------------------------------------------------------------------
# python -m aptp.generate


def test_generate_per_expert_writes_its_rows_and_resumes(world, pipe, tmp_path, capsys):
    counts = np.bincount(world["val_experts"], minlength=4)
    k = int(counts.argmax())
    assert counts[k] >= 2
    rows = read_expert_rows(world["prune_dir"], "validation", k)
    np.testing.assert_array_equal(rows, np.flatnonzero(world["val_experts"] == k))
    val = world["val"]
    names = {f"{val.paths[r].rsplit('/', 1)[1]}.png": r for r in rows}  # CC3M files have no extension
    out = tmp_path / "out"
    args = ["--pruning_dir", str(world["prune_dir"]), "--expert_id", str(k), "--num_inference_steps", str(STEPS)]
    args += ["--batch_size", "2", "--output_dir", str(out), "--save_references"]
    generate.main(args)
    n = len(rows)
    printed = capsys.readouterr().out
    assert f"expert {k}: {n} of its {n} validation captions have images in {out} ({n} drawn now, 0 were" in printed
    assert f"references: {n} images in {tmp_path / 'out_references'}" in printed
    prompts = {name: val.captions[r] for name, r in names.items()}

    assert sorted(p.name for p in out.glob("*.png")) == sorted(names)
    assert json.loads((out / "prompts.json").read_text()) == prompts
    refs = tmp_path / "out_references"
    assert sorted(p.name for p in refs.iterdir()) == sorted(names)
    for name, r in names.items():
        image = Image.open(out / name)
        assert image.size == (256, 256) and image.mode == "RGB"
        # the image of row r: its expert, seed 43 + r, resized to 256 (bicubic)
        drawn = pipe.generate(k, [val.captions[r]], [torch.Generator().manual_seed(43 + int(r))], STEPS)
        expected = Image.fromarray((drawn[0] * 255).round().astype(np.uint8)).resize((256, 256), Image.BICUBIC)
        assert np.abs(pixels(out / name) - np.asarray(expected, dtype=np.int16)).max() <= 1
        reference = Image.open(val.paths[r]).convert("RGB").resize((256, 256), Image.BICUBIC)  # square 40 px
        np.testing.assert_array_equal(pixels(refs / name), np.asarray(reference, dtype=np.int16))

    # A re-run skips what exists; a resumed run draws the missing image again, identically.
    first = sorted(names)[0]
    before = {p.name: (p.stat().st_mtime_ns, pixels(p)) for p in out.glob("*.png")}
    (out / first).unlink()
    generate.main(args)
    assert f"{n} of its {n} validation captions have images in {out} (1 drawn now, {n - 1} were there)" in (
        capsys.readouterr().out
    )
    for p in out.glob("*.png"):
        assert (p.stat().st_mtime_ns == before[p.name][0]) == (p.name != first)
        assert np.abs(pixels(p) - before[p.name][1]).max() <= 1

    # References of other shapes: short side to 256, then the centre crop (60x40 -> 384x256 -> columns 64..320).
    wide = Image.fromarray(np.random.RandomState(0).randint(0, 256, (40, 60, 3), dtype=np.uint8))
    expected = wide.resize((384, 256), Image.BICUBIC).crop((64, 0, 320, 256))
    np.testing.assert_array_equal(np.asarray(generate.square(wide, 256)), np.asarray(expected))


def test_generate_routed(world, pipe, tmp_path, capsys):
    prompts = [ANCHORS[1], ANCHORS[3], world["val"].captions[2]]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    (tmp_path / "prompts.txt").write_text("\n".join(["", *prompts, "  "]) + "\n")
    assert generate.read_prompts(str(tmp_path / "prompts.txt")) == prompts
    out = tmp_path / "routed"
    generate.main([
        "--pruning_dir", str(world["prune_dir"]), "--prompts", str(tmp_path / "prompts.json"), "--output_dir", str(out),
        "--num_inference_steps", str(STEPS),
    ])  # fmt: skip
    printed = capsys.readouterr().out
    expected = pipe(prompts, num_inference_steps=STEPS, seed=43, output_type="np", progress=False)
    assert expected.experts[:2] == [1, 3]
    routing = json.loads((out / "routing.json").read_text())
    assert [r["expert"] for r in routing] == expected.experts
    assert [r["macs"] for r in routing] == [world["experts"][k]["macs"] for k in expected.experts]
    assert [r["image"] for r in routing] == ["00000.png", "00001.png", "00002.png"]
    assert json.loads((out / "prompts.json").read_text()) == dict(zip(["00000.png", "00001.png", "00002.png"], prompts))
    gmacs = world["experts"][3]["macs"] / 1e9
    assert f"00001.png       3 {gmacs:>8.4f}  {ANCHORS[3]}" in printed
    for i in range(3):
        image = pixels(out / f"{i:05d}.png")
        assert image.shape == (32, 32, 3)
        assert np.abs(image - np.round(expected.images[i] * 255)).max() <= 1


def test_bad_input_is_one_line(world, pipe, tmp_path, capsys):
    d = str(world["prune_dir"])
    folder = world["prune_dir"] / "finetuning/expert_0/expert"
    no_fallback = ["--pruning_dir", d, "--expert_id", "3", "--missing_expert", "error"]
    cases = [
        (lambda: generate.main(["--pruning_dir", d, "--expert_id", "9"]), r"expert 9: .* experts 0\.\.3"),
        (lambda: pipe.generate(9, ["a cat"], [torch.Generator()]), r"expert 9: .* experts 0\.\.3"),
        (lambda: APTPPipeline.from_pretrained(d, {7: folder}), r"expert 7: .* experts 0\.\.3"),
        (lambda: APTPPipeline.from_pretrained(d, missing_expert="error").expert_unet(3), "expert 3 has no fine-tuned"),
        (lambda: generate.main([*no_fallback, "--output_dir", str(tmp_path / "a")]), "expert 3 has no fine-tuned"),
        (lambda: APTPPipeline.from_pretrained(d, {1: folder}).expert_unet(1), "holds another architecture"),
        (lambda: APTPPipeline.from_pretrained(d, {1: tmp_path / "nowhere"}), "nowhere' does not exist"),
        (lambda: APTPPipeline.from_pretrained(d, folder), "is one expert's folder"),
        (lambda: generate.main(["--pruning_dir", d, "--prompts", str(tmp_path / "x.txt")]), "does not exist"),
        (lambda: generate.main(["--pruning_dir", d, "--expert_id", "0", "--experts_dir", d]), "only with --prompts"),
    ]
    (tmp_path / "empty.txt").write_text("\n\n")
    cases.append((lambda: generate.main(["--pruning_dir", d, "--prompts", str(tmp_path / "empty.txt")]), "no prompts"))
    clash = tmp_path / "clash"
    clash.mkdir()
    (clash / "prompts.json").write_text(json.dumps({"00000.png": "another prompt"}))
    (tmp_path / "one.txt").write_text("a cat\n")
    routed = ["--pruning_dir", d, "--prompts", str(tmp_path / "one.txt"), "--output_dir", str(clash)]
    cases.append((lambda: generate.main(routed), "1 of its images were drawn for other prompts"))
    for call, message in cases:
        with pytest.raises(UserError, match=message) as e:
            call()
        assert "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:  # counts are checked by the argument parser
        generate.main(["--pruning_dir", d, "--expert_id", "0", "--batch_size", "0"])
    assert e.value.code == 2 and "argument --batch_size: expected a positive integer" in capsys.readouterr().err


@pytest.mark.slow  # a whole pipeline end to end
def test_generate_coco30k_routed_and_scored(world, pipe, tmp_path, capsys, monkeypatch):
    """`--coco30k`: the drawn captions routed to their experts, images named after the COCO images, resized as the
    authors did, their references beside them; aptp.evaluate reads both folders (and the COCO folder itself)."""
    from aptp import evaluate
    from aptp.data import coco30k, resize_like_cv2
    from aptp.metrics import list_images, load_npz, load_prompts
    from tests.test_aptp_coco30k import pooled, write_coco

    coco = tmp_path / "coco"
    write_coco(coco, [*ANCHORS, *list(world["val"].captions)[:6]], per_image=(2, 1, 3))
    drawn = coco30k(coco, 8)
    names = [f"{p.rsplit('/', 1)[1][:-4]}.png" for p in drawn.paths]  # COCO_val2014_<id>.png
    out, refs = tmp_path / "coco30k", tmp_path / "coco30k_references"
    args = ["--pruning_dir", str(world["prune_dir"]), "--coco30k", str(coco), "--max_samples", "8", "--output_dir",
            str(out), "--num_inference_steps", str(STEPS), "--batch_size", "3", "--size", "24", "--save_references",
            "--reference_preprocess", "authors"]  # fmt: skip
    generate.main(args)
    printed = capsys.readouterr().out
    assert f"8 routed images in {out}" in printed and f"references: 8 images in {refs}" in printed
    assert f"score them: python -m aptp.evaluate {out} --ref-dir {refs} --reference_preprocess authors" in printed

    assert sorted(p.name for p in out.glob("*.png")) == sorted(names)
    assert json.loads((out / "prompts.json").read_text()) == dict(zip(names, drawn.captions))
    routing = json.loads((out / "routing.json").read_text())
    experts = pipe.route(list(drawn.captions))
    assert [r["image"] for r in routing] == names and [r["expert"] for r in routing] == experts
    assert len(set(experts)) > 1
    for i, (name, caption, path) in enumerate(zip(names, drawn.captions, drawn.paths)):
        # image i: its expert, seed 43 + i (its place in the draw), 32 px -> 24 px with cv2's bilinear arithmetic
        image = pipe.generate(experts[i], [caption], [torch.Generator().manual_seed(43 + i)], STEPS)[0]
        expected = resize_like_cv2((image * 255).round().astype(np.uint8), 24, 24)
        assert np.abs(pixels(out / name) - expected).max() <= 1
        reference = resize_like_cv2(np.asarray(Image.open(path).convert("RGB")), 24, 24)  # whole image, no crop
        np.testing.assert_array_equal(pixels(refs / name), reference)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    generate.main(args)  # a re-run draws nothing
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == before
    capsys.readouterr()

    monkeypatch.setattr("aptp.evaluate.inception_extractor", lambda weights, device: (pooled, "test: 2x2 pools"))
    prompts = dict(zip(names, drawn.captions))  # what CLIP score pairs the images with
    assert load_prompts(out / "prompts.json", list_images(out)) == [prompts[p.name] for p in list_images(out)]
    common = ["--metrics", "fid", "--resolution", "24", "--reference_preprocess", "authors", "--num-workers", "0"]
    from_refs = evaluate.main([str(out), "--ref-dir", str(refs), *common, "--out", str(tmp_path / "a.json")])
    from_coco = evaluate.main([str(out), "--coco30k", str(coco), "--max_samples", "8", *common])
    assert from_refs["fid"]["num_images"] == from_coco["fid"]["num_reference"] == 8
    # the references generate wrote are the COCO images as evaluate --coco30k prepares them: the same statistics
    a, _ = load_npz(tmp_path / "fid-reference-coco30k_references-authors.npz", "stats")
    b, _ = load_npz(out / "fid-reference-coco30k-8-authors.npz", "stats")
    np.testing.assert_allclose(a["mu"], b["mu"], rtol=1e-6)
    assert from_refs["fid"]["value"] == pytest.approx(from_coco["fid"]["value"], rel=1e-6, abs=1e-9)
