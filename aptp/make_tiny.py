"""A tiny APTP world for CPU runs and tests: an SD-layout model folder, a sentence encoder and a CC3M-layout set.

``python -m aptp.make_tiny --out results/aptp-tiny`` writes

- ``sd/``: unet (``configs/aptp/tiny-unet.json``: SD2.1's block types at toy width), a 2-level VAE, a 2-layer CLIP
  text encoder with a character-level CLIP tokenizer (77 tokens) and a v-prediction scheduler, saved by
  ``StableDiffusionPipeline.save_pretrained``: the folder layout of SD2.1, loaded by the same code;
- ``encoder/``: a random tiny BERT sentence-transformers model (mean pooling);
- ``cc3m/``: ``Train_GCC-training.tsv`` / ``Validation_GCC-1.1.0-Validation.tsv`` with images named
  ``<row>_<crc32 of the url>`` (no extension, as the CC3M download script names them), coloured shapes that
  match their captions; one training image is corrupt and one caption row has no image, as in the real set.

``configs/aptp/pruning/tiny.yaml`` reads these paths.
"""

from __future__ import annotations

import argparse
import json
import string
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
TINY_UNET_CONFIG = ROOT / "configs/aptp/tiny-unet.json"

WORDS = (
    "a an the of on in with and photo picture painting drawing cat dog bird horse man woman child red blue "
    "green yellow house car street beach mountain city sitting running standing sign text logo"
).split()
COLORS = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 60), "yellow": (230, 210, 40)}
PLACES = {"street": (120, 120, 120), "beach": (230, 210, 160), "mountain": (90, 110, 90), "city": (60, 60, 80)}
STYLES = ("photo", "picture", "painting", "drawing")
SUBJECTS = ("cat", "dog", "bird", "horse", "man", "woman", "child", "car", "house")
ACTIONS = ("sitting", "running", "standing")


def word_tokenizer(words: list[str], max_length: int):
    """A BERT-style tokenizer whose vocabulary is ``words`` (lower-cased, split on whitespace) plus [PAD], [UNK],
    [CLS] and [SEP], framing each text as [CLS] ... [SEP]: the tiny sentence encoders' tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        model_max_length=max_length,
    )  # fmt: skip


def build_sentence_encoder(path: Path, dim: int = 16, seed: int = 0) -> Path:
    """Save a random tiny BERT sentence-transformers model (word-level vocabulary, mean pooling, and a
    Normalize module the router must drop) to ``path``; the same folder layout as a downloaded model."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel

    tokenizer = word_tokenizer(list(WORDS), max_length=32)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=dim, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=2 * dim, max_position_embeddings=32,
    )  # fmt: skip
    hf = path / "hf"
    BertModel(config).save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    model = SentenceTransformer(modules=[Transformer(str(hf)), Pooling(dim, "mean"), Normalize()], device="cpu")
    model.save(str(path / "encoder"))
    return path / "encoder"


def tiny_clip_tokenizer():
    """A character-level CLIP BPE tokenizer (no merges): every caption tokenises, into 77 tokens as SD's does."""
    from transformers import CLIPTokenizer

    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_tiny_sd(path: Path, seed: int = 0) -> Path:
    """Save a random tiny Stable Diffusion (SD2.1's layout and block types) to ``path``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet_config = json.loads(TINY_UNET_CONFIG.read_text())
    unet = UNet2DConditionModel.from_config(unet_config)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1, norm_num_groups=4,
        sample_size=32,
    )  # fmt: skip
    tokenizer = tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=unet_config["cross_attention_dim"], intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
            bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
    )  # fmt: skip
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(path)
    return path


def tiny_caption(rng: np.random.RandomState) -> tuple[str, str, str]:
    """A caption from the tiny encoder's vocabulary, and the colour and place its image shows."""
    color, place = rng.choice(list(COLORS)), rng.choice(list(PLACES))
    style, subject, action = rng.choice(STYLES), rng.choice(SUBJECTS), rng.choice(ACTIONS)
    return f"a {style} of a {color} {subject} {action} on the {place}", color, place


def tiny_image(color: str, place: str, size: int, rng: np.random.RandomState) -> Image.Image:
    img = Image.new("RGB", (size, size), PLACES[place])
    x, y = rng.randint(0, size // 2, 2)
    w, h = rng.randint(size // 4, size // 2, 2)
    ImageDraw.Draw(img).ellipse((x, y, x + w, y + h), fill=COLORS[color])
    return img


def cc3m_image_name(row: int, url: str) -> str:
    """The CC3M download script's file name: ``<row>_<crc32 of the url>``."""
    return f"{row}_{zlib.crc32(url.encode()) & 0xFFFFFFFF}"


def write_cc3m(
    root: Path, train_rows: int = 48, val_rows: int = 8, size: int = 48, seed: int = 0, flaws: bool = True
) -> Path:
    """A CC3M-layout folder; with ``flaws`` training row 1 has a corrupt image and row 2 none."""
    rng = np.random.RandomState(seed)
    for tsv, folder, rows in (
        ("Train_GCC-training.tsv", "training", train_rows),
        ("Validation_GCC-1.1.0-Validation.tsv", "validation", val_rows),
    ):
        (root / folder).mkdir(parents=True, exist_ok=True)
        lines = []
        for row in range(rows):
            caption, color, place = tiny_caption(rng)
            url = f"http://images.example.com/{folder}/{row}.jpg"
            lines.append(f"{caption}\t{url}\n")
            file = root / folder / cc3m_image_name(row, url)
            if flaws and folder == "training" and row == 1:
                file.write_bytes(b"<html>404 not found</html>")  # what a dead link often leaves behind
            elif not (flaws and folder == "training" and row == 2):
                tiny_image(color, place, size, rng).save(file, format="JPEG")
        (root / tsv).write_text("".join(lines))
    return root


def build_world(out: Path, train_rows: int = 48, val_rows: int = 8, size: int = 48, seed: int = 0) -> dict[str, Path]:
    """``out/sd``, ``out/sentence-encoder`` and ``out/cc3m``; returns {sd, encoder, cc3m}."""
    build_tiny_sd(out / "sd", seed)
    encoder = build_sentence_encoder(out / "sentence-encoder", seed=seed)
    write_cc3m(out / "cc3m", train_rows=train_rows, val_rows=val_rows, size=size, seed=seed)
    return dict(sd=out / "sd", encoder=encoder, cc3m=out / "cc3m")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/aptp-tiny", help="folder to write sd/, encoder/ and cc3m/ into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    w = build_world(Path(args.out), seed=args.seed)
    print(f"tiny Stable Diffusion: {w['sd']}\nsentence encoder: {w['encoder']}\nCC3M-layout captions: {w['cc3m']}")


if __name__ == "__main__":
    main()
