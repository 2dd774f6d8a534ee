"""The shapes of the Z-Image models, as closed forms over their configs: parameter counts, Linear layers.

The memory estimate (zimage.training.memory) and the GPU benchmark work from these. The counts are
exact: a test instantiates diffusers' ZImageTransformer2DModel / AutoencoderKL and transformers'
Qwen3Model on the meta device and compares. The real configs are those of Tongyi-MAI/Z-Image-Turbo
(transformer/, text_encoder/ = Qwen3-4B, vae/ = Flux VAE); `TINY` is the offline demo model.
No torch import: pages and config validation may use this freely.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zimage.tiny import TINY_MODEL_NAME
from zimage.tiny import TRANSFORMER_CONFIG as TINY_TRANSFORMER_CONFIG

BLOCK_MODULES = (  # Linear layers of one transformer block, module paths as diffusers names them
    "attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
    "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0",
)  # fmt: skip
DEFAULT_TARGET_MODULES = BLOCK_MODULES[:7]  # attention + feed-forward
DEFAULT_TARGET_BLOCKS = ("layers",)  # the 30 main layers; refiners excluded
TEXT_ENCODER_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# The real models' configs (Tongyi-MAI/Z-Image-Turbo: transformer/, text_encoder/ (Qwen3-4B), vae/).
ZIMAGE_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
    n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0,
    t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
)  # fmt: skip
ZIMAGE_TEXT_ENCODER_CONFIG: dict[str, Any] = dict(
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, attention_bias=False, tie_word_embeddings=True,
    max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000,
)  # fmt: skip
ZIMAGE_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    norm_num_groups=32, mid_block_add_attention=True, use_quant_conv=False, use_post_quant_conv=False,
    scaling_factor=0.3611, shift_factor=0.1159,
)  # fmt: skip
# The tiny offline model's text encoder and VAE (zimage/tiny.py builds them inline; a test keeps these in step).
TINY_TEXT_ENCODER_CONFIG: dict[str, Any] = dict(
    vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=2, head_dim=16, attention_bias=False,
)  # fmt: skip
TINY_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
    norm_num_groups=4, mid_block_add_attention=True, use_quant_conv=False, use_post_quant_conv=False,
)  # fmt: skip


@dataclass(frozen=True)
class Linear:
    """One nn.Linear: its module path and shape."""

    name: str
    fan_in: int
    fan_out: int
    bias: bool

    @property
    def params(self) -> int:
        return self.fan_in * self.fan_out + (self.fan_out if self.bias else 0)


@dataclass(frozen=True)
class Architecture:
    """The three model configs an estimate is computed from, with closed-form parameter counts."""

    name: str
    transformer: dict[str, Any]
    text_encoder: dict[str, Any]
    vae: dict[str, Any]

    # -- transformer (diffusers ZImageTransformer2DModel)
    @property
    def dim(self) -> int:
        return int(self.transformer.get("dim", 3840))

    @property
    def ffn_dim(self) -> int:
        return int(self.dim / 3 * 8)  # FeedForward(hidden_dim=int(dim / 3 * 8)) in diffusers

    @property
    def head_dim(self) -> int:
        return self.dim // int(self.transformer.get("n_heads", 30))

    def blocks(self) -> list[tuple[str, str]]:
        """(block prefix, token stream) in forward order: refiners per stream, then the main layers."""
        n_ref = int(self.transformer.get("n_refiner_layers", 2))
        out = [(f"noise_refiner.{i}", "img") for i in range(n_ref)]
        out += [(f"context_refiner.{i}", "cap") for i in range(n_ref)]
        return out + [(f"layers.{i}", "main") for i in range(int(self.transformer.get("n_layers", 30)))]

    def transformer_linears(self) -> list[Linear]:
        d, f, t = self.dim, self.ffn_dim, self.transformer
        inner = self.head_dim * int(t.get("n_heads", 30))
        adaln = min(d, 256)
        out: list[Linear] = []
        for p, fp in zip(t.get("all_patch_size", (2,)), t.get("all_f_patch_size", (1,)), strict=True):
            patch = fp * p * p * int(t.get("in_channels", 16))
            out.append(Linear(f"all_x_embedder.{p}-{fp}", patch, d, True))
            out.append(Linear(f"all_final_layer.{p}-{fp}.linear", d, patch, True))
            out.append(Linear(f"all_final_layer.{p}-{fp}.adaLN_modulation.1", adaln, d, True))
        out += [Linear("t_embedder.mlp.0", 256, 1024, True), Linear("t_embedder.mlp.2", 1024, adaln, True)]
        out.append(Linear("cap_embedder.1", int(t.get("cap_feat_dim", 2560)), d, True))
        for prefix, _stream in self.blocks():
            shapes = [(d, inner), (d, inner), (d, inner), (inner, d), (d, f), (f, d), (d, f)]
            out += [Linear(f"{prefix}.{m}", i, o, False) for m, (i, o) in zip(BLOCK_MODULES, shapes, strict=False)]
            if not prefix.startswith("context_refiner"):  # the caption refiner has no timestep modulation
                out.append(Linear(f"{prefix}.adaLN_modulation.0", adaln, 4 * d, True))
        return out

    def transformer_other_params(self) -> int:
        """Norm weights, pad tokens: everything that is not an nn.Linear."""
        d, t = self.dim, self.transformer
        per_block = 4 * d + (2 * self.head_dim if t.get("qk_norm", True) else 0)
        return len(self.blocks()) * per_block + int(t.get("cap_feat_dim", 2560)) + 2 * d

    def transformer_params(self) -> int:
        return sum(lin.params for lin in self.transformer_linears()) + self.transformer_other_params()

    # -- text encoder (transformers Qwen3Model: no LM head)
    def text_encoder_linears(self) -> list[Linear]:
        c = self.text_encoder
        h, inter, hd = int(c["hidden_size"]), int(c["intermediate_size"]), int(c["head_dim"])
        q, kv, bias = (
            int(c["num_attention_heads"]) * hd,
            int(c["num_key_value_heads"]) * hd,
            bool(c.get("attention_bias")),
        )
        shapes = [(h, q, bias), (h, kv, bias), (h, kv, bias), (q, h, bias), (h, inter, False), (h, inter, False)]
        shapes.append((inter, h, False))
        return [
            Linear(f"layers.{i}.{'self_attn' if j < 4 else 'mlp'}.{m}", fi, fo, b)
            for i in range(int(c["num_hidden_layers"]))
            for j, (m, (fi, fo, b)) in enumerate(zip(TEXT_ENCODER_MODULES, shapes, strict=True))
        ]

    def text_encoder_other_params(self) -> int:
        """Token embedding, the four RMSNorms per layer (q/k norms over head_dim) and the final norm."""
        c = self.text_encoder
        h, hd = int(c["hidden_size"]), int(c["head_dim"])
        return int(c["vocab_size"]) * h + int(c["num_hidden_layers"]) * (2 * h + 2 * hd) + h

    def text_encoder_params(self) -> int:
        return sum(lin.params for lin in self.text_encoder_linears()) + self.text_encoder_other_params()

    # -- VAE (diffusers AutoencoderKL)
    def vae_params(self) -> int:
        c = self.vae
        ch, lpb, lat = list(c["block_out_channels"]), int(c["layers_per_block"]), int(c["latent_channels"])

        def conv(i: int, o: int, k: int = 3) -> int:
            return i * o * k * k + o

        def resnet(i: int, o: int) -> int:
            return 2 * i + conv(i, o) + 2 * o + conv(o, o) + (conv(i, o, 1) if i != o else 0)

        def mid(c_: int) -> int:
            attn = 2 * c_ + 4 * (c_ * c_ + c_) if c.get("mid_block_add_attention", True) else 0
            return 2 * resnet(c_, c_) + attn

        enc, prev = conv(int(c["in_channels"]), ch[0]), ch[0]
        for i, o in enumerate(ch):
            enc += sum(resnet(prev if j == 0 else o, o) for j in range(lpb))
            enc += conv(o, o) if i < len(ch) - 1 else 0
            prev = o
        enc += mid(ch[-1]) + 2 * ch[-1] + conv(ch[-1], 2 * lat)
        dec, rev = conv(lat, ch[-1]) + mid(ch[-1]), ch[::-1]
        prev = rev[0]
        for i, o in enumerate(rev):
            dec += sum(resnet(prev if j == 0 else o, o) for j in range(lpb + 1))
            dec += conv(o, o) if i < len(rev) - 1 else 0
            prev = o
        dec += 2 * ch[0] + conv(ch[0], int(c["out_channels"]))
        quant = conv(2 * lat, 2 * lat, 1) if c.get("use_quant_conv", False) else 0
        quant += conv(lat, lat, 1) if c.get("use_post_quant_conv", False) else 0
        return enc + dec + quant


ZIMAGE = Architecture("z-image", ZIMAGE_TRANSFORMER_CONFIG, ZIMAGE_TEXT_ENCODER_CONFIG, ZIMAGE_VAE_CONFIG)
TINY = Architecture(TINY_MODEL_NAME, dict(TINY_TRANSFORMER_CONFIG), TINY_TEXT_ENCODER_CONFIG, TINY_VAE_CONFIG)


def architecture_from_folder(path: Path | str) -> Architecture:
    """The configs of a pipeline folder in diffusers layout (transformer/, text_encoder/, vae/)."""
    path = Path(path)

    def read(sub: str, name: str = "config.json") -> dict[str, Any]:
        return json.loads((path / sub / name).read_text())

    te = read("text_encoder")
    te.setdefault("head_dim", te["hidden_size"] // te["num_attention_heads"])
    return Architecture(path.name, read("transformer"), te, read("vae"))


def architecture_for(cfg: Any) -> Architecture:
    """The tiny model for `model_path` naming it, a readable pipeline folder's own configs, else Z-Image."""
    model_path = str(getattr(cfg, "model_path", "") or "")
    folder = Path(model_path).expanduser() if model_path else None
    if folder is not None and (folder / "transformer" / "config.json").is_file():
        try:
            return architecture_from_folder(folder)
        except (OSError, ValueError, KeyError):
            pass  # an unreadable folder: fall back to the names below
    if model_path == TINY_MODEL_NAME or (folder is not None and folder.name == TINY_MODEL_NAME):
        return TINY
    return ZIMAGE


def lora_targets(arch: Architecture, target_modules: Any, target_blocks: Any = DEFAULT_TARGET_BLOCKS) -> list[Linear]:
    """The transformer linears a LoRA covers, matched as peft matches target_modules.

    A list of block-relative paths ("attention.to_q") combines with `target_blocks` ("layers") as the
    trainer's regex does; a string is a peft regex (full match) over module paths.
    """
    linears = arch.transformer_linears()
    if isinstance(target_modules, str):
        return [lin for lin in linears if re.fullmatch(target_modules, lin.name)]
    blocks = "|".join(re.escape(b) for b in (target_blocks or DEFAULT_TARGET_BLOCKS))
    mods = "|".join(re.escape(m) for m in target_modules)
    pattern = re.compile(rf"({blocks})\.\d+\.({mods})")
    return [lin for lin in linears if pattern.fullmatch(lin.name)]
