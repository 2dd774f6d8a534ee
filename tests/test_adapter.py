"""The Turbo training adapter: +1 merge for training, -1 on top for sampling, three key styles."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import save_file

from zimage.training import lora_io, zimage_math
from zimage.training.adapter import SAMPLING_ADAPTER_NAME, adapter_reversed, merge_adapter, trainable_by_adapter

TARGETS = (
    "layers.0.attention.to_q",
    "layers.1.attention.to_v",
    "layers.1.feed_forward.w2",
    "noise_refiner.0.attention.to_k",
)


def _modules(transformer, rank: int = 2, seed: int = 5) -> dict[str, lora_io.LoraModule]:
    g = torch.Generator().manual_seed(seed)
    mods = dict(transformer.named_modules())
    out = {}
    for path in TARGETS:
        layer = mods[path]
        down = torch.randn(rank, layer.in_features, generator=g) * 0.3
        up = torch.randn(layer.out_features, rank, generator=g) * 0.3
        out[path] = lora_io.LoraModule(down, up, alpha=float(rank))  # alpha = rank: every style agrees
    return out


def _kohya_name(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def write_styles(folder, modules) -> dict[str, object]:
    """The same adapter as a diffusion_model (ComfyUI), diffusers and kohya file."""
    comfy = lora_io.save_lora(folder / "comfy.safetensors", modules, dtype=torch.float32)
    diffusers_state, kohya_state = {}, {}
    for path, m in modules.items():
        diffusers_state[f"transformer.{path}.lora_A.weight"] = m.down.contiguous()
        diffusers_state[f"transformer.{path}.lora_B.weight"] = m.up.contiguous()
        kohya_state[f"{_kohya_name(path)}.lora_down.weight"] = m.down.contiguous()
        kohya_state[f"{_kohya_name(path)}.lora_up.weight"] = m.up.contiguous()
        kohya_state[f"{_kohya_name(path)}.alpha"] = torch.tensor(float(m.rank))
    save_file(diffusers_state, str(folder / "diffusers.safetensors"))
    save_file(kohya_state, str(folder / "kohya.safetensors"))
    return {
        "diffusion_model": comfy,
        "diffusers": folder / "diffusers.safetensors",
        "kohya": folder / "kohya.safetensors",
    }


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    base = zimage_math.load_transformer(tiny_model_dir)
    files = write_styles(folder, _modules(base))
    return tiny_model_dir, base, files


def test_all_three_key_styles_merge_to_the_same_weights(setup):
    model_dir, base, files = setup
    expected = _modules(base)
    merged = {}
    for style, path in files.items():
        assert lora_io.read_lora(path).style == style
        model = zimage_math.load_transformer(model_dir)
        assert merge_adapter(model, path) == len(TARGETS)
        assert not getattr(model, "peft_config", None)  # fused and unloaded: no adapter layer left
        merged[style] = {n: p.detach().clone() for n, p in model.named_parameters()}
    base_params = dict(base.named_parameters())
    for path, m in expected.items():
        want = base_params[f"{path}.weight"].detach() + m.delta()
        for style in files:
            assert torch.allclose(merged[style][f"{path}.weight"], want, atol=1e-5), (style, path)
    untouched = "layers.0.attention.to_k.weight"
    assert all(torch.equal(merged[s][untouched], base_params[untouched]) for s in files)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 8, 8, generator=g)
    text = [torch.randn(7, 32, generator=g)]
    return x, torch.tensor([0.6]), text


def test_sampling_at_minus_one_gives_base_plus_user_lora_and_leaves_training_weights(setup, tmp_path):
    model_dir, base, files = setup
    model = zimage_math.load_transformer(model_dir)
    merge_adapter(model, files["diffusion_model"])
    model.add_adapter(
        LoraConfig(r=4, lora_alpha=8, target_modules=r"^layers\.\d+\.(attention\.to_[qv]|feed_forward\.w2)$")
    )
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # a user LoRA that does something (peft starts lora_B at zero)
        for name, p in model.named_parameters():
            if ".default." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    params = trainable_by_adapter(model, "default")
    # Layers only the adapter targets keep a peft wrapper (`.base_layer.`) around the very same weight.
    before = {n.replace(".base_layer", ""): p.detach().clone() for n, p in model.named_parameters()}
    x, sigma, text = _inputs()
    with torch.no_grad():
        training_out = zimage_math.predict(model, x, sigma, text)
        with adapter_reversed(model, lora_io.read_lora(files["kohya"])):
            assert sorted(model.active_adapters()) == sorted(["default", SAMPLING_ADAPTER_NAME])
            sampled = zimage_math.predict(model, x, sigma, text)
        after_out = zimage_math.predict(model, x, sigma, text)

    # The reference: the original model plus the user's LoRA, loaded from its saved file as anyone would.
    from peft.utils import get_peft_model_state_dict

    user = lora_io.save_lora(
        tmp_path / "user.safetensors",
        lora_io.modules_from_peft(get_peft_model_state_dict(model, adapter_name="default"), 8.0),
        dtype=torch.float32,
    )
    reference = zimage_math.load_transformer(model_dir)
    lora_io.load_into_transformer(reference, user, "user")
    with torch.no_grad():
        want = zimage_math.predict(reference, x, sigma, text)
        plain = zimage_math.predict(zimage_math.load_transformer(model_dir), x, sigma, text)
    assert torch.allclose(sampled, want, atol=1e-5)
    assert not torch.allclose(sampled, plain, atol=1e-3)  # the user's LoRA is in the sample (trap 1)
    assert not torch.allclose(sampled, training_out, atol=1e-3)  # and the adapter really was reversed

    # Training continues on exactly the same weights, with only the user's LoRA trainable (trap 2).
    after = {n.replace(".base_layer", ""): p.detach() for n, p in model.named_parameters()}
    assert after.keys() == before.keys()
    assert max((after[n] - before[n]).abs().max().item() for n in before) <= 1e-6
    assert torch.equal(after_out, training_out)
    assert set(model.peft_config) == {"default"} and model.active_adapters() == ["default"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == len(params) and all(any(p is q for q in params) for p in trainable)
