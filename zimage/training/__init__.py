"""Training: the trainer recipe, Z-Image maths, LoRA file io, optimizers and the run-folder runner."""
