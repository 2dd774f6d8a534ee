import json
import shutil

import pytest

from zimage import catalogue
from zimage.catalogue import CatalogueError, DownloadError, list_models, missing_parts, resolve
from zimage.cli import main


def test_known_models_carry_type_and_sampling_defaults():
    turbo = catalogue.known("z-image-turbo")
    assert turbo.repo_id == "Tongyi-MAI/Z-Image-Turbo" and turbo.model_type == "turbo"
    assert (turbo.sample_steps, turbo.sample_cfg) == (8, 1.0)  # CFG 1.0: off (zimage_math.guidance_scale 0)
    assert turbo.adapter.repo_id == "ostris/zimage_turbo_training_adapter"
    assert turbo.adapter.filename == "zimage_turbo_training_adapter_v2.safetensors"
    de = catalogue.known("ostris/Z-Image-De-Turbo")
    assert de.model_type == "de_turbo" and (de.sample_steps, de.sample_cfg) == (25, 3.0)
    assert catalogue.SAMPLING_DEFAULTS == {"turbo": (8, 1.0), "de_turbo": (25, 3.0), "base": (50, 5.0)}
    base = catalogue.known("Tongyi-MAI/Z-Image")
    assert base.name == "z-image" and base.model_type == "base" and base.adapter is None
    assert (base.sample_steps, base.sample_cfg) == (50, 5.0)  # CFG 5 = the pipeline's guidance_scale 4
    assert catalogue.BASE_REASON in base.description and catalogue.NEGATIVE_PROMPTS["base"]


def test_resolve_tiny_and_local_folders(zhome_demo, tmp_path):
    entry, path = resolve("tiny-zimage", zhome_demo)
    assert path == zhome_demo.base_models_dir / "tiny-zimage" and entry.model_type == "de_turbo"
    outside = tmp_path / "My-De-Turbo-copy"
    shutil.copytree(path, outside)
    (outside / "zimage_model.json").unlink()
    entry2, path2 = resolve(str(outside), zhome_demo)
    assert path2 == outside.resolve() and entry2.model_type == "de_turbo" and entry2.sample_steps == 25
    names = {m.entry.name: m for m in list_models(zhome_demo)}
    assert names["tiny-zimage"].path is not None and names["z-image-turbo"].path is None


def test_scheduler_shift_is_read_from_the_folder(zhome_demo):
    folder = zhome_demo.base_models_dir / "tiny-zimage"
    assert catalogue.scheduler_shift(folder) == 3.0
    other = zhome_demo.base_models_dir / "shift6"
    shutil.copytree(folder, other)
    config = json.loads((other / catalogue.SCHEDULER_CONFIG).read_text())
    (other / catalogue.SCHEDULER_CONFIG).write_text(json.dumps({**config, "shift": 6.0}))
    assert catalogue.scheduler_shift(other) == 6.0
    (other / catalogue.SCHEDULER_CONFIG).write_text(json.dumps({k: v for k, v in config.items() if k != "shift"}))
    assert catalogue.scheduler_shift(other) == 1.0  # diffusers' default
    (other / catalogue.SCHEDULER_CONFIG).write_text("{broken")
    with pytest.raises(CatalogueError, match="scheduler_config.json: cannot be read"):
        catalogue.scheduler_shift(other)


def test_non_pipeline_folder_is_refused_naming_what_is_missing(zhome_demo):
    bad = zhome_demo.base_models_dir / "half"
    shutil.copytree(zhome_demo.base_models_dir / "tiny-zimage", bad)
    shutil.rmtree(bad / "vae")
    (bad / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CatalogueError) as err:
        resolve("half", zhome_demo)
    assert "vae/config.json" in str(err.value) and "transformer weights" in str(err.value)
    idx = json.loads((bad / "model_index.json").read_text())
    idx["_class_name"] = "FluxPipeline"
    (bad / "model_index.json").write_text(json.dumps(idx))
    assert any("FluxPipeline" in m for m in missing_parts(bad))
    row = next(m for m in list_models(zhome_demo) if m.entry.name == "half")
    assert row.path is None and "vae/config.json" in row.problem


def test_unknown_name_and_undownloaded_model_say_what_to_do(zhome):
    with pytest.raises(CatalogueError, match="zimage models download z-image-turbo"):
        resolve("z-image-turbo", zhome)
    with pytest.raises(CatalogueError, match="zimage demo"):
        resolve("tiny-zimage", zhome)
    with pytest.raises(CatalogueError, match="Unknown model 'nope'"):
        resolve("nope", zhome)


def test_offline_download_is_a_clear_message_and_leaves_no_folder(zhome, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError) as err:
        catalogue.download("z-image-de-turbo", zhome)
    msg = str(err.value)
    assert "cannot reach the Hugging Face Hub" in msg and "models/base" in msg
    assert "Traceback" not in msg and "\n" not in msg
    assert not (zhome.base_models_dir / "z-image-de-turbo").exists()
    assert main(["models", "download", "z-image-turbo"]) == 2
    assert "error: Could not download Tongyi-MAI/Z-Image-Turbo" in capsys.readouterr().err


def test_hub_errors_map_to_advice():
    from huggingface_hub import errors

    gated = errors.GatedRepoError.__new__(errors.GatedRepoError)
    assert "gated" in str(catalogue.explain_hub_error(gated, "x/y"))
    missing = errors.RepositoryNotFoundError.__new__(errors.RepositoryNotFoundError)
    assert "not found" in str(catalogue.explain_hub_error(missing, "x/y"))
    assert "disk space" in str(catalogue.explain_hub_error(OSError(28, "No space left"), "x/y"))


def test_models_command_lists_everything(zhome_demo, capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "z-image-turbo" in out and "z-image-de-turbo" in out and "tiny-zimage" in out
    assert "ready" in out and "not local" in out
