"""zimage_math against diffusers' own Z-Image pipeline and flow-match scheduler on the tiny model.

Each convention the trainer relies on (shift, timestep, x_t, target, latent scale, text, CFG) is checked
against the code that samples with it, so a change on either side shows up here.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from zimage import catalogue
from zimage.training import zimage_math


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture()
def scheduler(tiny_model_dir):
    return FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_model_dir / "scheduler")


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- noise levels ------------------------------------------------------------------------------------
def test_shift_matches_the_schedulers_sigmas_and_comes_from_the_models_config(scheduler, tiny_model_dir):
    shift = catalogue.scheduler_shift(tiny_model_dir)
    assert shift == scheduler.config.shift == 3.0 and not scheduler.config.use_dynamic_shifting
    base = get_default_z_image_sigmas(8)  # what ZImagePipeline hands the scheduler
    scheduler.set_timesteps(sigmas=base)
    ours = zimage_math.shift_sigmas(torch.tensor(base), shift)
    torch.testing.assert_close(ours, scheduler.sigmas[:-1].float(), rtol=1e-6, atol=1e-6)
    assert torch.equal(zimage_math.shift_sigmas(torch.tensor(base), 1.0), torch.tensor(base))


def test_sigma_draws_use_diffusers_densities():
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    ours = zimage_math.sample_sigmas(64, "sigmoid", generator=g1)
    theirs = compute_density_for_timestep_sampling("logit_normal", 64, 0.0, 1.0, generator=g2)
    torch.testing.assert_close(ours, theirs.clamp(zimage_math.MIN_SIGMA, 1.0))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    shifted = zimage_math.sample_sigmas(64, "shift", shift=3.0, generator=g1)
    uniform = compute_density_for_timestep_sampling("uniform", 64, generator=g2)
    torch.testing.assert_close(shifted, zimage_math.shift_sigmas(uniform, 3.0).clamp(zimage_math.MIN_SIGMA, 1.0))
    for mode in ("sigmoid", "logit_normal", "uniform", "shift", "mode"):
        s = zimage_math.sample_sigmas(256, mode, shift=3.0, generator=torch.Generator().manual_seed(1))
        assert s.shape == (256,) and s.min() >= zimage_math.MIN_SIGMA and s.max() <= 1.0, mode
    with pytest.raises(ValueError, match="unknown timestep sampling"):
        zimage_math.sample_sigmas(2, "cubic")


def test_timestep_mapping_matches_the_pipeline(scheduler):
    scheduler.set_timesteps(sigmas=get_default_z_image_sigmas(5))
    pipeline_t = (1000 - scheduler.timesteps) / 1000  # ZImagePipeline's transformer timestep
    torch.testing.assert_close(zimage_math.model_timestep(scheduler.sigmas[:-1]), pipeline_t, rtol=0, atol=1e-6)


# -- the objective -----------------------------------------------------------------------------------
def test_noisy_latents_match_the_schedulers_scale_noise(scheduler):
    x0, noise = _randn(1, 16, 4, 4, seed=1), _randn(1, 16, 4, 4, seed=2)
    scheduler.set_timesteps(sigmas=[0.9, 0.5, 0.2])
    for t, sigma in zip(scheduler.timesteps, scheduler.sigmas[:-1], strict=True):
        theirs = scheduler.scale_noise(x0, t[None], noise)
        torch.testing.assert_close(zimage_math.noisy_latents(x0, noise, sigma[None]), theirs, rtol=1e-5, atol=1e-6)


def test_a_perfect_prediction_takes_the_schedulers_euler_step_to_the_clean_latent(scheduler):
    x0, noise = _randn(1, 16, 4, 4, seed=3), _randn(1, 16, 4, 4, seed=4)
    scheduler.set_timesteps(sigmas=[0.6])  # one step: sigma 0.6 -> 0
    sigma = scheduler.sigmas[:1]
    x_t = zimage_math.noisy_latents(x0, noise, sigma)
    target = zimage_math.flow_target(x0, noise)
    out = scheduler.step(-target, scheduler.timesteps[0], x_t, return_dict=False)[0]  # the pipeline negates
    torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-5)


def test_predict_is_the_pipelines_transformer_call(pipe):
    """One pipeline step from sigma 1 to 0 moves the latents by exactly -(-output) = predict(...)."""
    latents = _randn(1, 16, 8, 8, seed=5)
    text = zimage_math.encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a red circle"])
    out = pipe(prompt_embeds=text, height=64, width=64, num_inference_steps=1, guidance_scale=0.0,
               latents=latents.clone(), output_type="latent").images  # fmt: skip
    with torch.no_grad():
        pred = zimage_math.predict(pipe.transformer, latents, torch.tensor([1.0]), text)
    assert pred.shape == latents.shape
    torch.testing.assert_close(out, latents + pred, rtol=1e-5, atol=1e-5)


def test_flow_loss_is_diffusers_weighted_mse():
    pred, target, sigmas = _randn(3, 16, 4, 4, seed=6), _randn(3, 16, 4, 4, seed=7), torch.tensor([0.2, 0.5, 0.9])
    plain = zimage_math.flow_loss(pred.bfloat16(), target, sigmas)
    torch.testing.assert_close(plain, torch.nn.functional.mse_loss(pred.bfloat16().float(), target))
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    for scheme in ("sigma_sqrt", "cosmap"):
        weights = compute_loss_weighting_for_sd3(scheme, sigmas)
        torch.testing.assert_close(zimage_math.flow_loss(pred, target, sigmas, scheme), (per_sample * weights).mean())


# -- latents, text, CFG --------------------------------------------------------------------------------
def test_latent_scale_follows_the_vae_config_and_the_pipelines_decode(pipe):
    assert (pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor) == (0.1159, 0.3611)  # the real VAE's
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(8)) * 2 - 1
    latents = zimage_math.encode_images(pipe.vae, pixels)
    raw = pipe.vae.encode(pixels).latent_dist.mode()
    assert latents.shape == (1, zimage_math.LATENT_CHANNELS, 8, 8)
    torch.testing.assert_close(latents, (raw - 0.1159) * 0.3611)
    with torch.no_grad():  # what ZImagePipeline does before decoding
        theirs = pipe.vae.decode(latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
    torch.testing.assert_close(zimage_math.decode_latents(pipe.vae, latents), theirs, rtol=1e-5, atol=1e-5)


def test_prompt_encoding_matches_the_pipeline(pipe):
    prompts = ["zshape, a red circle", ""]
    ours = zimage_math.encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts)
    theirs, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    assert [t.shape for t in ours] == [t.shape for t in theirs]
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_guidance_scale_gives_the_usual_cfg_in_the_pipeline(pipe):
    """CFG s in the usual sense, neg + s * (pos - neg), is the pipeline's pos + g * (pos - neg) at g = s - 1."""
    assert zimage_math.guidance_scale(1.0) == 0.0 and zimage_math.guidance_scale(0.5) == 0.0  # CFG off
    latents = _randn(1, 16, 8, 8, seed=9)
    pos, neg = zimage_math.encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a red circle", ""])
    cfg = 3.0
    out = pipe(prompt_embeds=[pos], negative_prompt_embeds=[neg], height=64, width=64, num_inference_steps=1,
               guidance_scale=zimage_math.guidance_scale(cfg), latents=latents.clone(), output_type="latent").images  # fmt: skip
    with torch.no_grad():
        p = zimage_math.predict(pipe.transformer, latents, torch.tensor([1.0]), [pos])
        n = zimage_math.predict(pipe.transformer, latents, torch.tensor([1.0]), [neg])
    assert (p - n).abs().max() > 1e-4  # the prompts really differ, so the check below means something
    torch.testing.assert_close(out, latents + n + cfg * (p - n), rtol=1e-4, atol=1e-5)
