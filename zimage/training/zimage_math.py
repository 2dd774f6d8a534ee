"""Everything specific to Z-Image, in one place (DESIGN.md section 4); the training loop knows none of it.

- Text: the prompt goes through the tokenizer's chat template (one user message, generation prompt,
  enable_thinking=True), is padded to 512 tokens, and the embedding is hidden_states[-2] with the
  padding removed: a list of (tokens, hidden) tensors, one per prompt.
- Latents: (vae.encode(x).mode() - shift_factor) * scaling_factor; 16 channels at 1/8 size.
- Noise levels: sigma runs from 0 (clean) to 1 (pure noise). Training draws them with the densities of
  diffusers.training_utils (logit-normal, mode, uniform); "sigmoid" is the logit-normal with mean 0 and
  std 1 the public Z-Image trainers use, and "shift" pushes uniform draws towards noise with the
  flow-match scheduler's static shift (the model's own shift, read from its scheduler config).
- Objective: x_t = (1 - sigma) * x0 + sigma * noise; the transformer takes a list of (C, 1, H, W)
  latents and timestep t = 1 - sigma (the pipeline passes (1000 - t) / 1000), and predicts x0 - noise
  (the sampler negates it).
- CFG: the pipeline computes pos + g * (pos - neg), so the usual "CFG s" is guidance_scale s - 1.

tests/test_zimage_math.py checks each of these against diffusers' own pipeline and scheduler code.
The per-model sampling defaults and the scheduler shift of a model folder are read by config
validation, which must not import zimage.training: they live in zimage.catalogue (the model table).
"""

from __future__ import annotations

from pathlib import Path

import torch

MAX_TEXT_TOKENS = 512  # what the pipeline pads and truncates prompts to
LATENT_CHANNELS = 16
SIDE_MULTIPLE = 16  # VAE scale factor 8 x transformer patch size 2
MODE_SCALE = 1.29  # the SD3 paper's value for the "mode" density
MIN_SIGMA = 1e-3  # never exactly 0: a clean input teaches nothing and breaks sigma-based loss weights


# -- loading ---------------------------------------------------------------------------------------
def load_vae(model_dir: Path, device: torch.device | str, dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(Path(model_dir) / "vae", torch_dtype=dtype, use_safetensors=True)
    return vae.to(device).eval().requires_grad_(False)


def bnb_config(mode: bool | str, library: str, compute_dtype: torch.dtype = torch.bfloat16):
    """The diffusers / transformers BitsAndBytesConfig for quantize = true / "8bit" / "nf4" (None: off)."""
    if not mode:
        return None
    if library == "diffusers":
        from diffusers import BitsAndBytesConfig
    else:
        from transformers import BitsAndBytesConfig
    if mode == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=True,
        )  # fmt: skip
    return BitsAndBytesConfig(load_in_8bit=True)


def load_text_encoder(
    model_dir: Path, device: torch.device | str, dtype: torch.dtype = torch.float32, quantize: bool | str = False
):
    """(tokenizer, text encoder) of the pipeline folder, frozen, on `device` (quantized: CUDA only)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(model_dir) / "tokenizer")
    if quantize:
        encoder = AutoModel.from_pretrained(
            Path(model_dir) / "text_encoder", dtype=dtype, quantization_config=bnb_config(quantize, "transformers", dtype),
            device_map={"": torch.device(device)}, use_safetensors=True,
        )  # fmt: skip
        return tokenizer, encoder.eval().requires_grad_(False)
    encoder = AutoModel.from_pretrained(Path(model_dir) / "text_encoder", dtype=dtype, use_safetensors=True)
    return tokenizer, encoder.to(device).eval().requires_grad_(False)


def load_transformer(model_dir: Path, dtype: torch.dtype = torch.float32, quantize: bool | str = False):
    """The pipeline folder's transformer; `quantize` (true / "8bit" / "nf4") loads it through bitsandbytes."""
    from diffusers import ZImageTransformer2DModel

    compute = dtype if dtype != torch.float32 else torch.bfloat16
    extra = {"quantization_config": bnb_config(quantize, "diffusers", compute)} if quantize else {}
    return ZImageTransformer2DModel.from_pretrained(
        Path(model_dir) / "transformer", torch_dtype=dtype, use_safetensors=True, **extra
    )  # model weights only as safetensors: a pickled .bin is refused, never unpickled


# -- text --------------------------------------------------------------------------------------------
def tokenize_prompts(tokenizer, prompts: list[str], max_length: int = MAX_TEXT_TOKENS):
    """(input ids, boolean attention mask) through the chat template, padded to `max_length`."""
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        for p in prompts
    ]
    inputs = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return inputs.input_ids, inputs.attention_mask.bool()


def embed_tokens(text_encoder, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """hidden_states[-2] with the padding removed: one (tokens, hidden) tensor per row."""
    hidden = text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
    return [hidden[i][mask[i]] for i in range(ids.shape[0])]


@torch.no_grad()
def encode_prompts(
    tokenizer, text_encoder, prompts: list[str], max_length: int = MAX_TEXT_TOKENS
) -> list[torch.Tensor]:
    """One (tokens, hidden) embedding per prompt, exactly as ZImagePipeline.encode_prompt makes it."""
    ids, mask = tokenize_prompts(tokenizer, prompts, max_length)
    device = next(text_encoder.parameters()).device
    return embed_tokens(text_encoder, ids.to(device), mask.to(device))


# -- latents -----------------------------------------------------------------------------------------
@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) pixels in [-1, 1] -> (B, 16, H/8, W/8) latents in the transformer's scale."""
    param = next(vae.parameters())
    latents = vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mode()
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Inverse of encode_images: latents -> pixels in [-1, 1]."""
    param = next(vae.parameters())
    latents = latents.to(param.device, param.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(latents, return_dict=False)[0]


# -- noise levels ------------------------------------------------------------------------------------
def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow-match scheduler's static shift: shift 1 changes nothing, shift 3 spends more time near noise."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def sample_sigmas(
    batch_size: int,
    mode: str,
    *,
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """`batch_size` sigmas in (0, 1] drawn with `mode` (sigmoid | logit_normal | uniform | shift | mode).

    `shift` is used by "shift" only (1.0: no shift); the trainer passes the config's timestep_shift,
    which validation fills from the model's scheduler config.
    """
    from diffusers.training_utils import compute_density_for_timestep_sampling as density

    if mode == "sigmoid":
        u = density("logit_normal", batch_size, 0.0, 1.0, generator=generator)
    elif mode == "logit_normal":
        u = density("logit_normal", batch_size, logit_mean, logit_std, generator=generator)
    elif mode == "mode":
        u = density("mode", batch_size, mode_scale=MODE_SCALE, generator=generator)
    elif mode in ("uniform", "shift"):
        u = density("uniform", batch_size, generator=generator)
        if mode == "shift":
            u = shift_sigmas(u, shift)
    else:
        raise ValueError(f"unknown timestep sampling {mode!r}")
    u = u.clamp(MIN_SIGMA, 1.0)
    return u if u.device == torch.device(device) else u.to(device)


def loss_weights(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights (none | sigma_sqrt | cosmap), as in diffusers' SD3 recipe."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(scheme, sigmas).float()


# -- the objective -----------------------------------------------------------------------------------
def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Flow matching: a straight line from the clean latent (sigma 0) to pure noise (sigma 1)."""
    s = sigmas.view(-1, *([1] * (x0.dim() - 1)))
    if s.dtype != x0.dtype:
        s = s.to(x0.dtype)
    return torch.lerp(x0, noise, s)  # (1 - s) * x0 + s * noise in one kernel


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the Z-Image transformer predicts (the negated flow velocity noise - x0)."""
    return x0 - noise


def model_timestep(sigmas: torch.Tensor) -> torch.Tensor:
    """The transformer's timestep for noise level sigma: it runs from 0 (noise) to 1 (clean)."""
    return 1.0 - sigmas


def predict(transformer, x_t: torch.Tensor, sigmas: torch.Tensor, text: list[torch.Tensor]) -> torch.Tensor:
    """Run the transformer on a (B, C, H, W) batch; returns (B, C, H, W) in the input's layout."""
    latents = list(x_t.unsqueeze(2).unbind(0))  # a list of (C, 1, H, W): the frame axis the model expects
    out = transformer(latents, model_timestep(sigmas).to(x_t.dtype), text, return_dict=False)[0]
    return torch.stack(out, dim=0).squeeze(2)


def flow_loss(pred: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor, weighting: str = "none") -> torch.Tensor:
    """MSE of the prediction in fp32, optionally weighted per sample by its noise level."""
    if pred.dtype != torch.float32:
        pred = pred.float()
    if target.dtype != torch.float32:
        target = target.float()
    if weighting == "none":  # one fused kernel for the common case
        return torch.nn.functional.mse_loss(pred, target)
    per_sample = ((pred - target) ** 2).mean(dim=tuple(range(1, pred.dim())))
    return (per_sample * loss_weights(weighting, sigmas)).mean()


# -- sampling ----------------------------------------------------------------------------------------
def guidance_scale(cfg: float) -> float:
    """The pipeline's guidance_scale for a CFG value in the usual sense (it computes pos + g * (pos - neg))."""
    return max(0.0, float(cfg) - 1.0)
