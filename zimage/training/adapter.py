"""The Turbo training adapter (DESIGN.md section 4): merged at +1.0 for training, reversed for sampling.

Training: the adapter is fused into the transformer's weights with peft and its layers unloaded, so
the user's LoRA trains against Turbo + adapter and no adapter layer is left behind.

Sampling: the adapter is loaded again as a second, unfused peft adapter and weighted -1.0 next to the
user's LoRA at 1.0, so the net weights are the original Turbo + the user's LoRA. Afterwards it is
deleted (never fused: fusing at -1 and then deleting it while the user's adapter exists leaves peft
believing layers are merged and silently skipping the user's LoRA), and the trainable parameters are
chosen again by adapter name (peft marks every active adapter trainable, the loaded one included).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from zimage.training import lora_io

ADAPTER_NAME = "training_adapter"
SAMPLING_ADAPTER_NAME = "training_adapter_reversed"


def merge_adapter(transformer, path: Path, scale: float = 1.0) -> int:
    """Fuse the LoRA file at `path` into `transformer`'s weights; returns how many modules it changed."""
    lora = lora_io.read_lora(Path(path), module_names=[n for n, _ in transformer.named_modules()])
    lora_io.load_into_transformer(transformer, lora, ADAPTER_NAME)
    transformer.fuse_lora(lora_scale=scale, adapter_names=[ADAPTER_NAME])
    transformer.unload_lora()  # the merged weights stay; the adapter layers go
    return len(lora.modules)


def trainable_by_adapter(transformer, adapter_name: str) -> list:
    """Mark exactly the LoRA weights of `adapter_name` trainable (and nothing else); returns them."""
    params = []
    for name, param in transformer.named_parameters():
        mine = f".{adapter_name}." in name and "lora_" in name
        param.requires_grad_(mine)
        if mine:
            params.append(param)
    return params


@contextmanager
def adapter_reversed(
    transformer, lora: lora_io.LoraFile | Path, user_adapter: str = "default", scale: float = -1.0
) -> Iterator[None]:
    """Within the block, `transformer` computes merged weights + user LoRA + `scale` x adapter.

    On exit the adapter is gone, the user's LoRA is the only active adapter at weight 1.0 and only its
    parameters are trainable; the parameter tensors themselves are never touched.
    """
    with warnings.catch_warnings():  # peft warns that a second adapter is being added: that is the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        lora_io.load_into_transformer(transformer, lora, SAMPLING_ADAPTER_NAME)
    try:
        transformer.set_adapters([user_adapter, SAMPLING_ADAPTER_NAME], [1.0, scale])
        yield
    finally:
        transformer.delete_adapters(SAMPLING_ADAPTER_NAME)
        transformer.set_adapters([user_adapter], [1.0])
        trainable_by_adapter(transformer, user_adapter)
