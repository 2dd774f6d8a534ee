"""Start a run from an existing LoRA (`init_lora: PATH`): any file lora_io reads, ComfyUI-style included.

The file decides the LoRA's shape: rank, alpha and target modules / blocks come from it. A config that
sets one of them explicitly (a value other than the TrainingConfig default) to something else is refused
with both values named, before the model is loaded. The weights then go into the peft adapter through
peft's own `set_peft_model_state_dict`, after the adapter was created with the file's shape.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from zimage.config.schema import TARGET_BLOCKS, TARGET_MODULES, TrainingConfig
from zimage.errors import UserError
from zimage.training import lora_io

_PATH = re.compile(rf"^({'|'.join(TARGET_BLOCKS)})\.\d+\.(.+)$")
_DEFAULTS = {
    f.name: (f.default_factory() if callable(f.default_factory) else f.default) for f in fields(TrainingConfig)
}


class InitLoraError(UserError):
    """An init_lora file that does not fit the config; the message names the field and both values."""


@dataclass(frozen=True)
class LoraShape:
    rank: int
    alpha: float
    blocks: list[str]
    modules: list[str]


def lora_shape(lora: lora_io.LoraFile, path: Path) -> LoraShape:
    """Rank, alpha and targets of a LoRA file; one rank and one alpha for every module, targets we train."""
    ranks = {m.rank for m in lora.modules.values()}
    alphas = {m.alpha if m.alpha is not None else float(m.rank) for m in lora.modules.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise InitLoraError(f"init_lora {path.name}: modules have ranks {sorted(ranks)} and alphas {sorted(alphas)}; "
                            "continuing needs one rank and one alpha")  # fmt: skip
    blocks, modules = set(), set()
    for name in lora.modules:
        match = _PATH.match(name)
        if match is None or match.group(2) not in TARGET_MODULES:
            raise InitLoraError(f"init_lora {path.name}: {name} is not a module the trainer targets "
                                f"({', '.join(TARGET_MODULES)} in {', '.join(TARGET_BLOCKS)})")  # fmt: skip
        blocks.add(match.group(1))
        modules.add(match.group(2))
    order = {m: i for i, m in enumerate((*TARGET_BLOCKS, *TARGET_MODULES))}
    return LoraShape(ranks.pop(), float(alphas.pop()), sorted(blocks, key=order.get), sorted(modules, key=order.get))


def with_file_shape(
    config: TrainingConfig, path: Path | None, log: Callable[[str], None] = lambda _m: None
) -> tuple[TrainingConfig, lora_io.LoraFile | None]:
    """(config with the file's rank, alpha and targets, the file read); (config, None) without a file.
    A config that sets one of them explicitly to another value: InitLoraError naming both values."""
    if path is None:
        return config, None
    lora = lora_io.read_lora(Path(path))
    shape = lora_shape(lora, Path(path))
    wanted = {"lora_rank": shape.rank, "lora_alpha": shape.alpha, "lora_target_blocks": shape.blocks,
              "lora_target_modules": shape.modules}  # fmt: skip
    for name, from_file in wanted.items():
        given = getattr(config, name)
        same = sorted(given) == sorted(from_file) if isinstance(given, list) else given == from_file
        if not same and given != _DEFAULTS[name]:
            raise InitLoraError(
                f"{name} = {given!r} in the config, but init_lora {Path(path).name} has {name} = {from_file!r}: "
                f"remove {name} from the config (it comes from the file) or set it to {from_file!r}"
            )
    log(f"Continuing from {Path(path).name}: rank {shape.rank}, alpha {shape.alpha:g}, {len(lora.modules)} modules")
    return config.replace(**wanted), lora


def load_weights(model, lora: lora_io.LoraFile, adapter_name: str) -> None:
    """The file's weights into `model`'s peft adapter (created with the file's shape)."""
    from peft import set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    wanted = get_peft_model_state_dict(model, adapter_name=adapter_name)
    state = lora_io.peft_state(lora.modules)
    missing = sorted(set(wanted) - set(state))
    if missing or any(state[k].shape != wanted[k].shape for k in wanted):
        raise InitLoraError(
            f"init_lora: its modules do not match the transformer (e.g. {(missing or list(wanted))[0]})"
        )
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    if getattr(result, "unexpected_keys", None):
        raise InitLoraError(f"init_lora: peft did not take {result.unexpected_keys[:3]}")
