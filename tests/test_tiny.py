import hashlib

import torch
from safetensors.torch import load_file

from zimage.tiny import build_tiny_pipeline, write_tiny_model


def _digest(folder):
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.safetensors")):
        h.update(f.relative_to(folder).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_tiny_pipeline_loads_through_diffusers_and_generates_finite_output(tiny_model_dir):
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    pipe = ZImagePipeline.from_pretrained(tiny_model_dir)
    assert isinstance(pipe.transformer, ZImageTransformer2DModel)
    assert pipe.vae.config.latent_channels == 16
    assert pipe.vae.config.scaling_factor == 0.3611 and pipe.vae.config.shift_factor == 0.1159
    assert type(pipe.text_encoder).__name__ == "Qwen3Model"
    assert type(pipe.tokenizer).__name__ == "Qwen2Tokenizer"
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    out = pipe(
        "zshape, a red circle",
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=0.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 3, 64, 64)
    assert torch.isfinite(out).all()


def test_chat_template_matches_the_pipeline_call(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, padding="max_length", max_length=512, return_tensors="pt")
    assert ids.input_ids.shape == (1, 512) and int(ids.attention_mask.sum()) < 512


def test_same_seed_gives_byte_identical_weights(tmp_path, tiny_model_dir):
    again = tmp_path / "again"
    assert write_tiny_model(again, seed=0)
    assert _digest(again) == _digest(tiny_model_dir)
    other = tmp_path / "other"
    write_tiny_model(other, seed=1)
    assert _digest(other) != _digest(tiny_model_dir)
    a = load_file(again / "transformer" / "diffusion_pytorch_model.safetensors")
    assert torch.isfinite(a["x_pad_token"]).all() and a["x_pad_token"].abs().sum() > 0


def test_build_is_deterministic_in_memory():
    a = build_tiny_pipeline(3).transformer.state_dict()
    b = build_tiny_pipeline(3).transformer.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_write_refuses_to_overwrite_and_leaves_no_temp(tmp_path, tiny_model_dir):
    target = tmp_path / "m"
    assert write_tiny_model(target)
    before = {p: p.stat().st_mtime_ns for p in target.rglob("*")}
    assert not write_tiny_model(target)
    assert {p: p.stat().st_mtime_ns for p in target.rglob("*")} == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
