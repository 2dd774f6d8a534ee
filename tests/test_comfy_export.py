"""ComfyUI export of a fine-tune: the key list ComfyUI's Z-Image (Lumina 2) layout has, qkv fused in
q, k, v order, bf16 / fp8_e4m3fn, and nothing lost (mapped back, it runs like the original)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from zimage.errors import UserError
from zimage.loras.comfy import comfy_key, export_finetune

# ComfyUI's key names for the tiny model (2 layers, 1 noise / 1 context refiner), from the map recorded in
# zimage/loras/comfy.py (ComfyUI comfy/utils.py z_image_to_diffusers); context_refiner has no adaLN.
BLOCK_KEYS = ["attention.qkv.weight", "attention.q_norm.weight", "attention.k_norm.weight", "attention.out.weight",
              "attention_norm1.weight", "attention_norm2.weight", "ffn_norm1.weight", "ffn_norm2.weight",
              "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight"]  # fmt: skip
ADALN = ["adaLN_modulation.0.weight", "adaLN_modulation.0.bias"]
TOP_KEYS = ["x_embedder.weight", "x_embedder.bias", "final_layer.linear.weight", "final_layer.linear.bias",
            "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias", "x_pad_token",
            "cap_pad_token", "cap_embedder.0.weight", "cap_embedder.1.weight", "cap_embedder.1.bias",
            "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias"]  # fmt: skip
EXPECTED = set(TOP_KEYS)
for block in ("layers.0", "layers.1", "noise_refiner.0", "context_refiner.0"):
    EXPECTED |= {f"{block}.{k}" for k in BLOCK_KEYS + ([] if block.startswith("context") else ADALN)}


@pytest.fixture()
def finetune(zhome, tiny_model_dir):
    folder = zhome.finetuned_dir / "ft"
    shutil.copytree(tiny_model_dir / "transformer", folder / "transformer")
    (folder / "zimage_finetune.json").write_text('{"base_model": "tiny-zimage"}')
    return zhome, folder


def _read(path):
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()  # noqa: SIM118


def _back_to_diffusers(comfy: dict) -> dict:
    """The inverse map (test only): split qkv, rename back; used to prove no weight was lost."""
    inverse = {}
    for key, value in comfy.items():
        if key.endswith(".attention.qkv.weight"):
            block = key[: -len(".attention.qkv.weight")]
            for proj, part in zip("qkv", value.chunk(3, dim=0), strict=True):
                inverse[f"{block}.attention.to_{proj}.weight"] = part
            continue
        for d_key in [key.replace("q_norm", "norm_q"), key.replace("k_norm", "norm_k"),
                      key.replace("attention.out.", "attention.to_out.0."), key.replace("x_embedder", "all_x_embedder.2-1"),
                      key.replace("final_layer.", "all_final_layer.2-1."), key]:  # fmt: skip
            try:
                if comfy_key(d_key) == key:
                    inverse[d_key] = value
                    break
            except UserError:
                continue
    return inverse


def test_bf16_export_has_comfyuis_key_list_and_loses_nothing(finetune, tiny_model_dir):
    from diffusers import ZImageTransformer2DModel

    settings, folder = finetune
    result = export_finetune(settings, "ft")
    assert result.path == settings.models_dir / "exports" / "comfyui" / "ft-bf16.safetensors"
    tensors, meta = _read(result.path)
    assert set(tensors) == EXPECTED
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert meta["zimage_layout"] == "comfyui" and meta["base_model"] == "tiny-zimage"
    # ComfyUI's detection of Z-Image (model_detection.py, Lumina 2 branch) keys on these two
    assert "cap_embedder.1.weight" in tensors and "noise_refiner.0.attention.k_norm.weight" in tensors

    original = ZImageTransformer2DModel.from_pretrained(tiny_model_dir / "transformer")
    sd = original.state_dict()
    qkv = tensors["layers.1.attention.qkv.weight"]
    assert qkv.shape == (96, 32)
    want = torch.cat([sd[f"layers.1.attention.to_{p}.weight"] for p in "qkv"]).to(torch.bfloat16)
    assert torch.equal(qkv, want)

    back = _back_to_diffusers(tensors)
    assert set(back) == set(sd)
    rebuilt = ZImageTransformer2DModel.from_pretrained(tiny_model_dir / "transformer")
    rebuilt.load_state_dict({k: v.float() for k, v in back.items()}, strict=True)
    g = torch.Generator().manual_seed(0)
    x, t, text = [torch.randn(16, 1, 8, 8, generator=g)], torch.tensor([0.5]), [torch.randn(5, 32, generator=g)]
    original.to(torch.bfloat16).float()  # the same rounding the export did
    with torch.no_grad():
        a = original(x, t, text, return_dict=False)[0][0]
        b = rebuilt(x, t, text, return_dict=False)[0][0]
    assert torch.equal(a, b)

    with pytest.raises(UserError, match="already exists"):
        export_finetune(settings, "ft")


def test_fp8_export_casts_matrices_and_keeps_norms(finetune):
    settings, _ = finetune
    result = export_finetune(settings, "ft", dtype="fp8_e4m3fn")
    tensors, _ = _read(result.path)
    assert set(tensors) == EXPECTED
    assert tensors["layers.0.feed_forward.w1.weight"].dtype == torch.float8_e4m3fn
    assert tensors["layers.0.attention.q_norm.weight"].dtype == torch.bfloat16
    assert tensors["x_pad_token"].dtype == torch.bfloat16 and tensors["x_embedder.bias"].dtype == torch.bfloat16


def test_unknown_keys_are_refused_and_the_cli_exports(finetune, tmp_path):
    settings, folder = finetune
    with pytest.raises(UserError, match="no name for"):
        comfy_key("layers.0.attention.extra_proj.weight")
    env = {"ZIMAGE_HOME": str(settings.home), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "zimage.cli", "finetunes", "export", "ft", "--comfy", "-o",
                          str(tmp_path / "c.safetensors")], capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "ComfyUI layout" in out.stdout and (tmp_path / "c.safetensors").is_file()
