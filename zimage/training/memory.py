"""Peak accelerator memory of a training run, estimated from the real models' shapes.

`estimate_memory(cfg)` reads any object with the flat TrainingConfig names (getattr with defaults) and
returns a `MemoryEstimate`: GiB per item for each phase of a run, the peak phase and its total. Parameter
counts come from closed forms over the model configs (tests check them against the diffusers /
transformers classes instantiated on the meta device): transformer 6.15 B, Qwen3-4B text encoder 4.02 B,
Flux VAE 84 M. Nothing here imports torch, so pages and validation can call it freely.

Formula (bytes). b = 2 for bf16/fp16 compute, 4 for mixed_precision "no". D = dim, F = feed-forward dim.
Tokens per sample: T_img = (H/16)(W/16) and T_cap = caption tokens, each padded to a multiple of 32 as the
transformer pads them; main layers see T = T_img + T_cap, noise_refiner T_img, context_refiner T_cap; B = batch.

- Weights: params x b. quantize "8bit": each nn.Linear weight at 1 B + an fp32 scale per output row;
  "nf4": 0.5 B + an fp32 absmax per 64 values; biases, norms and pad tokens stay at b.
- Trainable: LoRA r(fan_in + fan_out) per targeted linear, fp32 (diffusers' cast_training_params, as the
  trainer does); full fine-tune: every weight, at b (pure bf16 training; fp32 with "no").
- Gradients = trainable params, same dtype (x2 under DDP for the bucket copies).
- Optimizer state per trainable tensor of n values, s bytes each: AdamW 2ns; AdamW8bit 2n + fp32 absmax
  per 256 values (tensors under 4096 values keep 8n); Adafactor (rows + cols)s for matrices, ns for
  vectors; Prodigy 4ns (3ns for the zero-initialised LoRA B).
- Activations, per token, of a block the gradient must pass through (blocks before the first trainable
  module keep nothing, so the default LoRA pays nothing for the refiners):
      6·D·(4 + b)   four block RMSNorms + q/k RMSNorms: diffusers' RMSNorm keeps an fp32 copy + its output
    + 4·D·b         q, k, v and output kept by fused SDPA (flash / memory-efficient: O(T), no T² matrix)
    + 3·F·b         w1, w3 and SiLU outputs of the gated feed-forward
    + Σ fan_in·b    inputs kept for weight gradients: each LoRA'd linear keeps its own autocast copy;
                    a full fine-tune shares them (2D + F)
  = 305 KB per token per main layer for the default LoRA in bf16 (autograd's saved tensors of
  diffusers 0.42's block, measured on the CPU under autocast, agree within a few percent).
  Without gradient checkpointing: Σ over blocks of per-token bytes x tokens x B.
  With it: Σ D·b x tokens x B (each block's input) + one block's full set (recomputed in its backward).
  Both add D·b·T·B (final layer), 3·F·b·T·B (gradient buffers of one feed-forward backward) and b x the
  fp32 trainable params (autocast's bf16 copies).
- Workspace: batch inputs, RoPE tables, 64 MiB (cuBLAS, allocator rounding), twice the dequantised
  weight of the largest quantized linear, and what the optimizer step needs beyond the activations it
  runs after (torch's foreach AdamW allocates one more copy of the second moment).
- Text encoder trained (LoRA): its weights stay, its LoRA joins the trainable items, and its 512-token
  prompts add activations by the same rules (no text-embedding cache then).

Phases, each summed; the estimate is the largest:
- latent caching: the fp32 VAE; its encoder peaks at 5 full-resolution maps of 128 channels per image,
  4 images at a time;
- text caching: the text encoder in bf16 + the hidden states of 4 prompts of 512 tokens;
- training: as above;
- sampling during training: weights + LoRA + optimizer state + a fp32 VAE decode, which peaks at 4
  full-resolution maps of 256 channels (VAE factors measured with the torch profiler, real VAE config).
The caching phases run before the transformer is loaded and free their models before the first step.
The figures compare with torch.cuda.max_memory_allocated(); the card also needs the CUDA context
(~0.5-1 GiB) and allocator slack, see `MemoryEstimate.device_gib`.
"""

from __future__ import annotations

import math
from typing import Any

from zimage.training.memory_result import GIB, MemoryEstimate
from zimage.training.model_shapes import (
    DEFAULT_TARGET_BLOCKS,
    DEFAULT_TARGET_MODULES,
    TINY,
    ZIMAGE,
    Architecture,
    Linear,
    architecture_for,
    lora_targets,
)

DEFAULT_CAPTION_TOKENS = 128  # the longest caption in a batch incl. the chat template; batches pad to it
TEXT_TOKENS = 512  # prompts are padded to 512 tokens before the text encoder (zimage_math.MAX_TEXT_TOKENS)
ENCODE_BATCH = 4  # images / prompts encoded at once while caching (zimage.training.features.ENCODE_BATCH)
SEQ_MULTIPLE = 32  # the transformer pads image and caption tokens to a multiple of this
CUBLAS_AND_ROUNDING = 64 * 2**20  # cuBLAS workspaces and the caching allocator's rounding

__all__ = [
    "DEFAULT_CAPTION_TOKENS", "GIB", "TINY", "ZIMAGE", "Architecture", "MemoryEstimate", "architecture_for",
    "estimate_memory", "gradient_blocks", "memory_savings", "read_settings",
]  # fmt: skip


# -- reading a config ----------------------------------------------------------------------------
_OPTIMIZERS = {"adamw": "adamw", "adam": "adamw", "adamw8bit": "adamw8bit", "adam8bit": "adamw8bit"}
_OPTIMIZERS |= {"adafactor": "adafactor", "prodigy": "prodigy"}


def _quant(value: Any) -> str | None:
    """False/None/"none" -> None; True/"8bit"/"int8" -> "8bit"; "nf4"/"4bit" -> "nf4"."""
    if value is True:
        return "8bit"
    text = str(value or "").strip().lower().replace("-", "").replace("_", "")
    if text in ("", "0", "none", "no", "false", "off"):
        return None
    if text in ("nf4", "4bit", "int4", "fp4"):
        return "nf4"
    return "8bit"


def _side_pair(resolution: Any) -> tuple[int, int]:
    if isinstance(resolution, list | tuple):
        w, h = (int(resolution[0]), int(resolution[-1]))
    elif isinstance(resolution, str) and "x" in resolution.lower():
        w, h = (int(v) for v in resolution.lower().split("x", 1))
    else:
        w = h = int(resolution)
    return max(16, w // 16 * 16), max(16, h // 16 * 16)


def read_settings(cfg: Any) -> dict[str, Any]:
    """The settings the estimate depends on, from any object with the flat TrainingConfig names."""
    g = lambda name, default: default if getattr(cfg, name, None) is None else getattr(cfg, name)  # noqa: E731
    optimizer = str(g("optimizer", "adamw8bit")).lower().replace("_", "").replace("-", "")
    return dict(
        training_type=str(g("training_type", "lora")),
        rank=max(1, int(g("lora_rank", 32))),
        batch=max(1, int(g("batch_size", 1))),
        size=_side_pair(g("resolution", 1024)),
        checkpointing=bool(g("gradient_checkpointing", True)),
        optimizer=_OPTIMIZERS.get(optimizer, optimizer),
        quantize=_quant(g("quantize", False)),
        quantize_te=_quant(g("quantize_te", False)),
        mixed_precision=str(g("mixed_precision", "bf16")),
        train_text_encoder=bool(g("train_text_encoder", False)),
        target_modules=g("lora_target_modules", DEFAULT_TARGET_MODULES),
        target_blocks=g("lora_target_blocks", DEFAULT_TARGET_BLOCKS),
        samples=int(g("sample_every_n_steps", 100)) > 0,
    )


def _pad(n: int) -> int:
    return -(-n // SEQ_MULTIPLE) * SEQ_MULTIPLE


def _quantized_bytes(linears: list[Linear], quant: str | None, b: int) -> float:
    """Weights of `linears` at b bytes, or quantized as bitsandbytes stores them (biases stay at b)."""
    total = 0.0
    for lin in linears:
        w = lin.fan_in * lin.fan_out
        if quant == "8bit":  # int8 values + one fp32 scale per output row (LLM.int8 SCB)
            total += w + 4 * lin.fan_out
        elif quant == "nf4":  # packed 4-bit values + one fp32 absmax per 64-value block
            total += w / 2 + 4 * math.ceil(w / 64)
        else:
            total += w * b
        total += (lin.params - w) * b
    return total


def _optimizer_bytes(kind: str, tensors: list[tuple[int, int, bool]], s: int) -> tuple[float, float]:
    """(state, step temporaries) for trainable tensors given as (rows, cols, zero-initialised)."""
    state, largest, total_n = 0.0, 0, 0
    for rows, cols, zero in tensors:
        n = rows * cols
        largest, total_n = max(largest, n), total_n + n
        if kind == "adamw8bit":  # two uint8 states + blockwise fp32 absmax; small tensors stay 32-bit
            state += 2 * n + 8 * math.ceil(n / 256) if n >= 4096 else 8 * n
        elif kind == "adafactor":  # factored second moment: one value per row and per column
            state += (rows + cols) * s if min(rows, cols) > 1 else n * s
        elif kind == "prodigy":  # exp_avg, exp_avg_sq, s, p0 (p0 is a scalar for an all-zero tensor)
            state += (3 if zero else 4) * n * s
        else:  # AdamW: exp_avg + exp_avg_sq
            state += 2 * n * s
    temp = {"adamw": total_n * s, "adamw8bit": 0, "adafactor": 3 * largest * 4, "prodigy": 2 * largest * s}
    return state, float(temp.get(kind, total_n * s))


def _block_token_bytes(d: int, f: int, b: int, input_bytes: float, qk_norm: bool = True) -> float:
    """Bytes autograd keeps per token in one transformer block (see the module docstring)."""
    norms = (4 * d + (2 * d if qk_norm else 0)) * (4 + b)
    return norms + 4 * d * b + 3 * f * b + input_bytes


def gradient_blocks(arch: Architecture, trainable: set[str] | None) -> list[tuple[str, str]]:
    """Blocks the gradient passes through: those at or after a trainable module on their path."""
    if trainable is None:
        return arch.blocks()
    prefixes = {".".join(name.split(".")[:2]) for name in trainable}
    outside = any(not n.startswith(("noise_refiner.", "context_refiner.", "layers.")) for n in trainable)
    seen = {"img": outside, "cap": outside, "main": outside}
    out = []
    for prefix, stream in arch.blocks():
        if stream == "main":
            seen["main"] = seen["main"] or seen["img"] or seen["cap"] or prefix in prefixes
        else:
            seen[stream] = seen[stream] or prefix in prefixes
        if seen[stream]:
            out.append((prefix, stream))
    return out


def _text_encoder_activations(arch: Architecture, tokens: int, b: int, checkpointing: bool) -> float:
    """A LoRA on every linear of every text-encoder layer, 512-token prompts (padding included)."""
    c = arch.text_encoder
    h, inter, hd, n = (
        int(c["hidden_size"]),
        int(c["intermediate_size"]),
        int(c["head_dim"]),
        int(c["num_hidden_layers"]),
    )
    q, kv = int(c["num_attention_heads"]) * hd, int(c["num_key_value_heads"]) * hd
    inputs = (3 * h + q + 2 * h + inter) * b  # q/k/v share h, o gets q, gate/up h, down inter: one copy each
    per = (2 * h + q + kv) * (4 + b) + 4 * q * b + 3 * inter * b + inputs  # k/v repeated to q heads in SDPA
    hidden = (n + 1) * h * b * tokens  # output_hidden_states keeps every layer's output
    return hidden + (per * tokens if checkpointing else n * per * tokens)


def _estimate(s: dict[str, Any], arch: Architecture, caption_tokens: int, num_processes: int) -> MemoryEstimate:
    notes: list[str] = []
    b = 4 if s["mixed_precision"] == "no" else 2
    d, f = arch.dim, arch.ffn_dim
    qk = bool(arch.transformer.get("qk_norm", True))
    w, h = s["size"]
    batch, finetune = s["batch"], s["training_type"] == "finetune"
    t_img, t_cap = _pad((h // 16) * (w // 16)), _pad(max(1, caption_tokens))
    tokens = {"img": t_img, "cap": t_cap, "main": t_img + t_cap}
    linears = arch.transformer_linears()
    other = arch.transformer_other_params()

    # -- weights, trainable tensors, gradients, optimizer state
    if finetune:
        if s["quantize"]:
            notes.append("quantize ignored: a full fine-tune trains every weight, so none can be quantized")
        s_bytes = b  # pure bf16/fp16 training (fp32 with mixed_precision "no")
        weights = float(arch.transformer_params() * b)
        tensors = [(lin.fan_out, lin.fan_in, False) for lin in linears]
        tensors += [(lin.fan_out, 1, False) for lin in linears if lin.bias] + [(other, 1, False)]
        trainable_names: set[str] | None = None
        lora_params, input_bytes = 0, {prefix: (2 * d + f) * b for prefix, _ in arch.blocks()}
    else:
        s_bytes = 4  # LoRA weights are kept in fp32 (cast_training_params)
        weights = _quantized_bytes(linears, s["quantize"], b) + other * b
        targets = lora_targets(arch, s["target_modules"], s["target_blocks"])
        if not targets:
            notes.append("the LoRA target modules match no transformer linear layer")
        r = s["rank"]
        tensors = [t for lin in targets for t in ((r, lin.fan_in, False), (lin.fan_out, r, True))]
        trainable_names = {lin.name for lin in targets}
        lora_params = sum(r * (lin.fan_in + lin.fan_out) for lin in targets)
        input_bytes = {}
        for lin in targets:  # each LoRA'd linear keeps its own autocast copy of its input
            prefix = ".".join(lin.name.split(".")[:2])
            input_bytes[prefix] = input_bytes.get(prefix, 0) + lin.fan_in * b
    te_weights, te_act = 0.0, 0.0
    if s["train_text_encoder"]:
        te_lins = arch.text_encoder_linears()
        te_weights = _quantized_bytes(te_lins, s["quantize_te"], b) + arch.text_encoder_other_params() * b
        tensors += [t for lin in te_lins for t in ((s["rank"], lin.fan_in, False), (lin.fan_out, s["rank"], True))]
        te_act = _text_encoder_activations(arch, TEXT_TOKENS * batch, b, s["checkpointing"])
        notes.append("train_text_encoder: text embeddings cannot be cached, the text encoder stays on the device")
    trainable = sum(rows * cols for rows, cols, _ in tensors)
    grads = trainable * s_bytes * (2 if num_processes > 1 else 1)  # DDP keeps bucket copies of the gradients
    if num_processes > 1:
        notes.append(f"per device, with {num_processes} data-parallel processes (DDP gradient buckets)")
    if s["optimizer"] not in ("adamw", "adamw8bit", "adafactor", "prodigy"):
        notes.append(f"optimizer {s['optimizer']!r} unknown to the estimate: counted as AdamW")
    opt_state, step_temp = _optimizer_bytes(s["optimizer"], tensors, s_bytes)

    # -- activations
    saving = gradient_blocks(arch, trainable_names)
    per_block = [_block_token_bytes(d, f, b, input_bytes.get(p, 0), qk) * tokens[st] * batch for p, st in saving]
    if s["checkpointing"]:
        blocks = sum(d * b * tokens[st] * batch for _, st in saving) + max(per_block, default=0)
    else:
        blocks = sum(per_block)
    casts = trainable * b if s_bytes != b else 0  # autocast's low-precision copies of fp32 trainables
    activations = blocks + (d * b + 3 * f * b) * tokens["main"] * batch + casts + te_act

    # -- workspace
    lat = 16 * (h // 8) * (w // 8)
    inputs = batch * (6 * lat * 4 + t_cap * int(arch.transformer.get("cap_feat_dim", 2560)) * b)
    rope = 4 * arch.head_dim * (2 * tokens["main"]) * batch  # complex64 tables for every token position
    dequant = 2 * max(lin.fan_in * lin.fan_out for lin in linears) * b if (s["quantize"] and not finetune) else 0
    workspace = CUBLAS_AND_ROUNDING + inputs + rope + dequant + max(0.0, step_temp - activations)

    training = {
        "transformer_weights": weights,
        "text_encoder_weights": te_weights,
        "trainable_params": float((trainable * s_bytes) if not finetune else 0),
        "gradients": float(grads),
        "optimizer_state": opt_state,
        "activations": float(activations),
        "workspace": float(workspace),
    }
    if finetune:
        notes.append(
            "full fine-tune: the transformer weights are the trainable parameters (bf16 weights, grads, state)"
        )
    vc = arch.vae["block_out_channels"]
    phases: dict[str, dict[str, float]] = {
        "latent_caching": {  # fp32 VAE; its encoder peaks at ~5 full-resolution feature maps per image
            "vae_weights": arch.vae_params() * 4.0,
            "vae_workspace": ENCODE_BATCH * 5 * vc[0] * h * w * 4.0,
        },
    }
    if not s["train_text_encoder"]:
        c = arch.text_encoder
        hid, inter = int(c["hidden_size"]), int(c["intermediate_size"])
        te_lins = arch.text_encoder_linears()
        te_bytes = _quantized_bytes(te_lins, s["quantize_te"], 2) + arch.text_encoder_other_params() * 2
        per_tok = ((int(c["num_hidden_layers"]) + 1) * hid + 3 * inter + 4 * hid) * 2
        phases["text_caching"] = {
            "text_encoder_weights": te_bytes,
            "text_encoder_workspace": ENCODE_BATCH * TEXT_TOKENS * per_tok,
        }
    phases["training"] = training
    if s["samples"]:  # gradients are freed (zero_grad(set_to_none)) before sampling; CFG doubles the batch
        phases["sampling"] = {
            "transformer_weights": weights,
            "text_encoder_weights": te_weights,
            "trainable_params": training["trainable_params"],
            "optimizer_state": opt_state,
            "vae_weights": arch.vae_params() * 4.0,
            # the decoder's last upsample runs block_out_channels[1] at full resolution (~4 maps live)
            "sampling_workspace": 4 * vc[min(1, len(vc) - 1)] * h * w * 4.0 + 2 * tokens["main"] * (6 * d + 3 * f) * b,
        }
    in_gib = {p: {k: v / GIB for k, v in items.items()} for p, items in phases.items()}
    params = {
        "transformer": arch.transformer_params(),
        "text_encoder": arch.text_encoder_params(),
        "vae": arch.vae_params(),
        "trainable": trainable,
        "lora": lora_params,
    }
    tok = {"image": t_img, "caption": t_cap, "main": tokens["main"], "batch": batch}
    return MemoryEstimate(in_gib, params, tok, arch.name, notes)


def estimate_memory(
    cfg: Any,
    arch: Architecture | None = None,
    *,
    caption_tokens: int = DEFAULT_CAPTION_TOKENS,
    num_processes: int = 1,
) -> MemoryEstimate:
    """Peak accelerator memory of training with `cfg` (any object with the flat TrainingConfig names).

    `arch`: the model shapes; None follows cfg.model_path (the tiny model, a pipeline folder, else the
    real Z-Image). `caption_tokens`: the longest caption of a batch. `num_processes`: data-parallel ranks.
    """
    arch = arch or architecture_for(cfg)
    return _estimate(read_settings(cfg), arch, caption_tokens, num_processes)


def memory_savings(
    cfg: Any, arch: Architecture | None = None, *, caption_tokens: int = DEFAULT_CAPTION_TOKENS
) -> list[tuple[str, float]]:
    """Settings changes that lower the estimated peak, as (advice, GiB saved), biggest saving first."""
    arch = arch or architecture_for(cfg)
    base = read_settings(cfg)
    before = _estimate(base, arch, caption_tokens, 1).total_gib
    lora = base["training_type"] != "finetune"
    w, h = base["size"]
    options: list[tuple[str, dict[str, Any]]] = []
    if not base["checkpointing"]:
        options.append(("turn on gradient_checkpointing", {"checkpointing": True}))
    if base["optimizer"] in ("adamw", "prodigy"):
        options.append(("use optimizer adamw8bit", {"optimizer": "adamw8bit"}))
    if lora and base["quantize"] != "nf4":
        options.append(("set quantize to nf4 (4-bit frozen transformer; CUDA only)", {"quantize": "nf4"}))
    if lora and base["quantize"] is None:
        options.append(("set quantize to 8bit (CUDA only)", {"quantize": "8bit"}))
    if base["batch"] > 1:
        half = base["batch"] // 2
        options.append((f"lower batch_size to {half} and raise gradient_accumulation", {"batch": half}))
    if max(w, h) > 512:
        side = max(512, (min(w, h) * 3 // 4) // 64 * 64)
        options.append((f"lower resolution to {side}", {"size": (side, side)}))
    if lora and base["rank"] > 8:
        options.append((f"lower lora_rank to {base['rank'] // 2}", {"rank": base["rank"] // 2}))
    if base["mixed_precision"] == "no":
        options.append(("set mixed_precision to bf16", {"mixed_precision": "bf16"}))
    if base["train_text_encoder"]:
        options.append(("turn off train_text_encoder", {"train_text_encoder": False}))
    if base["train_text_encoder"] and base["quantize_te"] is None:
        options.append(("set quantize_te to 8bit (CUDA only)", {"quantize_te": "8bit"}))
    out = []
    for advice, change in options:
        saved = before - _estimate({**base, **change}, arch, caption_tokens, 1).total_gib
        if saved > 0.01:
            out.append((advice, saved))
    return sorted(out, key=lambda item: -item[1])
