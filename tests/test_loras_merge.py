"""LoRA merges on the tiny model, checked through diffusers' own loading and real forward passes:
exact (ranks concatenated) equals the weighted sum of the two adapters, SVD reports the error it keeps,
--into-model bakes a transformer folder, union of layer sets, clear errors for mismatches."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from zimage.errors import UserError
from zimage.loras.merge import MergeInput, bake_into_model, merge_loras, parse_spec
from zimage.training.lora_io import PREFIX, LoraModule, read_lora, save_lora

DIM, FF = 32, 85  # the tiny transformer's sizes
SHAPES = {"layers.0.attention.to_q": (DIM, DIM), "layers.1.feed_forward.w2": (DIM, FF),
          "layers.1.attention.to_k": (DIM, DIM), "noise_refiner.0.feed_forward.w1": (FF, DIM)}  # fmt: skip


def lora(folder, name, paths, rank, alpha, seed, base="tiny-zimage"):
    g = torch.Generator().manual_seed(seed)
    mods = {p: LoraModule(torch.randn(rank, SHAPES[p][1], generator=g) * 0.3,
                          torch.randn(SHAPES[p][0], rank, generator=g) * 0.3, alpha) for p in paths}  # fmt: skip
    meta = {"base_model": base, "trigger_word": name, "lora_rank": str(rank), "lora_alpha": str(alpha)}
    return save_lora(folder / f"{name}.safetensors", mods, meta, torch.float32), mods


@pytest.fixture()
def pair(zhome_demo, tmp_path):
    a, ma = lora(tmp_path, "a", ["layers.0.attention.to_q", "layers.1.feed_forward.w2"], rank=2, alpha=6.0, seed=0)
    b, mb = lora(tmp_path, "b", ["layers.0.attention.to_q", "layers.1.attention.to_k", "noise_refiner.0.feed_forward.w1"],
                 rank=3, alpha=1.5, seed=1)  # fmt: skip
    return zhome_demo, (a, ma), (b, mb)


def inputs():
    g = torch.Generator().manual_seed(5)
    x = [torch.randn(16, 1, 8, 8, generator=g)]
    return x, torch.tensor([0.4]), [torch.randn(7, DIM, generator=g)]


def forward(transformer):
    x, t, text = inputs()
    with torch.no_grad():
        return transformer(x, t, text, return_dict=False)[0][0]


def pipe(settings):
    from diffusers import ZImagePipeline

    return ZImagePipeline.from_pretrained(settings.base_models_dir / "tiny-zimage")


def weighted_reference(settings, a, b, wa=0.8, wb=-0.5):
    """The two LoRAs loaded by diffusers as two adapters with weights: the sum the merge must equal."""
    p = pipe(settings)
    p.load_lora_weights(str(a), adapter_name="a")
    p.load_lora_weights(str(b), adapter_name="b")
    p.transformer.set_adapters(["a", "b"], [wa, wb])
    return forward(p.transformer)


def comfy_key_check(path, transformer) -> None:
    """The written layout ComfyUI and diffusers load (DESIGN.md section 4): diffusion_model.<module>.{lora_A,lora_B,alpha}."""
    names = {n for n, _ in transformer.named_modules()}
    with safe_open(str(path), framework="pt") as fh:
        keys = list(fh.keys())  # noqa: SIM118
        for key in keys:
            assert key.startswith(PREFIX), key
            module, _, suffix = key[len(PREFIX) :].rpartition(".lora_")
            if not module:
                module, suffix = key[len(PREFIX) : -len(".alpha")], "alpha"
                assert fh.get_tensor(key).shape == ()
            assert module in names and ".qkv" not in module, key
            assert suffix in ("A.weight", "B.weight", "alpha"), key


def test_parse_spec():
    assert parse_spec("A.safetensors:0.8") == MergeInput(__import__("pathlib").Path("A.safetensors"), 0.8)
    assert parse_spec("/x/b.safetensors").weight == 1.0
    with pytest.raises(UserError, match="must be a number"):
        parse_spec("a.safetensors:strong")


def test_exact_merge_equals_the_weighted_sum_in_diffusers(pair):
    settings, (a, ma), (b, mb) = pair
    result = merge_loras(settings, [MergeInput(a, 0.8), MergeInput(b, -0.5)], "ab")
    assert result.path == settings.models_dir / "loras" / "merged" / "ab.safetensors" and result.method == "exact"
    merged = read_lora(result.path)
    assert set(merged.modules) == set(ma) | set(mb)  # the union of the layer sets
    assert merged.modules["layers.0.attention.to_q"].rank == 5  # 2 + 3 where both adapt
    assert merged.modules["layers.1.feed_forward.w2"].rank == 2
    for path, m in merged.modules.items():
        assert m.alpha == m.rank  # scale 1: the inputs' alpha / rank went into the downs
        want = 0.8 * (ma[path].delta() if path in ma else 0) - 0.5 * (mb[path].delta() if path in mb else 0)
        assert torch.allclose(m.delta(), want, atol=1e-6), path
    meta = merged.metadata
    assert meta["base_model"] == "tiny-zimage" and meta["trigger_word"] == "a, b" and meta["merge_method"] == "exact"

    p = pipe(settings)
    base = forward(p.transformer)
    comfy_key_check(result.path, p.transformer)
    p.load_lora_weights(str(result.path))  # diffusers' own loader
    out = forward(p.transformer)
    ref = weighted_reference(settings, a, b)
    assert (ref - base).abs().max() > 1e-3  # the LoRAs really change the output
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()


def test_svd_merge_reports_the_error_it_keeps(pair):
    settings, (a, ma), (b, mb) = pair
    specs = [MergeInput(a, 0.8), MergeInput(b, -0.5)]
    low = merge_loras(settings, specs, "ab-r1", rank=1)
    assert low.method == "svd" and low.rank == 1 and 0.05 < low.relative_error < 1.0
    merged = read_lora(low.path)
    assert all(m.rank == 1 for m in merged.modules.values())
    assert float(merged.metadata["merge_relative_error"]) == pytest.approx(low.relative_error, rel=1e-5)
    err2 = norm2 = 0.0
    for path, m in merged.modules.items():  # the reported error is the real one
        want = 0.8 * (ma[path].delta() if path in ma else 0) - 0.5 * (mb[path].delta() if path in mb else 0)
        err2 += float(((m.delta() - want) ** 2).sum())
        norm2 += float((want**2).sum())
    assert (err2 / norm2) ** 0.5 == pytest.approx(low.relative_error, rel=1e-3)
    assert set(low.layer_errors) == set(merged.modules) and low.worst_layer[1] == max(low.layer_errors.values())

    full = merge_loras(settings, specs, "ab-r5", rank=5)
    assert full.relative_error < 1e-6
    p = pipe(settings)
    p.load_lora_weights(str(full.path))
    assert torch.allclose(forward(p.transformer), weighted_reference(settings, a, b), atol=1e-5)


def test_into_model_bakes_a_transformer_folder(pair):
    from diffusers import ZImageTransformer2DModel

    settings, (a, _ma), (b, _mb) = pair
    result = bake_into_model(settings, [MergeInput(a, 0.8), MergeInput(b, -0.5)], "baked", dtype="fp32")
    assert result.path == settings.finetuned_dir / "baked" and (result.path / "zimage_finetune.json").is_file()
    baked = ZImageTransformer2DModel.from_pretrained(result.path / "transformer")
    assert not any("lora" in n for n, _ in baked.named_parameters())
    assert torch.allclose(forward(baked), weighted_reference(settings, a, b), atol=1e-5)
    with pytest.raises(UserError, match="already exists"):
        bake_into_model(settings, [MergeInput(a, 1.0), MergeInput(b, 1.0)], "baked")


def test_mismatches_are_clear_errors_and_nothing_is_overwritten(pair, tmp_path):
    settings, (a, _), (b, _) = pair
    other = tmp_path / "o"
    other.mkdir()
    c, _ = lora(other, "c", ["layers.0.attention.to_q"], rank=2, alpha=2.0, seed=3, base="z-image-turbo")
    with pytest.raises(UserError, match="different base models"):
        merge_loras(settings, [MergeInput(a, 1), MergeInput(c, 1)], "x")
    wide = {"layers.0.attention.to_q": LoraModule(torch.zeros(2, 64), torch.zeros(DIM, 2), 2.0)}
    d = save_lora(other / "d.safetensors", wide, None, torch.float32)
    with pytest.raises(UserError, match="layer layers.0.attention.to_q is 32x32 in a.safetensors but 32x64"):
        merge_loras(settings, [MergeInput(a, 1), MergeInput(d, 1)], "x")
    with pytest.raises(UserError, match="at least two"):
        merge_loras(settings, [MergeInput(a, 1)], "x")
    first = merge_loras(settings, [MergeInput(a, 1), MergeInput(b, 1)], "same")
    before = first.path.read_bytes()
    with pytest.raises(UserError, match="already exists"):
        merge_loras(settings, [MergeInput(a, 2), MergeInput(b, 1)], "same")
    assert first.path.read_bytes() == before


def test_cli_merge_by_library_name_with_svd(pair):
    settings, (a, _), (b, _) = pair
    import shutil

    shutil.copy(a, settings.loras_dir / "a.safetensors")  # one by library name, one by path
    env = {"ZIMAGE_HOME": str(settings.home), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "zimage.cli", "loras", "merge", "a:0.8", f"{b}:0.5", "-o", "cli-m",
                          "--rank", "2"], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (
        "relative error kept" in out.stdout
        and (settings.models_dir / "loras" / "merged" / "cli-m.safetensors").is_file()
    )
    listed = subprocess.run([sys.executable, "-m", "zimage.cli", "loras", "list"], capture_output=True, text=True,
                            env=env, timeout=120)  # fmt: skip
    assert "merged/cli-m" in listed.stdout


def test_a_viewer_may_not_merge_or_bake(pair):
    from zimage.auth import Actor, PermissionDenied

    settings, (a, _ma), (b, _mb) = pair
    merging = [MergeInput(a, 0.8), MergeInput(b, 0.5)]
    viewer = Actor("vic", "viewer", "ui", mode="password")
    with pytest.raises(PermissionDenied):
        merge_loras(settings, merging, "by-viewer", actor=viewer)
    with pytest.raises(PermissionDenied):
        bake_into_model(settings, merging, "baked-by-viewer", actor=viewer)
    assert not (settings.loras_dir / "by-viewer.safetensors").exists()
    assert not (settings.finetuned_dir / "baked-by-viewer").exists()
    member = Actor("mia", "member", "ui", mode="password")
    assert merge_loras(settings, merging, "by-member", actor=member).path.is_file()
