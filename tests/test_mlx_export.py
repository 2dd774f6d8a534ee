"""MLX export: the key mapping mflux 0.24 loads for Z-Image (see zimage/loras/mlx.py for the facts read
from mflux), styles converted, layers mflux has no target for refused, the Mac command printed.
mflux itself is not installed in the test environment (MLX would pull its own stack)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zimage.errors import UserError
from zimage.loras.mlx import export_mlx, mflux_loads
from zimage.training.lora_io import LoraModule, read_lora, save_lora

# mflux's key patterns for a block layer (ZImageLoRAMapping: diffusion_model.<layer_type>.{block}.<module>...)
MFLUX_KEY = re.compile(
    r"^diffusion_model\.(layers|noise_refiner|context_refiner)\.\d+\."
    r"(adaLN_modulation\.0|attention\.to_[qkv]|attention\.to_out\.0|feed_forward\.w[123])\.(lora_A\.weight|lora_B\.weight|alpha)$"
)


def _lora(settings, name, paths, meta=None):
    g = torch.Generator().manual_seed(0)
    mods = {p: LoraModule(torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g), 8.0) for p in paths}
    return save_lora(settings.loras_dir / f"{name}.safetensors", mods, meta, torch.float32), mods


def test_export_writes_keys_mflux_maps_with_alpha_and_the_mac_command(zhome):
    src, mods = _lora(zhome, "style", ["layers.0.attention.to_q", "layers.1.feed_forward.w2", "noise_refiner.0.adaLN_modulation.0"],
                      {"trigger_word": "zzs", "base_model_type": "turbo"})  # fmt: skip
    result = export_mlx(zhome, "style")
    assert result.path == zhome.models_dir / "loras" / "mlx" / "style.safetensors" and result.modules == 3
    with safe_open(str(result.path), framework="pt") as fh:
        keys = set(fh.keys())  # noqa: SIM118
        assert {fh.get_tensor(k).dtype for k in keys if not k.endswith(".alpha")} == {torch.float16}
        meta = fh.metadata()
    assert keys and all(MFLUX_KEY.match(k) for k in keys), sorted(keys)
    assert meta["trigger_word"] == "zzs" and meta["exported_for"] == "mflux 0.24"
    back = read_lora(result.path)
    for path, m in mods.items():  # alpha kept: mflux scales lora_B by alpha / rank like diffusers
        assert back.modules[path].alpha == 8.0
        assert torch.equal(back.modules[path].down, m.down.half()) and torch.equal(back.modules[path].up, m.up.half())
    assert (
        result.command
        == 'mflux-generate-z-image-turbo --prompt "zzs, a photo" --lora-paths style.safetensors --lora-scales 1.0 --steps 9 --seed 42'
    )


def test_a_kohya_file_with_fused_qkv_is_rewritten_in_the_mflux_layout(zhome):
    g = torch.Generator().manual_seed(1)
    save_file({"lora_unet_layers_0_attention_qkv.lora_down.weight": torch.randn(2, 32, generator=g),
               "lora_unet_layers_0_attention_qkv.lora_up.weight": torch.randn(96, 2, generator=g),
               "lora_unet_layers_0_attention_qkv.alpha": torch.tensor(2.0)},
              str(zhome.models_dir / "loras" / "kohya.safetensors"))  # fmt: skip
    result = export_mlx(zhome, "kohya", output=zhome.home / "out.safetensors", dtype="bf16")
    with safe_open(str(result.path), framework="pt") as fh:
        keys = set(fh.keys())  # noqa: SIM118
    assert {k.rsplit(".lora_", 1)[0].removesuffix(".alpha") for k in keys} == {
        f"diffusion_model.layers.0.attention.to_{p}" for p in "qkv"
    }
    assert all(MFLUX_KEY.match(k) for k in keys)


def test_layers_mflux_cannot_apply_are_refused(zhome):
    assert mflux_loads("all_final_layer.2-1.adaLN_modulation.1") and mflux_loads("t_embedder.mlp.2")
    assert not mflux_loads("context_refiner.0.adaLN_modulation.0")  # no adaLN in context refiner blocks
    _lora(zhome, "odd", ["layers.0.attention.to_q", "layers.0.attention_norm1"])
    with pytest.raises(UserError, match="no Z-Image target for layers.0.attention_norm1"):
        export_mlx(zhome, "odd")
    assert not (zhome.models_dir / "loras" / "mlx").exists()


def test_cli_export_prints_the_command(zhome):
    _lora(zhome, "cli-style", ["layers.0.attention.to_k"])
    env = {"ZIMAGE_HOME": str(zhome.home), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "zimage.cli", "loras", "export", "cli-style", "--mlx"],
                         capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "for mflux 0.24" in out.stdout and "mflux-generate-z-image-turbo" in out.stdout
