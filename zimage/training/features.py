"""What a run trains on: the scanned dataset, and every latent and text embedding it needs, from the
cache or freshly encoded.

The VAE and the text encoder are loaded only when something is missing from the cache, and are gone
(and accelerator memory freed) before this returns: the training loop only ever holds the transformer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from zimage.data.cache import CacheStats, FeatureCache, component_fingerprint, latent_key, text_key
from zimage.data.training_set import TrainingSet, load_pixels, scan_dataset
from zimage.errors import UserError
from zimage.training import zimage_math

ENCODE_BATCH = 4


@dataclass
class Features:
    latents: list[torch.Tensor]  # one (16, h, w) per training item, same order
    text: dict[str, torch.Tensor]  # caption -> (tokens, hidden)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _free(*modules) -> None:
    from diffusers.training_utils import free_memory

    for m in modules:
        if m is not None:
            m.to("cpu")
    free_memory()


def prepare_features(
    training_set: TrainingSet,
    captions: list[str],
    model_dir: Path,
    cache: FeatureCache,
    device: torch.device,
    text_dtype: torch.dtype,
    stats: CacheStats,
    log: Callable[[str], None] = lambda _m: None,
    beat: Callable[[], None] = lambda: None,
    quantize_te: bool | str = False,
) -> Features:
    """Load or encode the latents of `training_set` and the embeddings of `captions`."""
    model_dir = Path(model_dir)
    vae_dtype = torch.float32  # the VAE is small; fp32 latents keep the cache independent of mixed precision
    vae_fp = component_fingerprint(model_dir / "vae")
    te_fp = component_fingerprint(model_dir / "text_encoder") + component_fingerprint(model_dir / "tokenizer")

    # -- latents
    items = training_set.items
    keys = [latent_key(vae_fp, it.sha256, it.bucket, _dtype_name(vae_dtype)) for it in items]
    latents: list[torch.Tensor | None] = [None] * len(items)
    missing: list[int] = []
    for i, key in enumerate(keys):
        hit = cache.load("latents", key)
        if hit is None:
            missing.append(i)
        else:
            latents[i] = hit["latent"]
    stats.latents_hit += len(items) - len(missing)
    if missing:
        log(f"Encoding {len(missing)} image latent(s) ({len(items) - len(missing)} cached)")
        vae = zimage_math.load_vae(model_dir, device, vae_dtype)
        stats.vae_loaded = True
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i in missing:
            by_bucket.setdefault(items[i].bucket, []).append(i)
        for group in by_bucket.values():
            for start in range(0, len(group), ENCODE_BATCH):
                chunk = group[start : start + ENCODE_BATCH]
                pixels = torch.stack([load_pixels(items[i]) for i in chunk])
                encoded = zimage_math.encode_images(vae, pixels).float().cpu()
                for i, latent in zip(chunk, encoded, strict=True):
                    latents[i] = latent.clone()
                    cache.save("latents", keys[i], {"latent": latents[i]})
                stats.latents_encoded += len(chunk)
                beat()
        del vae
        _free()
    else:
        log(f"All {len(items)} image latents found in the cache")

    # -- text embeddings
    unique = list(dict.fromkeys(captions))
    te_kind = _dtype_name(text_dtype) + (f"-bnb-{quantize_te}" if quantize_te else "")  # quantized: other values
    tkeys = {c: text_key(te_fp, c, zimage_math.MAX_TEXT_TOKENS, te_kind) for c in unique}
    text: dict[str, torch.Tensor] = {}
    for caption, key in tkeys.items():
        hit = cache.load("text", key)
        if hit is not None:
            text[caption] = hit["embedding"]
    stats.text_hit += len(text)
    todo = [c for c in unique if c not in text]
    if todo:
        log(f"Encoding {len(todo)} caption(s) ({len(text)} cached)")
        tokenizer, encoder = zimage_math.load_text_encoder(model_dir, device, text_dtype, quantize=quantize_te)
        stats.text_encoder_loaded = True
        for start in range(0, len(todo), ENCODE_BATCH):
            chunk = todo[start : start + ENCODE_BATCH]
            for caption, emb in zip(chunk, zimage_math.encode_prompts(tokenizer, encoder, chunk), strict=True):
                text[caption] = emb.cpu().clone()
                cache.save("text", tkeys[caption], {"embedding": text[caption]})
            stats.text_encoded += len(chunk)
            beat()
        del tokenizer, encoder
        _free()
    else:
        log(f"All {len(unique)} caption embeddings found in the cache")
    return Features(latents=[lat for lat in latents if lat is not None], text=text)


def scan_training_set(dataset_dir: Path, config, cache: FeatureCache, log: Callable[[str], None]) -> TrainingSet:
    """The usable images of `dataset_dir` with their captions and buckets (config: a TrainingConfig);
    every skipped file and missing caption is logged by name. No usable image at all is a UserError."""
    c = config
    ts = scan_dataset(dataset_dir, c.resolution, c.trigger_word, c.min_image_side or 0, cache)
    for s in ts.skipped:
        log(f"Skipped {s.name}: {s.reason}")
    missing = [it.name for it in ts.items if it.caption_missing]
    if missing:
        log(f"No caption file for {len(missing)} image(s), trained on the trigger word: {', '.join(missing)}")
    if not ts.items:
        raise UserError(f"dataset {dataset_dir}: no usable image ({len(ts.skipped)} skipped, see log.txt)")
    buckets = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(ts.bucket_counts().items()))
    log(f"Dataset {Path(dataset_dir).name}: {len(ts.items)} images, {len(ts.skipped)} skipped; buckets {buckets}")
    return ts
