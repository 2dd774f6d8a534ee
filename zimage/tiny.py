"""The tiny offline Z-Image pipeline: random weights, real diffusers layout, built from a seed.

No network exists at test time and the real model is 6 B parameters, so the demo and every test use
this builder. It produces the same component classes as the real model (ZImageTransformer2DModel,
16-channel AutoencoderKL, Qwen3Model, Qwen2Tokenizer with a chat template, flow-match scheduler), so
code written against it runs unchanged on the real weights. Same seed -> byte-identical weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

TINY_MODEL_NAME = "tiny-zimage"
# The same tiny weights standing in for each model type in tests: a folder with its own zimage_model.json
# type and its own scheduler shift (the base model's shift must come from its files, never a constant).
TINY_VARIANTS = {
    "de_turbo": {"shift": 3.0, "sample_steps": 4, "sample_cfg": 2.0},
    "turbo": {"shift": 3.0, "sample_steps": 4, "sample_cfg": 1.0},
    "base": {"shift": 6.0, "sample_steps": 4, "sample_cfg": 4.0},
}

# A reduced Qwen3 chat template: one user message, generation prompt, the empty think block that the
# real template emits when enable_thinking is False. Z-Image passes enable_thinking=True.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}{%- endif -%}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
_CORPUS = [
    "a photo of a red circle on a white background",
    "a blue square and a green triangle, flat colours, simple shapes",
    "portrait of a person in a garden, soft light, detailed, high quality",
    "a painting of a mountain landscape at sunset in the style of zshape",
    "user assistant system the of and a an in on with at by for from",
    "cat dog tree house car sky water city night day bright dark",
]

# Sizes chosen so every shape rule of the real model holds (DESIGN.md section 5).
TEXT_HIDDEN = 32
TRANSFORMER_CONFIG = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=32,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    cap_feat_dim=TEXT_HIDDEN,
    axes_dims=[8, 4, 4],
    axes_lens=[1536, 512, 512],
)


def train_byte_bpe(corpus: list[str], vocab_size: int, special_tokens: list[str]) -> tuple[dict, list]:
    """(vocab, merges) of a byte-level BPE trained on `corpus` with the `tokenizers` library; deterministic."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return state["vocab"], merges


def build_tokenizer():
    """Byte-level BPE trained on a few sentences, wrapped as the real model's tokenizer class."""
    from transformers import Qwen2Tokenizer

    vocab, merges = train_byte_bpe(_CORPUS, 400, SPECIAL_TOKENS)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_pipeline(seed: int = 0, shift: float = 3.0):
    """Return a random-weight ZImagePipeline whose every weight is a function of `seed` alone."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_tokenizer()

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(**TRANSFORMER_CONFIG)
    # Older diffusers left the pad tokens uninitialised; pin them so the model is fully determined.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        transformer.x_pad_token.copy_(torch.randn(transformer.x_pad_token.shape, generator=gen) * 0.02)
        transformer.cap_pad_token.copy_(torch.randn(transformer.cap_pad_token.shape, generator=gen) * 0.02)

    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )

    torch.manual_seed(seed + 3)
    text_config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
    )
    text_encoder = Qwen3Model(text_config)

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)
    for module in (transformer, vae, text_encoder):
        module.eval()
    return ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def write_folder_atomically(target: Path, marker: str, fill: Callable[[Path], None]) -> bool:
    """Fill a sibling temp folder with `fill(tmp)` and rename it to `target`, so the folder appears whole or
    not at all. Returns False (writing nothing) when `target/marker` already exists."""
    from zimage.fsio import atomic_folder

    target = Path(target)
    if (target / marker).exists():
        return False
    # overwrite: an empty or broken leftover without the marker file is replaced
    with atomic_folder(target, overwrite=True, fsync=False) as tmp:
        fill(tmp)
    return True


def write_tiny_model(target: Path, seed: int = 0, model_type: str = "de_turbo") -> bool:
    """Write the tiny pipeline to `target` (diffusers layout) as a `model_type` model (TINY_VARIANTS: its
    scheduler shift and sampling defaults). Returns False if it was already there."""
    variant = TINY_VARIANTS[model_type]

    def fill(tmp: Path) -> None:
        build_tiny_pipeline(seed, shift=variant["shift"]).save_pretrained(tmp, safe_serialization=True)
        meta = {"name": Path(target).name, "model_type": model_type, "sample_steps": variant["sample_steps"],
                "sample_cfg": variant["sample_cfg"], "seed": seed}  # fmt: skip
        (tmp / "zimage_model.json").write_text(json.dumps(meta, indent=2))

    return write_folder_atomically(target, "model_index.json", fill)
