"""Captioned digits: a small text-to-image world for APTP on a CPU (``make demo-aptp``).

scikit-learn's handwritten digits (``diffcompress.digits``: 8x8, 10 classes, a stratified held-out split) rendered
at 32 px in a named ink colour on a named background, with captions that vary in wording::

    a red seven on a black background            the number 7 written in blue ink on grey paper
    handwritten digit eight, yellow on white     digit 0 drawn in green, gray background

``python -m aptp.digits_world --out DIR`` writes ``DIR/cc3m``: the CC3M layout that ``aptp.data`` reads
(``Train_GCC-training.tsv`` / ``Validation_GCC-1.1.0-Validation.tsv``, PNG images named ``<row>_<crc32 of url>``);
every training digit is rendered ``--copies`` times in random colours and wording, every held-out digit once
(validation). With ``--teacher-init`` it also writes the untrained teacher:

- ``DIR/sd``: a Stable Diffusion folder: the UNet of ``configs/aptp/tiny-unet.json`` (SD2.1's block types at toy
  width) on 8x8 latents, random; a 3-level VAE (32 px -> 8x8x4) trained here for reconstruction, its
  ``scaling_factor`` set to 1 / the latents' standard deviation; a 2-layer CLIP text encoder (random, frozen, as
  SD's is; unit-variance word vectors, so that each token's output still names its word) with a CLIP BPE tokenizer
  learnt on the captions, so that each caption word is one token; a v-prediction scheduler;
- ``DIR/sentence-encoder``: the router's prompt encoder, a stand-in for all-mpnet-base-v2 that sees meaning
  and not wording: a sentence-transformers BERT with no layers, mean pooled, whose word vectors are one fixed
  random vector per concept (the digit, the ink, the background; "seven" and "7" share one, as do "grey" and
  "gray"), zero for every other word.

The UNet is then trained by ``aptp.finetune`` (``demo_aptp.py --train-teacher``). ``digit_pixels`` turns an image
drawn for a caption back into the 8x8 grey digit that ``diffcompress.digits``' classifier reads: the ink share of
each pixel (its projection on the background -> ink segment of the caption's colours), averaged over 4x4 blocks.
"""

from __future__ import annotations

import json
import re
import string
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffcompress import digits
from diffcompress.checkpoint import write_json_atomic
from diffcompress.cli import ArgumentParser, non_negative_int, positive_int, run
from diffcompress.errors import UserError
from diffcompress.progress import progress_bar

from .data import CC3M_SPLITS
from .make_tiny import TINY_UNET_CONFIG, cc3m_image_name, word_tokenizer

RESOLUTION = 32  # pixels; the VAE's 4x downsampling gives 8x8 latents, one per digit pixel
LATENT_SIZE = 8
INKS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (50, 80, 230), "yellow": (240, 200, 30)}
BACKGROUNDS = {"black": (15, 15, 15), "white": (245, 245, 245), "gray": (128, 128, 128)}
SYNONYMS = {"grey": "gray"}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a {ink} {digit} on a {background} background",
    "the number {digit} written in {ink} ink on {background} paper",
    "handwritten digit {digit}, {ink} on {background}",
    "a drawing of the numeral {digit} in {ink} on a {background} background",
    "{ink} handwritten {digit} over a {background} background",
    "{background} background with a {ink} number {digit}",
    "digit {digit} drawn in {ink}, {background} background",
    "a sketch of a {ink} {digit} on {background}",
)


@dataclass(frozen=True)
class Content:
    """What a caption asks for."""

    digit: int
    ink: str
    background: str


def concept(word: str) -> str | None:
    """The concept a caption word names (``digit:7``, ``ink:red``, ``background:gray``), None for other words."""
    word = SYNONYMS.get(word, word)
    if word in DIGIT_WORDS:
        return f"digit:{DIGIT_WORDS.index(word)}"
    if len(word) == 1 and word.isdigit():
        return f"digit:{word}"
    if word in INKS:
        return f"ink:{word}"
    if word in BACKGROUNDS:
        return f"background:{word}"
    return None


def words(caption: str) -> list[str]:
    return re.findall(r"[a-z]+|\d|[^\sa-z\d]", caption.lower())


def parse_caption(caption: str) -> Content:
    """The digit, ink and background a caption names (each exactly once, in any wording)."""
    found: dict[str, set[str]] = {"digit": set(), "ink": set(), "background": set()}
    for word in words(caption):
        if (c := concept(word)) is not None:
            kind, value = c.split(":")
            found[kind].add(value)
    if any(len(v) != 1 for v in found.values()):
        raise UserError(
            f"prompt {caption!r}: expected one digit (0-9 or zero..nine), one ink colour ({', '.join(INKS)}) and one "
            f"background ({', '.join(BACKGROUNDS)})"
        )
    return Content(int(found["digit"].pop()), found["ink"].pop(), found["background"].pop())


def vocabulary() -> list[str]:
    """Every word a caption can have: the templates' and every concept's (numerals and synonyms included)."""
    template_words = {w for t in TEMPLATES for w in words(re.sub(r"\{\w+\}", " ", t))}
    named = {*DIGIT_WORDS, *string.digits, *INKS, *BACKGROUNDS, *SYNONYMS}
    return sorted(template_words | named)


def make_caption(content: Content, rng: np.random.Generator) -> str:
    """A caption of ``content`` in a random template, the digit as a word or a numeral, grey spelled either way."""
    digit = DIGIT_WORDS[content.digit] if rng.random() < 0.5 else str(content.digit)
    background = "grey" if content.background == "gray" and rng.random() < 0.5 else content.background
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    return template.format(digit=digit, ink=content.ink, background=background)


def random_content(digit: int, rng: np.random.Generator) -> Content:
    return Content(digit, list(INKS)[rng.integers(len(INKS))], list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))])


# ---------------------------------------------------------------------------------------------------------------
# Pixels


def _colours(contents: list[Content]) -> tuple[torch.Tensor, torch.Tensor]:
    ink = torch.tensor([INKS[c.ink] for c in contents], dtype=torch.float32)
    background = torch.tensor([BACKGROUNDS[c.background] for c in contents], dtype=torch.float32)
    return ink[:, :, None, None], background[:, :, None, None]  # [N, 3, 1, 1]


def render(intensity: np.ndarray, contents: list[Content], size: int = RESOLUTION) -> np.ndarray:
    """uint8 images [N, size, size, 3]: the 8x8 ink intensities [N, 8, 8] (in [0, 1]) upsampled bicubically, each
    pixel ``background + intensity * (ink - background)``."""
    x = torch.as_tensor(np.asarray(intensity, dtype=np.float32))[:, None]
    a = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    ink, background = _colours(contents)
    rgb = background + a * (ink - background)
    return rgb.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def ink_share(images: np.ndarray, contents: list[Content]) -> np.ndarray:
    """Per pixel of uint8 images [N, H, W, 3] the position on the caption's background -> ink segment, clipped to
    [0, 1]: the inverse of ``render``'s colouring. float32 [N, H, W]."""
    x = torch.tensor(np.asarray(images), dtype=torch.float32).permute(0, 3, 1, 2)
    ink, background = _colours(contents)
    d = ink - background
    return (((x - background) * d).sum(1) / (d * d).sum(1)).clamp(0, 1).numpy()


def digit_pixels(images: np.ndarray, contents: list[Content]) -> np.ndarray:
    """Images drawn for ``contents`` -> the uint8 [N, 8, 8, 3] grey digits the digits classifier reads (ink share
    averaged over blocks of H/8 pixels; ink white on black, as in ``load_digits``)."""
    a = torch.from_numpy(ink_share(images, contents))[:, None]
    small = F.adaptive_avg_pool2d(a, digits.IMAGE_SIZE)[:, 0]
    return (small * 255).round().to(torch.uint8)[..., None].expand(-1, -1, -1, 3).numpy()


def colours_of(images: np.ndarray) -> tuple[list[str], list[str]]:
    """The (ink, background) names an image shows: the background nearest to its per-channel median colour (the
    digit covers less than half of it), the ink nearest to the mean of its tenth of pixels farthest from that."""
    x = torch.tensor(np.asarray(images), dtype=torch.float32).flatten(1, 2)  # [N, P, 3]
    inks, backgrounds = (torch.tensor(list(p.values()), dtype=torch.float32) for p in (INKS, BACKGROUNDS))
    bg = torch.cdist(x.median(dim=1).values, backgrounds).argmin(1)
    far = (x - backgrounds[bg][:, None]).norm(dim=-1).topk(max(1, x.shape[1] // 10), dim=1).indices
    ink_colour = torch.gather(x, 1, far[..., None].expand(-1, -1, 3)).mean(1)
    ink = torch.cdist(ink_colour, inks).argmin(1)
    return [list(INKS)[i] for i in ink], [list(BACKGROUNDS)[i] for i in bg]


def colours_match(images: np.ndarray, contents: list[Content]) -> np.ndarray:
    """bool [N]: the image shows both colours its caption names (``colours_of``)."""
    inks, backgrounds = colours_of(images)
    return np.array([(i, b) == (c.ink, c.background) for i, b, c in zip(inks, backgrounds, contents)])


# ---------------------------------------------------------------------------------------------------------------
# The captioned set in the CC3M layout


def write_captioned_digits(root: str | Path, data: str | Path, copies: int = 2, seed: int = 0) -> Path:
    """Render the prepared digits ``data`` (``prepare_digits.py``: train/ and heldout/) into the CC3M layout at
    ``root``: ``copies`` renderings of every training digit, one of every held-out digit (validation)."""
    if copies < 1:
        raise UserError(f"--copies must be positive, got {copies}")
    root, rng = Path(root), np.random.default_rng(seed)
    for split, part, n in (("train", "train", copies), ("validation", "heldout", 1)):
        tsv_name, folder = CC3M_SPLITS[split]
        images, labels = digits.read_split(Path(data) / part)
        intensity = np.repeat((images[:, 0].numpy() + 1) / 2, n, axis=0)  # [-1, 1] -> ink share
        labels = np.repeat(labels.numpy(), n)
        contents = [random_content(int(y), rng) for y in labels]
        captions = [make_caption(c, rng) for c in contents]
        pixels = render(intensity, contents)
        (root / folder).mkdir(parents=True, exist_ok=True)
        lines = []
        for row, (caption, image) in enumerate(zip(progress_bar(captions, desc=f"render {split}"), pixels)):
            url = f"digits://{part}/{row}"
            Image.fromarray(image).save(root / folder / cc3m_image_name(row, url), format="PNG")
            lines.append(f"{caption}\t{url}\n")
        (root / tsv_name).write_text("".join(lines))
    return root


def read_captions(root: str | Path, split: str) -> list[str]:
    """The captions of a split of the CC3M-layout folder, in row order."""
    tsv = Path(root) / CC3M_SPLITS[split][0]
    if not tsv.is_file():
        raise UserError(f"{tsv} does not exist: write the captioned digits with `python -m aptp.digits_world`")
    return [line.split("\t", 1)[0] for line in tsv.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# Text: the CLIP tokenizer and the router's sentence encoder


def train_tokenizer(captions: list[str]):
    """A CLIP BPE tokenizer (``transformers.CLIPTokenizer``, 77 tokens) whose merges are learnt on ``captions``:
    every caption word becomes one token; other text still tokenises, letter by letter."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    clip = CLIPTokenizer(vocab={s: i for i, s in enumerate(specials)}, merges=[])
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    bpe.normalizer, bpe.pre_tokenizer = clip.backend_tokenizer.normalizer, clip.backend_tokenizer.pre_tokenizer
    alphabet = string.ascii_lowercase + string.digits + string.punctuation
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000, min_frequency=1, special_tokens=specials, end_of_word_suffix="</w>",
        initial_alphabet=list(alphabet), show_progress=False,
    )  # fmt: skip
    bpe.train_from_iterator([*captions, " ".join(alphabet)], trainer)  # the alphabet line: every char ends a word
    model = json.loads(bpe.to_str())["model"]
    return CLIPTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], model_max_length=77)


def concept_vectors(dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """One fixed random vector per concept, standardised (zero mean, unit variance) so that BERT's embedding
    LayerNorm leaves it as it is."""
    names = [f"digit:{d}" for d in range(10)] + [f"ink:{c}" for c in INKS] + [f"background:{c}" for c in BACKGROUNDS]
    g = torch.Generator().manual_seed(seed)
    vectors = {}
    for name in names:
        v = torch.randn(dim, generator=g, dtype=torch.float64)
        vectors[name] = ((v - v.mean()) / v.std(unbiased=False)).float()
    return vectors


def build_sentence_encoder(path: str | Path, dim: int = 32, seed: int = 0) -> Path:
    """Save the bag-of-concepts sentence encoder (see the module docstring) as a sentence-transformers folder."""
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel

    tokenizer = word_tokenizer(vocabulary(), max_length=64)
    vocab = tokenizer.get_vocab()
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=dim, num_hidden_layers=0, num_attention_heads=1, intermediate_size=dim,
        max_position_embeddings=64, layer_norm_eps=1e-12,
    )  # fmt: skip
    try:  # their home since sentence-transformers 6 (the old one warns)
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:
        from sentence_transformers.models import Pooling, Transformer

    bert = BertModel(config)
    vectors = concept_vectors(dim, seed)
    table = torch.zeros(len(vocab), dim)
    for word, i in vocab.items():
        if (c := concept(word)) is not None:
            table[i] = vectors[c]
    with torch.no_grad():  # word vectors only: no position or segment signal, so pooling is a bag of concepts
        bert.embeddings.word_embeddings.weight.copy_(table)
        bert.embeddings.position_embeddings.weight.zero_()
        bert.embeddings.token_type_embeddings.weight.zero_()
    with tempfile.TemporaryDirectory() as tmp:
        bert.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        model = SentenceTransformer(modules=[Transformer(tmp), Pooling(dim, "mean")], device="cpu")
        model.save(str(path))
    (Path(path) / "README.md").unlink(missing_ok=True)  # sentence-transformers' generic card, about training
    return Path(path)


# ---------------------------------------------------------------------------------------------------------------
# The untrained teacher


def load_images(folder: str | Path) -> np.ndarray:
    """The images of a CC3M-layout image folder, in row order, as uint8 [N, H, W, 3]."""
    files = sorted(Path(folder).iterdir(), key=lambda p: int(p.name.split("_", 1)[0]))
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        sample_size=RESOLUTION,
    )  # fmt: skip


def train_vae(images: np.ndarray, steps: int, batch_size: int = 64, lr: float = 2e-3, kl_weight: float = 1e-6,
              seed: int = 0) -> tuple[torch.nn.Module, float]:  # fmt: skip
    """A VAE trained on uint8 images [N, H, W, 3] for reconstruction (MSE + ``kl_weight`` x KL, AdamW, one-cycle
    learning rate), its ``scaling_factor`` set to 1 / the standard deviation of the training latents; and the
    reconstruction MSE of the last step."""
    torch.manual_seed(seed)
    vae = build_vae().train()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    bar = progress_bar(range(steps), desc="VAE")
    for _ in bar:
        batch = x[torch.randint(len(x), (batch_size,), generator=g)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon, batch)
        loss = mse + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(mse=f"{mse.item():.5f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(x[i : i + 256]).latent_dist.sample() for i in range(0, len(x), 256)])
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    return vae, mse.item()


def build_teacher_init(path: str | Path, cc3m: str | Path, vae_steps: int = 800, seed: int = 0) -> Path:
    """Save the untrained teacher (random UNet, trained VAE, random text encoder, tokenizer, scheduler) to
    ``path`` with ``StableDiffusionPipeline.save_pretrained``."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = train_tokenizer(read_captions(cc3m, "train"))
    start = time.perf_counter()
    vae, mse = train_vae(load_images(Path(cc3m) / CC3M_SPLITS["train"][1]), vae_steps, seed=seed)
    vae_stats = dict(steps=vae_steps, seconds=round(time.perf_counter() - start, 1), final_mse=mse)
    torch.manual_seed(seed)
    unet_config = dict(json.loads(TINY_UNET_CONFIG.read_text()), sample_size=LATENT_SIZE)
    unet = UNet2DConditionModel.from_config(unet_config)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=unet_config["cross_attention_dim"], intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )  # fmt: skip
    with torch.no_grad():  # CLIP's init draws word and position vectors alike (std 0.02); larger word vectors keep
        text_encoder.get_input_embeddings().weight.normal_()  # each token's word readable after the 2 random layers
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(path)
    write_json_atomic(Path(path) / "vae_training.json", vae_stats)
    return Path(path)


# ---------------------------------------------------------------------------------------------------------------
# Drawing with a Stable Diffusion folder


def load_pipeline(sd: str | Path, scheduler: str = "PNDMScheduler"):
    """A diffusers ``StableDiffusionPipeline`` of an SD folder (float32), sampling with ``scheduler`` built from the
    folder's scheduler config (PNDM: the paper's generation setting)."""
    from diffusers import StableDiffusionPipeline

    from .pipeline import make_scheduler
    from .prune import load_stable_diffusion

    parts = load_stable_diffusion(str(sd))
    pipe = StableDiffusionPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=parts["unet"],
        scheduler=make_scheduler(parts["scheduler"], scheduler), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def draw(pipe, prompts: list[str], seed: int = 0, steps: int = 25, guidance_scale: float = 1.0, batch_size: int = 64,
         desc: str = "draw") -> np.ndarray:  # fmt: skip
    """uint8 images [N, 32, 32, 3] of ``prompts``; prompt i draws its noise from seed + i, as ``APTPPipeline`` does,
    so that the same prompts and seed give every model the same starting noise."""
    from .pipeline import per_prompt_generators

    generators = per_prompt_generators(seed, len(prompts))
    images = []
    for i in progress_bar(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        out = pipe(
            prompts[i : i + batch_size], height=RESOLUTION, width=RESOLUTION, num_inference_steps=steps,
            guidance_scale=guidance_scale, generator=generators[i : i + batch_size], output_type="np",
        )  # fmt: skip
        images.append(out.images)
    return to_uint8(np.concatenate(images))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] (diffusers' numpy output) -> uint8, rounded as ``numpy_to_pil`` rounds."""
    return (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write cc3m/ (and sd/, sentence-encoder/) into")
    parser.add_argument("--data", default="data/digits", help="prepared digits (made by prepare_digits.py if missing)")
    parser.add_argument("--copies", type=positive_int, default=2, help="renderings of every training digit")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--teacher-init", action="store_true", help="also write the untrained teacher sd/ and the "
                        "sentence encoder")  # fmt: skip
    parser.add_argument("--vae-steps", type=positive_int, default=800, help="--teacher-init: VAE training steps")
    args = parser.parse_args(argv)
    out, start = Path(args.out), time.perf_counter()
    if not digits.is_prepared(args.data):
        digits.prepare(args.data)
    cc3m = write_captioned_digits(out / "cc3m", args.data, args.copies, args.seed)
    print(f"captioned digits (CC3M layout): {cc3m}")
    if args.teacher_init:
        encoder = build_sentence_encoder(out / "sentence-encoder", seed=args.seed)
        sd = build_teacher_init(out / "sd", cc3m, args.vae_steps, args.seed)
        print(f"untrained teacher (Stable Diffusion layout): {sd}\nsentence encoder: {encoder}")
    print(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    run(main)
