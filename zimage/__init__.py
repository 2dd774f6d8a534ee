"""Z-Image LoRA Studio: datasets, captioning, LoRA / fine-tune training, registry and run comparison."""

import logging as _logging

__version__ = "0.1.0"
SOFTWARE_NAME = "zimage-lora-studio"

# bitsandbytes warns on every import on CPUs with AVX512-BF16 that an optional hub kernel is missing; we
# never fetch kernels from a hub, so the warning is noise in every log and CLI run.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
