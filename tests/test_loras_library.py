"""The LoRAs library: trained, hand-copied, damaged and fine-tune items; its run, samples; delete; the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from zimage.errors import UserError
from zimage.loras.library import UNKNOWN, delete_item, describe, get_item, last_samples, list_items
from zimage.runfolder import RunFolder
from zimage.training.lora_io import LoraModule, save_lora

ROOT = Path(__file__).resolve().parents[1]
DIM = 32


def modules(rank=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "layers.0.attention.to_q": LoraModule(
            torch.randn(rank, DIM, generator=g), torch.randn(DIM, rank, generator=g), 4.0
        )
    }


def trained_lora(settings, name="trained-one", user="ann"):
    """A LoRA file as a run writes it, its run folder (status with output_path, two sampled steps)."""
    meta = {"base_model": "tiny-zimage", "trigger_word": "zzt", "lora_rank": "2", "lora_alpha": "4", "steps": "6",
            "dataset_name": "demo-shapes", "dataset_hash": "abc123", "num_images": "3",
            "training_config": json.dumps({"sample_prompt": "zzt, a red square", "learning_rate": 1e-4})}  # fmt: skip
    path = save_lora(settings.loras_dir / f"{name}.safetensors", modules(), meta, torch.float32)
    rf = RunFolder(settings.runs_dir / f"run-{name}")
    rf.write_config({"output_name": name})
    rf.update_status(state="completed", kind="train", user=user, output_path=str(path))
    (rf.path / "samples").mkdir()
    for step in (3, 6):
        for i in range(2):
            rel = f"samples/step-{step:06d}-{i}.png"
            Image.new("RGB", (16, 16), (40 * step, 0, 0)).save(rf.path / rel)
            rf.append_sample({"step": step, "path": rel, "prompt": f"prompt {i}", "seed": 7 + i})
    rf.append_metrics({"step": 6, "loss": 0.5, "val_loss": 0.25})
    return path, rf


def test_lists_trained_copied_damaged_and_finetune_items(zhome):
    trained, rf = trained_lora(zhome)
    copied_dir = zhome.models_dir / "loras"
    save_lora(copied_dir / "from-civitai.safetensors", modules(rank=3, seed=1), None, torch.float32)
    (copied_dir / "broken.safetensors").write_bytes(b"\x00\x01 not a header")
    (copied_dir / ".tmp-half.safetensors").write_bytes(b"temp")  # an atomic write in progress: not listed
    ft = zhome.finetuned_dir / "my-ft" / "transformer"
    ft.mkdir(parents=True)
    (ft / "config.json").write_text("{}")
    from safetensors.torch import save_file

    save_file({"layers.0.attention.to_q.weight": torch.zeros(2, 2)}, str(ft / "diffusion_pytorch_model.safetensors"))
    (ft.parent / "zimage_finetune.json").write_text(json.dumps({"base_model": "tiny-zimage", "steps": 9}))

    items = {i.name: i for i in list_items(zhome)}
    assert set(items) == {"trained-one", "from-civitai", "broken", "my-ft"}

    t = describe(items["trained-one"])
    assert t["base model"] == "tiny-zimage" and t["trigger word"] == "zzt" and t["rank"] == "2"
    assert t["dataset hash"] == "abc123" and t["run"] == rf.run_id and t["owner"] == "ann"
    assert t["val_loss"] == "0.25 (its run's last)"  # from metrics.jsonl: the file has none

    c = describe(items["from-civitai"])  # no metadata at all: every field is unknown, the rank from the shapes
    assert c["state"] == "ok" and c["base model"] == UNKNOWN and c["trigger word"] == UNKNOWN
    assert c["rank"] == "3 (from the weights)" and c["run"] == UNKNOWN and c["val_loss"] == UNKNOWN

    b = items["broken"]
    assert b.damaged and "not a readable safetensors file" in b.problem
    assert describe(b)["state"].startswith("damaged: ")

    f = describe(items["my-ft"])
    assert items["my-ft"].kind == "finetune" and f["steps"] == "9" and f["base model"] == "tiny-zimage"


def test_last_samples_are_the_last_sampled_step_of_its_run(zhome):
    trained_lora(zhome)
    samples = last_samples(get_item(zhome, "trained-one"))
    assert [(s["step"], s["prompt"], s["seed"]) for s in samples] == [(6, "prompt 0", 7), (6, "prompt 1", 8)]
    assert all(s["path"].is_file() for s in samples)


def test_delete_needs_a_user_and_removes_the_file_and_its_text_encoder_part(zhome):
    path, _rf = trained_lora(zhome)
    te = path.with_name(f"{path.stem}.text_encoder.safetensors")
    save_lora(te, modules(), None, torch.float32)
    item = get_item(zhome, "trained-one")
    assert item.extras == [te]  # listed with its LoRA, not as an item of its own
    with pytest.raises(UserError, match="say who you are"):
        delete_item(zhome, "trained-one", user=None)
    assert path.exists()
    gone = delete_item(zhome, "trained-one", user="ann")
    assert gone.path == path and not path.exists() and not te.exists()
    with pytest.raises(UserError, match="no LoRA or fine-tune of that name"):
        get_item(zhome, "trained-one")


def _cli(*args, home):
    env = {"ZIMAGE_HOME": str(home), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "zimage.cli", "loras", *args], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip


def test_cli_list_show_and_delete(zhome):
    trained_lora(zhome)
    (zhome.models_dir / "loras" / "broken.safetensors").write_bytes(b"junk")
    out = _cli("list", home=zhome.home)
    assert out.returncode == 0, out.stderr
    assert "trained-one" in out.stdout and "zzt" in out.stdout and "DAMAGED" in out.stdout
    show = _cli("show", "trained-one", home=zhome.home)
    assert show.returncode == 0 and "dataset hash   abc123" in show.stdout and "sample         step 6" in show.stdout
    refused = _cli("delete", "trained-one", home=zhome.home)  # no terminal, no --yes: nothing goes
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert (zhome.loras_dir / "trained-one.safetensors").exists()
    done = _cli("delete", "trained-one", "--yes", home=zhome.home)
    assert done.returncode == 0 and not (zhome.loras_dir / "trained-one.safetensors").exists()
    missing = _cli("show", "nope", home=zhome.home)
    assert missing.returncode == 2 and "nope: no LoRA or fine-tune" in missing.stderr


def test_delete_follows_ownership_owner_or_admin_and_is_recorded(zhome):
    from zimage.auth import Actor, PermissionDenied

    (zhome.home / "settings.toml").write_text('[auth]\nmode = "password"\n')
    path, rf = trained_lora(zhome, user="ann")
    bob = Actor(name="bob", role="member", source="ui", mode="password")
    with pytest.raises(PermissionDenied, match="owned by ann"):
        delete_item(zhome, "trained-one", user=None, actor=bob)
    assert path.exists()
    admin = Actor(name="root", role="admin", source="ui", mode="password")
    delete_item(zhome, "trained-one", user=None, actor=admin)
    assert not path.exists()
    events = [json.loads(line) for line in (zhome.home / "events.jsonl").read_text().splitlines()]
    assert [(e["user"], e["action"], e["result"], e["owner"]) for e in events][-2:] == [
        ("bob", "lora.delete", "refused", "ann"),
        ("root", "lora.delete", "done", "ann"),
    ]
    assert (rf.path / "events.jsonl").is_file()  # the run the LoRA came from keeps its history too
