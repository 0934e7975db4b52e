"""Tiny stand-ins for APTP's big models: a UNet config with SD2.1's block types and a sentence encoder."""

from __future__ import annotations

from pathlib import Path

import torch

# SD2.1's block types and layer counts at toy width: 2 down blocks (cross-attn, plain), mid, 2 up blocks.
TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16,
    attention_head_dim=(2, 4),  # diffusers' name for the number of heads, as in SD2.1's config
    norm_num_groups=8,
    use_linear_projection=True,
)

WORDS = (
    "a an the of on in with and photo picture painting drawing cat dog bird horse man woman child red blue "
    "green yellow house car street beach mountain city sitting running standing sign text logo"
).split()


def build_sentence_encoder(path: Path, dim: int = 16, seed: int = 0) -> Path:
    """Save a random tiny BERT sentence-transformers model (word-level vocabulary, mean pooling, and a
    Normalize module the router must drop) to ``path``; the same folder layout as a downloaded model."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + list(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        model_max_length=32,
    )  # fmt: skip
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=dim, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=2 * dim, max_position_embeddings=32,
    )  # fmt: skip
    hf = path / "hf"
    BertModel(config).save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    model = SentenceTransformer(modules=[Transformer(str(hf)), Pooling(dim, "mean"), Normalize()], device="cpu")
    model.save(str(path / "encoder"))
    return path / "encoder"
