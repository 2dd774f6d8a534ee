"""Tiny random-weight BLIP and Florence-2 folders, built offline from configs (tests and benchmark).

They use the same classes and on-disk layout as the real checkpoints (BlipForConditionalGeneration +
BlipProcessor with a BERT tokenizer; Florence2ForConditionalGeneration + Florence2Processor with a BART
tokenizer carrying the <image> token), so the captioning code runs unchanged on them. Their captions
are gibberish; what they prove is the plumbing. Same seed -> same weights. Each is a few hundred KB.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

_WORDS = [
    "a",
    "an",
    "the",
    "photo",
    "of",
    "picture",
    "painting",
    "red",
    "blue",
    "green",
    "white",
    "black",
    "circle",
    "square",
    "triangle",
    "on",
    "in",
    "with",
    "and",
    "background",
    "person",
    "cat",
    "dog",
    "tree",
    "sky",
    "city",
    "night",
    "day",
    "bright",
    "dark",
    "small",
    "large",
]
_CORPUS = [
    "a photo of a red circle on a white background",
    "What does the image describe?",
    "Describe in detail what is shown in the image.",
    "Describe with a paragraph what is shown in the image.",
    " ".join(_WORDS),
]


def _bert_tokenizer():
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate([*specials, *_WORDS, "[DEC]"])}
    tok = BertTokenizer(vocab=vocab)
    tok.add_special_tokens({"bos_token": "[DEC]"})  # BLIP starts decoding from [DEC]
    return tok


def _bart_tokenizer():
    from transformers import BartTokenizer

    from zimage.tiny import train_byte_bpe

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", "<image>"]
    vocab, merges = train_byte_bpe(_CORPUS, 320, specials)
    return BartTokenizer(vocab=vocab, merges=merges, extra_special_tokens={"image_token": "<image>"})


def build_tiny_blip(seed: int = 0):
    """(model, processor) of a random-weight BLIP captioner: 32-px images, 2-layer towers."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    tok = _bert_tokenizer()
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=32, encoder_hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
            pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id,
        ),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=32),
        projection_dim=32,
        image_text_hidden_size=32,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    processor = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok)
    return model, processor


def build_tiny_florence2(seed: int = 0):
    """(model, processor) of a random-weight Florence-2 captioner: 32-px images, 17 image tokens."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    tok = _bart_tokenizer()
    # Two DaViT stages with strides 4 and 2 turn 32x32 pixels into 4x4 features: 16 + 1 pooled = 17 tokens.
    image_processor = CLIPImageProcessorPil(
        size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=False,
        image_seq_length=17,
    )  # fmt: skip
    processor = Florence2Processor(
        image_processor=image_processor, tokenizer=tok, post_processor_config={"pure_text": {}}
    )
    config = Florence2Config(
        text_config=dict(
            model_type="bart", vocab_size=len(tok), max_position_embeddings=320, d_model=32, encoder_layers=1,
            decoder_layers=1, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
            decoder_attention_heads=2, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id,
            forced_bos_token_id=tok.bos_token_id,
        ),
        vision_config=dict(
            depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1], patch_prenorm=[False, True],
            embed_dim=[16, 32], num_heads=[1, 2], num_groups=[1, 2], window_size=4, projection_dim=32,
            drop_path_rate=0.0,
        ),
        image_token_id=tok.image_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(config).eval()
    return model, processor


def _write(target: Path, build: Callable[[int], tuple], seed: int) -> bool:
    """Save model + processor so the folder appears whole or not at all."""
    from zimage.tiny import write_folder_atomically

    def fill(tmp: Path) -> None:
        model, processor = build(seed)
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)

    return write_folder_atomically(target, "config.json", fill)


def write_tiny_blip(target: Path, seed: int = 0) -> bool:
    """Write the tiny BLIP folder; False if it was already there."""
    return _write(target, build_tiny_blip, seed)


def write_tiny_florence2(target: Path, seed: int = 0) -> bool:
    """Write the tiny Florence-2 folder; False if it was already there."""
    return _write(target, build_tiny_florence2, seed)


DEMO_CAPTIONER = "tiny-blip-demo"
DEMO_CAPTIONER_TITLE = "Tiny BLIP, random weights (demo only: its captions are gibberish)"


def write_demo_captioner(target: Path, seed: int = 0) -> bool:
    """The demo home's offline captioner: the tiny random-weight BLIP, labelled as such (models/captioners/
    tiny-blip-demo/zimage_captioner.json), so the Captioning page runs end to end with no download.
    False if it was already there."""
    import json

    from zimage.captioning.models import MARKER
    from zimage.tiny import write_folder_atomically

    def fill(tmp: Path) -> None:
        model, processor = build_tiny_blip(seed)
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        about = "Built offline by `zimage demo`; shows the captioning plumbing, not real captions."
        (tmp / MARKER).write_text(json.dumps({"title": DEMO_CAPTIONER_TITLE, "about": about, "demo": True}) + "\n")

    return write_folder_atomically(target, "config.json", fill)
