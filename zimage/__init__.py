"""Z-Image LoRA Studio: datasets, captioning, LoRA / fine-tune training, registry and run comparison."""

__version__ = "0.1.0"
SOFTWARE_NAME = "zimage-lora-studio"
