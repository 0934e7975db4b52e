"""The captioned digits and ``demo_aptp.py``: rendering and its inverse, captions and their parsing, the tokenizer and
the bag-of-concepts sentence encoder, the shipped teacher (loads strictly, draws the prompted digits in the prompted
colours), and ``--quick`` end to end through the real stage commands with a report whose every row is filled."""

import json
import re

import numpy as np
import pytest
from diffusers import UNet2DConditionModel

import demo_aptp
from aptp import digits_world as world
from aptp.router import PromptEncoder
from diffcompress import digits
from diffcompress.checkpoint import load_file
from diffcompress.errors import UserError

from .conftest import ROOT

TEACHER = ROOT / "assets" / "aptp-digits"
# The shipped teacher's samples of the 40 prompts below (4 per digit, random colours and wording) must be read as the
# prompted digit, and show the prompted colours, at least this often. Measured: digits 1.000 on these 40 prompts and
# 0.925 on the same noise with every digit shifted by one (0.953 on all 359 validation captions: README card);
# colours 1.000. Chance is 0.10 for the digit and 1/12 for the colours. The bounds leave room for float differences
# across CPUs and torch builds, while a teacher that ignored its prompt, or any broken link (weights, tokenizer, VAE
# scaling, scheduler, the ink-map inversion), lands near chance.
TEACHER_MIN_DIGIT_ACCURACY, TEACHER_MIN_COLOUR_ACCURACY = 0.8, 0.8
NUMBER = r"-?\d+(\.\d+)?"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    digits.prepare(root)
    return root


@pytest.fixture(scope="module")
def classifier(data):
    return digits.Evaluator.build(data, seed=0, epochs=10).classifier


def prompts_of_every_digit(per_digit: int = 4, seed: int = 0) -> tuple[list[str], list[world.Content]]:
    rng = np.random.default_rng(seed)
    contents = [world.random_content(d, rng) for d in range(10) for _ in range(per_digit)]
    return [world.make_caption(c, rng) for c in contents], contents


# ---------------------------------------------------------------------------------------------------------------
# Captions, pixels, colours


def test_captions_name_their_content_in_every_template():
    rng = np.random.default_rng(0)
    for digit in range(10):
        for template in world.TEMPLATES:
            content = world.random_content(digit, rng)
            for number in (world.DIGIT_WORDS[digit], str(digit)):
                caption = template.format(digit=number, ink=content.ink, background=content.background)
                assert world.parse_caption(caption) == content, caption
    assert world.parse_caption("The NUMBER 7 in Red on Grey paper") == world.Content(7, "red", "gray")
    for bad in ("a red seven", "a red seven and a 3 on black", "a red blue seven on black"):
        with pytest.raises(UserError, match="expected one digit"):
            world.parse_caption(bad)


def test_render_colours_each_pixel_and_ink_share_inverts_it():
    rng = np.random.default_rng(0)
    intensity = rng.random((12, 8, 8)).astype(np.float32)
    contents = [world.random_content(d % 10, rng) for d in range(12)]
    images = world.render(intensity, contents, size=8)  # same size: bicubic resampling is the identity
    for img, a, c in zip(images, intensity, contents):
        ink, bg = np.array(world.INKS[c.ink], float), np.array(world.BACKGROUNDS[c.background], float)
        np.testing.assert_array_equal(img, np.round(bg + a[..., None] * (ink - bg)).astype(np.uint8))
        back = world.ink_share(img[None], [c])[0]
        tolerance = 0.5 * np.sqrt(3) / np.linalg.norm(ink - bg)  # uint8 rounding, projected on the colour segment
        assert np.abs(back - a).max() <= tolerance + 1e-6
    flat = np.full((12, 8, 8), 0.3, np.float32)  # 32 px: a flat ink share comes back as it was, up to uint8 rounding
    pixels = world.digit_pixels(world.render(flat, contents), contents)
    assert pixels.shape == (12, 8, 8, 3) and pixels.dtype == np.uint8 and (pixels[..., 0] == pixels[..., 2]).all()
    assert np.abs(pixels[..., 0] / 255 - 0.3).max() < 0.01
    images, _ = digits.load_raw()  # real digits come back blurred a little by the bicubic upsampling
    real = (images[:12] + 1) / 2
    back = world.digit_pixels(world.render(real, contents), contents)[..., 0] / 255
    assert np.abs(back - real).mean() < 0.06


def test_colours_of_reads_the_palette():
    rng = np.random.default_rng(1)
    images, labels = digits.load_raw()
    intensity = (images[:60] + 1) / 2
    contents = [world.random_content(int(y), rng) for y in labels[:60]]
    drawn = world.render(intensity, contents)
    assert world.colours_match(drawn, contents).all()
    swapped = [world.Content(c.digit, next(i for i in world.INKS if i != c.ink), c.background) for c in contents]
    assert not world.colours_match(drawn, swapped).any()
    flat = np.broadcast_to(np.array(world.BACKGROUNDS["white"], np.uint8), drawn.shape)
    assert world.colours_of(flat[:1])[1] == ["white"]


def test_real_captioned_digits_are_read_by_the_classifier(tmp_path, data, classifier):
    root = world.write_captioned_digits(tmp_path / "cc3m", data, copies=1)
    captions = world.read_captions(root, "validation")
    contents = [world.parse_caption(c) for c in captions]
    images = world.load_images(root / "validation")
    labels = np.load(data / "heldout" / "labels.npy")
    assert len(captions) == len(images) == len(labels) == 359
    assert [c.digit for c in contents] == labels.tolist()  # rows follow the held-out split
    read, _ = digits.classify(classifier, world.digit_pixels(images, contents))
    held = digits.real_as_uint8(digits.read_split(data / "heldout")[0])
    direct, _ = digits.classify(classifier, held)
    # rendering at 32 px and reading back costs little accuracy against the 8x8 originals
    assert (read == labels).mean() >= (direct == labels).mean() - 0.03
    assert len(world.read_captions(root, "train")) == 1438


# ---------------------------------------------------------------------------------------------------------------
# Text


def test_tokenizer_keeps_every_caption_word_whole():
    captions, _ = prompts_of_every_digit()
    tokenizer = world.train_tokenizer(captions)
    for caption in captions[:5]:
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(caption).input_ids)
        assert tokens == ["<|startoftext|>", *(w + "</w>" for w in world.words(caption)), "<|endoftext|>"], caption
    for word in {w for c in captions for w in world.words(c)}:
        assert tokenizer.tokenize(word) == [word + "</w>"], word
    assert tokenizer.tokenize("zebra") == ["z", "e", "b", "r", "a</w>"]  # an unseen word still tokenises
    ids = tokenizer(captions[0], padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(ids) == 77 and tokenizer.model_max_length == 77


def test_sentence_encoder_is_a_bag_of_concepts(tmp_path):
    path = world.build_sentence_encoder(tmp_path / "encoder", dim=16, seed=3)
    encoder = PromptEncoder(str(path))
    same = ["a red seven on a black background", "digit 7 drawn in red, black background"]
    other = ["a red seven on a white background"]
    e = encoder.embed(same + other).double().numpy()
    vectors = world.concept_vectors(16, seed=3)
    for caption, emb in zip(same + other, e):
        content = world.parse_caption(caption)
        concepts = [f"digit:{content.digit}", f"ink:{content.ink}", f"background:{content.background}"]
        tokens = len(re.findall(r"\w+|[^\w\s]", caption)) + 2  # [CLS] and [SEP] count in the mean, with zero vectors
        expected = sum(vectors[c].double().numpy() for c in concepts) / tokens
        np.testing.assert_allclose(emb, expected, atol=1e-5)
    cosine = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    assert cosine(e[0], e[1]) == pytest.approx(1.0, abs=1e-6)  # wording does not move a prompt
    assert cosine(e[0], e[2]) < 0.9


# ---------------------------------------------------------------------------------------------------------------
# The shipped teacher and the demo


@pytest.mark.slow  # a whole pipeline end to end
def test_shipped_teacher_loads_strictly_and_draws_the_prompted_digits(classifier):
    sd = TEACHER / "sd"
    assert (sd / "model_index.json").is_file(), "assets/aptp-digits is missing: run make aptp-teacher"
    unet_dir = sd / "unet"
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(unet_dir))
    unet.load_state_dict(load_file(unet_dir / "diffusion_pytorch_model.safetensors"), strict=True)
    card = json.loads((TEACHER / "teacher.json").read_text())
    assert any("aptp.finetune" in c for c in card["commands"]) and card["metrics"]["train_steps"] > 0

    prompts, contents = prompts_of_every_digit()
    pipe = world.load_pipeline(sd)
    images = world.draw(pipe, prompts, seed=0, batch_size=len(prompts))
    read, _ = digits.classify(classifier, world.digit_pixels(images, contents))
    digit_accuracy = (read == np.array([c.digit for c in contents])).mean()
    colour_accuracy = world.colours_match(images, contents).mean()
    assert digit_accuracy >= TEACHER_MIN_DIGIT_ACCURACY, (digit_accuracy, read)
    assert colour_accuracy >= TEACHER_MIN_COLOUR_ACCURACY, colour_accuracy
    # the prompt matters: the same noise with every prompt's digit shifted by one is read as the shifted digit
    shifted = [world.Content((c.digit + 1) % 10, c.ink, c.background) for c in contents]
    rng = np.random.default_rng(5)
    other = world.draw(pipe, [world.make_caption(c, rng) for c in shifted], seed=0, batch_size=len(prompts))
    read_other, _ = digits.classify(classifier, world.digit_pixels(other, shifted))
    assert (read_other == np.array([c.digit for c in shifted])).mean() >= TEACHER_MIN_DIGIT_ACCURACY


def table_rows(report: str) -> dict[str, list[str]]:
    lines = report.split("| model |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


@pytest.mark.slow
def test_quick_demo_writes_a_full_report(tmp_path, data, capsys):
    out = tmp_path / "demo"
    report = demo_aptp.main(demo_aptp.parse_args(["--quick", "--out", str(out), "--data", str(data), "--teacher",
                                                  str(TEACHER)]))  # fmt: skip
    printed = capsys.readouterr().out
    assert str(report) in printed and "routing.json" in printed
    preset = demo_aptp.PRESETS["quick"]
    rows = table_rows(report.read_text())
    experts = [f"expert {k}" for k in range(preset.num_experts)]
    assert list(rows) == ["real images (ceiling)", "dense teacher", f"APTP ({preset.num_experts} experts, routed)",
                          *experts]  # fmt: skip
    for name, (gmacs, _, _, ms, prompts, digit, colour, fid, _, _) in rows.items():
        numbers = [digit, colour] + ([fid] if int(prompts) >= 2 else [])
        if name != "real images (ceiling)":
            numbers += [gmacs, ms]
        if name.startswith("expert") and int(prompts) == 0:
            numbers = [gmacs, ms]
        assert all(re.fullmatch(NUMBER, x) for x in numbers), (name, rows[name])
    assert sum(int(rows[e][4]) for e in experts) == preset.prompts
    assert rows["dense teacher"][1] == "100%"

    results = json.loads((out / "results.json").read_text())
    experts_json = json.loads((out / "pruning" / "experts.json").read_text())
    routing = json.loads((out / "routing.json").read_text())
    assert len(routing) == preset.prompts and results["routing_agrees_with_filter"] == preset.prompts
    for r in routing:  # the pipeline's MACs are its expert's in experts.json
        assert r["macs"] == experts_json["experts"][r["expert"]]["macs"]
    routed = {r["expert"] for r in routing}
    assert {p.name for p in (out / "grids").iterdir()} == {f"expert_{k}.png" for k in routed}
    commands = (out / "commands.sh").read_text()
    for module in ("aptp.digits_world", "aptp.prune", "aptp.filter_dataset", "aptp.finetune"):
        assert f"python -m {module} " in commands
    aptp = results["rows"][2]  # APTP's average MACs: the prompts' experts' MACs
    assert aptp["macs"] == pytest.approx(np.mean([r["macs"] for r in routing]))


def test_missing_teacher_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="make aptp-teacher"):
        demo_aptp.main(demo_aptp.parse_args(["--quick", "--out", str(tmp_path), "--teacher", str(tmp_path)]))
