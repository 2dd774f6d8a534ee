"""Hub push: what would be uploaded (files, card, repo id, private flag) through the function the push uses;
the card parses with huggingface_hub.ModelCard; a missing token is a clear message. Never the network."""

from __future__ import annotations

import subprocess
import sys

import pytest
from huggingface_hub import ModelCard
from test_loras_library import trained_lora

from zimage.errors import UserError
from zimage.loras.hub import hub_token, prepare_upload, push_lora


def test_upload_folder_has_the_lora_card_and_samples(zhome, tmp_path):
    trained_lora(zhome)
    (zhome.base_models_dir / "tiny-zimage").mkdir(parents=True)
    (zhome.base_models_dir / "tiny-zimage" / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    plan = prepare_upload(zhome, "trained-one", "ann/zzt-lora", tmp_path / "up", private=True)
    assert plan.repo_id == "ann/zzt-lora" and plan.private is True
    assert sorted(plan.files) == [
        "README.md",
        "samples/00-step6.png",
        "samples/01-step6.png",
        "trained-one.safetensors",
    ]
    assert sorted(str(p.relative_to(plan.folder)) for p in plan.folder.rglob("*") if p.is_file()) == sorted(plan.files)

    card = ModelCard.load(plan.folder / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "mit"  # from the base model's own card
    assert data["instance_prompt"] == "zzt" and "lora" in data["tags"]
    assert data["widget"] == [{"text": "prompt 0", "output": {"url": "samples/00-step6.png"}},
                              {"text": "prompt 1", "output": {"url": "samples/01-step6.png"}}]  # fmt: skip
    assert "base_model" not in data  # a local model has no Hub id to name
    assert "| learning_rate | 0.0001 |" in card.text and "Use `zzt` in the prompt." in card.text
    assert 'weight_name="trained-one.safetensors"' in card.text


def test_a_catalogue_base_names_its_hub_repo_and_license(zhome, tmp_path):
    from zimage.loras.hub import base_info

    assert base_info(zhome, "z-image-turbo") == ("Tongyi-MAI/Z-Image-Turbo", "apache-2.0")
    assert base_info(zhome, None) == (None, "other")


def test_bad_repo_ids_and_a_missing_token_are_clear(zhome, tmp_path, monkeypatch):
    trained_lora(zhome)
    for bad in ("no-slash", "a/b/c", "ann/bad name"):
        with pytest.raises(UserError, match="--repo"):
            prepare_upload(zhome, "trained-one", bad, tmp_path / "x")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored login either
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    with pytest.raises(UserError, match="No Hugging Face token.*hf auth login"):
        hub_token()
    with pytest.raises(UserError, match="No Hugging Face token"):
        push_lora(zhome, "trained-one", "ann/zzt-lora", user="ann")


def test_cli_push_dry_run_prints_the_plan(zhome, tmp_path):
    trained_lora(zhome)
    env = {"ZIMAGE_HOME": str(zhome.home), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "zimage.cli", "loras", "push", "trained-one", "--repo", "ann/x",
                          "--private", "--dry-run"], capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "would upload to ann/x (private): README.md, samples/00-step6.png" in out.stdout
    nologin = subprocess.run([sys.executable, "-m", "zimage.cli", "loras", "push", "trained-one", "--repo", "ann/x"],
                             capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert nologin.returncode == 2 and "No Hugging Face token" in nologin.stderr
