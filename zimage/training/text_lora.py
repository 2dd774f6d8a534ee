"""A LoRA on the Qwen3 text encoder, trained together with the transformer's (train_text_encoder).

While the text encoder trains, its embeddings change every step, so they cannot come from the cache:
each step tokenizes the batch's captions (token ids are cached per caption) and runs the encoder with
gradients. The LoRA covers attention and MLP projections of every layer up to the one whose output
Z-Image uses (hidden_states[-2]; the last layer's output is never used, so it gets no LoRA).

Saved next to the transformer LoRA as `<output_name>.text_encoder.safetensors` with keys
`text_encoder.<module path>.lora_A.weight` / `.lora_B.weight` / `.alpha` (diffusers' Z-Image LoRA loader
reads transformer keys only, so the text encoder part is a separate file that peft loads).
"""

from __future__ import annotations

from pathlib import Path

import torch

from zimage.fsio import atomic_path
from zimage.training import lora_io, zimage_math
from zimage.training.adapter import trainable_by_adapter

ADAPTER = "default"
PREFIX = "text_encoder."
TE_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


def text_encoder_lora_path(output_path: Path) -> Path:
    """Where the text encoder LoRA of the LoRA file `output_path` goes."""
    return output_path.with_name(f"{output_path.stem}.text_encoder.safetensors")


class TextEncoderLora:
    """The trainable text encoder of one run: tokenizer, encoder with a peft LoRA, its parameters.

    `fp32_weights`: keep the LoRA weights in fp32 under bf16 / fp16 autocast (mixed precision).
    """

    def __init__(
        self, model_dir: Path, device: torch.device, dtype: torch.dtype, *, rank: int, alpha: float,
        dropout: float = 0.0, gradient_checkpointing: bool = False, fp32_weights: bool = False,
    ):  # fmt: skip
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig, inject_adapter_in_model  # (transformers' add_adapter wants a newer peft)

        self.device = device
        self.tokenizer, encoder = zimage_math.load_text_encoder(model_dir, device, dtype)
        used = encoder.config.num_hidden_layers - 1  # hidden_states[-2] is the output of layer used - 1
        layers = "|".join(str(i) for i in range(used))
        inner = "|".join(m.replace(".", r"\.") for m in TE_MODULES)
        self.lora_config = LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=True,
            target_modules=rf"^layers\.({layers})\.({inner})$",
        )  # fmt: skip
        encoder = inject_adapter_in_model(self.lora_config, encoder, adapter_name=ADAPTER)
        if fp32_weights:
            cast_training_params(encoder, dtype=torch.float32)
        if gradient_checkpointing:
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        encoder.train()
        self.params = trainable_by_adapter(encoder, ADAPTER)
        self.encoder = encoder
        self.alpha = float(alpha)
        self._tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _tokenize(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        if caption not in self._tokens:
            ids, mask = zimage_math.tokenize_prompts(self.tokenizer, [caption])
            self._tokens[caption] = (ids[0], mask[0])
        return self._tokens[caption]

    def encode(self, captions: list[str], model=None) -> list[torch.Tensor]:
        """Embeddings of `captions` through the (prepared) encoder, with gradients when enabled."""
        pairs = [self._tokenize(c) for c in captions]
        ids = torch.stack([p[0] for p in pairs]).to(self.device)
        mask = torch.stack([p[1] for p in pairs]).to(self.device)
        return zimage_math.embed_tokens(model if model is not None else self.encoder, ids, mask)

    def embed_now(self, prompts: list[str], unwrapped, autocast) -> dict[str, torch.Tensor]:
        """prompt -> embedding with the encoder's current weights, without gradients (samples)."""
        was_training = unwrapped.training
        unwrapped.eval()
        try:
            with torch.no_grad(), autocast():
                return dict(zip(prompts, self.encode(prompts, unwrapped), strict=True))
        finally:
            unwrapped.train(was_training)

    def modules(self, unwrapped) -> dict[str, lora_io.LoraModule]:
        return lora_io.peft_modules(unwrapped, ADAPTER, self.alpha)

    def save(self, unwrapped, path: Path, metadata: dict[str, str], dtype: torch.dtype, overwrite: bool) -> Path:
        """Write the text encoder LoRA atomically (the same no-silent-overwrite rule as the main file)."""
        from safetensors.torch import save_file

        tensors = {}
        for name, m in sorted(self.modules(unwrapped).items()):
            tensors[f"{PREFIX}{name}.lora_A.weight"] = m.down.detach().to("cpu", dtype).contiguous()
            tensors[f"{PREFIX}{name}.lora_B.weight"] = m.up.detach().to("cpu", dtype).contiguous()
            tensors[f"{PREFIX}{name}.alpha"] = torch.tensor(self.alpha)
        with atomic_path(path, overwrite=overwrite) as tmp:
            save_file(tensors, str(tmp), metadata={**metadata, "part": "text_encoder"})
        return path

    def load(self, unwrapped, path: Path) -> None:
        """Put saved LoRA weights (a checkpoint's) back into the encoder's adapter, in place."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        saved = {k.removeprefix(PREFIX): v for k, v in load_file(str(path)).items() if not k.endswith(".alpha")}
        result = set_peft_model_state_dict(unwrapped, saved, adapter_name=ADAPTER)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(
                f"{path}: {len(unexpected)} weight(s) fit no text encoder LoRA layer, e.g. {unexpected[0]}"
            )
