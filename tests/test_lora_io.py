"""LoRA files: the written format, the reader's key styles, loading into the transformer, the adapter merge."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zimage.training import lora_io
from zimage.training.adapter import merge_adapter
from zimage.training.lora_io import LoraFormatError, LoraModule, read_lora, save_lora

DIM, FF = 32, 85  # the tiny transformer's sizes


def _modules(rank=2, alpha=6.0, seed=0) -> dict[str, LoraModule]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"layers.0.attention.to_q": (DIM, DIM), "layers.1.feed_forward.w2": (DIM, FF)}
    return {
        path: LoraModule(torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g), alpha)
        for path, (o, i) in shapes.items()
    }


def test_written_format_keys_alpha_and_metadata(tmp_path):
    path = save_lora(tmp_path / "x.safetensors", _modules(), {"trigger_word": "zz", "lora_rank": 2}, torch.float32)
    with safe_open(str(path), framework="pt") as fh:
        keys = set(fh.keys())
        meta = fh.metadata()
        alpha = fh.get_tensor("diffusion_model.layers.0.attention.to_q.alpha")
    assert keys == {
        f"diffusion_model.{m}.{s}"
        for m in ("layers.0.attention.to_q", "layers.1.feed_forward.w2")
        for s in ("lora_A.weight", "lora_B.weight", "alpha")
    }
    assert alpha.shape == () and float(alpha) == 6.0
    assert meta["trigger_word"] == "zz" and meta["lora_rank"] == "2"
    assert "lora_adapter_metadata" not in meta  # diffusers would read that as its own adapter config


def test_round_trip_keeps_alpha_different_from_rank(tmp_path):
    mods = _modules(rank=2, alpha=6.0)
    back = read_lora(save_lora(tmp_path / "x.safetensors", mods, dtype=torch.float32))
    assert back.style == "diffusion_model" and set(back.modules) == set(mods)
    for path, m in mods.items():
        assert back.modules[path].alpha == 6.0 and back.modules[path].rank == 2
        assert torch.equal(back.modules[path].down, m.down) and torch.equal(back.modules[path].up, m.up)
        assert back.modules[path].scale == 3.0


def test_save_never_replaces_an_existing_file_unless_asked(tmp_path):
    target = tmp_path / "x.safetensors"
    target.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        save_lora(target, _modules())
    assert target.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # no temp file left behind
    save_lora(target, _modules(), overwrite=True)
    assert read_lora(target).modules


def test_reader_understands_kohya_comfyui_and_diffusers_styles(tmp_path):
    mods = _modules(rank=2, alpha=4.0)
    q, w2 = mods["layers.0.attention.to_q"], mods["layers.1.feed_forward.w2"]
    kohya = {
        "lora_unet_layers_0_attention_to_q.lora_down.weight": q.down,
        "lora_unet_layers_0_attention_to_q.lora_up.weight": q.up,
        "lora_unet_layers_0_attention_to_q.alpha": torch.tensor(4.0),
        "lora_unet_layers_1_feed_forward_w2.lora_down.weight": w2.down,
        "lora_unet_layers_1_feed_forward_w2.lora_up.weight": w2.up,
        "lora_unet_layers_1_feed_forward_w2.alpha": torch.tensor(4.0),
    }
    comfy = {k.replace("lora_unet_layers_0_attention_to_q", "diffusion_model.layers.0.attention.to_q").replace(
        "lora_unet_layers_1_feed_forward_w2", "diffusion_model.layers.1.feed_forward.w2"): v for k, v in kohya.items()}  # fmt: skip
    diffusers = {
        "transformer.layers.0.attention.to_q.lora_A.weight": q.down,
        "transformer.layers.0.attention.to_q.lora_B.weight": q.up,
        "transformer.layers.1.feed_forward.w2.lora_A.weight": w2.down,
        "transformer.layers.1.feed_forward.w2.lora_B.weight": w2.up,
    }
    expected = {p: m.delta() for p, m in mods.items()}
    for name, tensors, style, scale in (
        ("kohya", kohya, "kohya", 2.0),
        ("comfy", comfy, "diffusion_model", 2.0),
        ("diffusers", diffusers, "diffusers", 1.0),  # no alpha: alpha = rank
    ):
        save_file(tensors, tmp_path / f"{name}.safetensors")
        lora = read_lora(tmp_path / f"{name}.safetensors")
        assert lora.style == style and set(lora.modules) == set(mods), name
        exact = read_lora(tmp_path / f"{name}.safetensors", module_names=["layers.0.attention.to_q", *mods])
        assert set(exact.modules) == set(mods), name  # the model's own names give the same mapping
        for path in mods:
            assert torch.allclose(lora.modules[path].delta(), expected[path] * scale / 2.0), (name, path)


def test_reader_splits_fused_kohya_qkv(tmp_path):
    down, up = torch.randn(4, DIM), torch.randn(3 * DIM, 4)
    save_file(
        {
            "lora_unet_layers_0_attention_qkv.lora_down.weight": down,
            "lora_unet_layers_0_attention_qkv.lora_up.weight": up,
            "lora_unet_layers_0_attention_qkv.alpha": torch.tensor(2.0),
        },
        tmp_path / "fused.safetensors",
    )
    lora = read_lora(tmp_path / "fused.safetensors")
    assert set(lora.modules) == {f"layers.0.attention.to_{p}" for p in "qkv"}
    for i, p in enumerate("qkv"):
        m = lora.modules[f"layers.0.attention.to_{p}"]
        assert torch.equal(m.up, up[i * DIM : (i + 1) * DIM]) and m.alpha == 2.0


def test_reader_refuses_what_it_cannot_read(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"pickle")
    with pytest.raises(LoraFormatError, match="only .safetensors"):
        read_lora(tmp_path / "x.bin")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(LoraFormatError, match="junk.safetensors: not a readable"):
        read_lora(tmp_path / "junk.safetensors")
    save_file({"layers.0.attention.to_q.weight": torch.zeros(2, 2)}, tmp_path / "full.safetensors")
    with pytest.raises(LoraFormatError, match="unexpected key 'layers.0.attention.to_q.weight'"):
        read_lora(tmp_path / "full.safetensors")
    save_file({"lora_unet_decoder_9_mlp.lora_down.weight": torch.zeros(2, 2),
               "lora_unet_decoder_9_mlp.lora_up.weight": torch.zeros(2, 2)}, tmp_path / "k.safetensors")  # fmt: skip
    with pytest.raises(LoraFormatError, match="names no Z-Image transformer module"):
        read_lora(tmp_path / "k.safetensors")
    save_file(
        {"diffusion_model.layers.0.attention.to_q.lora_A.weight": torch.zeros(2, DIM)}, tmp_path / "h.safetensors"
    )
    with pytest.raises(LoraFormatError, match="needs both down/A and up/B"):
        read_lora(tmp_path / "h.safetensors")


def _linear_weights(transformer) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}


def test_loading_and_merging_add_exactly_scale_times_up_down(tmp_path, tiny_model_dir):
    from diffusers import ZImageTransformer2DModel

    mods = _modules(rank=2, alpha=6.0)
    path = save_lora(tmp_path / "a.safetensors", mods, dtype=torch.float32)
    transformer = ZImageTransformer2DModel.from_pretrained(tiny_model_dir / "transformer")
    before = _linear_weights(transformer)
    assert merge_adapter(transformer, path) == 2
    after = _linear_weights(transformer)
    assert set(after) == set(before)  # no LoRA layers left behind
    assert not any("lora" in n for n, _ in transformer.named_parameters())
    for name in before:
        expected = before[name] + (mods[name].delta() if name in mods else 0)
        assert torch.allclose(after[name], expected, atol=1e-5), name


def test_load_into_transformer_matches_diffusers_pipeline_loader(tmp_path, tiny_model_dir):
    from diffusers import ZImagePipeline

    path = save_lora(tmp_path / "a.safetensors", _modules(rank=2, alpha=6.0, seed=1), dtype=torch.float32)
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir)
    ours = ZImagePipeline.from_pretrained(tiny_model_dir)
    x = [torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))]
    text = [torch.randn(7, DIM, generator=torch.Generator().manual_seed(1))]
    t = torch.tensor([0.3])
    with torch.no_grad():
        base = pipe.transformer(x, t, text, return_dict=False)[0][0]
    pipe.load_lora_weights(str(path))
    lora_io.load_into_transformer(ours.transformer, path, "mine")
    with torch.no_grad():
        a = pipe.transformer(x, t, text, return_dict=False)[0][0]
        b = ours.transformer(x, t, text, return_dict=False)[0][0]
    assert (a - base).abs().max() > 1e-3  # the LoRA really changed the output
    assert torch.allclose(a, b, atol=1e-6)
