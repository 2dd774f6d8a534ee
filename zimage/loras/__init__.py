"""Where LoRAs go after training: the library of LoRA files and fine-tunes in a home, merging, the Hub,
ComfyUI and MLX exports (issue 14). No torch at import; each module imports it where it needs it.

    library  every LoRA and fine-tune under models/: metadata, size, its run, samples, delete
    merge    weighted merges: exact (ranks concatenated), SVD to a smaller rank, baked into a transformer
    hub      the model card and the upload folder for the Hugging Face Hub, and the push itself
    comfy    a fine-tune as one ComfyUI single-file transformer checkpoint (bf16 / fp8_e4m3fn)
    mlx      a LoRA in the key layout mflux loads on a Mac
"""
