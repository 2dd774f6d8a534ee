"""Publish a LoRA on the Hugging Face Hub: the LoRA file, a model card and its run's samples.

`prepare_upload` writes the folder that would be uploaded (the file, README.md, samples/*.png) and
returns a `PushPlan` saying what goes where; `push_lora` checks the token, then hands that folder to
`HfApi.create_repo` + `HfApi.upload_folder` and nothing else. Tests check the plan; nothing here reaches
the network before the token check has passed.

The card is README.md with YAML front matter from `huggingface_hub.ModelCardData` (base_model, license,
tags, instance_prompt, widget with the sample images and their prompts), so the Hub and
`huggingface_hub.ModelCard` parse it. The license comes from the base model: the license field of the
base folder's own README.md when it has one (a Hub download brings it), else the catalogue's.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from zimage.errors import UserError
from zimage.loras.library import LibraryItem, get_item, last_samples
from zimage.settings import Settings

# Fallback licenses of the catalogue's Tongyi models (Apache-2.0 as published; not re-checked offline). The
# base folder's own README.md front matter wins; an unknown base gets "other".
BASE_LICENSES = {"Tongyi-MAI/Z-Image": "apache-2.0", "Tongyi-MAI/Z-Image-Turbo": "apache-2.0"}
TRAINING_FIELDS = ("learning_rate", "num_steps", "batch_size", "gradient_accumulation", "optimizer", "lr_scheduler",
                   "resolution", "lora_rank", "lora_alpha", "mixed_precision", "seed", "timestep_sampling")  # fmt: skip


@dataclass
class PushPlan:
    repo_id: str
    private: bool
    folder: Path
    files: list[str] = field(default_factory=list)  # paths inside the repo
    card: str = ""


def check_repo_id(repo_id: str) -> str:
    """`user/name`, as the Hub accepts it; a UserError names the field otherwise."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id = (repo_id or "").strip()
    if repo_id.count("/") != 1:
        raise UserError(f"--repo {repo_id or '(empty)'}: must be user/name (or org/name) on the Hub")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UserError(f"--repo {repo_id}: {exc}") from None
    return repo_id


def base_info(settings: Settings, base: str | None) -> tuple[str | None, str]:
    """(the base's Hub repo id or None, its license id) for the card."""
    from zimage import catalogue

    if not base:
        return None, "other"
    entry = catalogue.known(base)
    repo = entry.repo_id if entry else (base if base.count("/") == 1 and not Path(base).exists() else None)
    folder = settings.base_models_dir / (entry.name if entry else Path(base).name)
    license_id = None
    readme = folder / "README.md"
    if readme.is_file():
        from huggingface_hub import ModelCard

        try:
            license_id = ModelCard.load(readme).data.to_dict().get("license")
        except Exception:  # a README without front matter, or one the parser refuses: use the catalogue's
            license_id = None
    return repo, license_id or BASE_LICENSES.get(repo or "", "other")


def model_card(settings: Settings, item: LibraryItem, repo_id: str, samples: list[dict]) -> str:
    """README.md text: YAML front matter (ModelCardData) and a body with the trigger word and settings."""
    from huggingface_hub import ModelCardData

    meta = item.metadata
    base_repo, license_id = base_info(settings, meta.get("base_model"))
    trigger = meta.get("trigger_word") or None
    widget = [{"text": s["prompt"], "output": {"url": s["repo_path"]}} for s in samples]
    data = ModelCardData(
        base_model=base_repo, license=license_id, library_name="diffusers", instance_prompt=trigger, widget=widget,
        tags=["text-to-image", "lora", "diffusers", "z-image", "template:sd-lora"],
    )  # fmt: skip
    config = item.training_config or {}
    settings_lines = [f"| {k} | {config[k]} |" for k in TRAINING_FIELDS if k in config]
    lines = [
        "---", data.to_yaml(), "---", "", f"# {repo_id.split('/')[-1]}", "",
        f"A LoRA for Z-Image ({meta.get('base_model') or 'base model unknown'}), trained with "
        f"{meta.get('software') or 'Z-Image LoRA Studio'} {meta.get('software_version', '')}.".rstrip(), "",
    ]  # fmt: skip
    if trigger:
        lines += ["## Trigger word", "", f"Use `{trigger}` in the prompt.", ""]
    lines += ["## Use it", "", "```python", "import torch", "from diffusers import ZImagePipeline", "",
              f'pipe = ZImagePipeline.from_pretrained("{base_repo or "Tongyi-MAI/Z-Image-Turbo"}", torch_dtype=torch.bfloat16)',
              f'pipe.load_lora_weights("{repo_id}", weight_name="{item.path.name}")', "```", "",
              "The same file loads in ComfyUI (LoraLoaderModelOnly).", ""]  # fmt: skip
    if settings_lines:
        lines += ["## Training settings", "", "| setting | value |", "| --- | --- |", *settings_lines]
        lines += [f"| steps trained | {meta.get('steps', 'unknown')} |",
                  f"| dataset | {meta.get('dataset_name') or 'unknown'} ({meta.get('num_images') or '?'} images) |", ""]  # fmt: skip
    if samples:
        lines += ["## Samples", ""]
        lines += [f"![{s['prompt']}]({s['repo_path']})  \n*{s['prompt']}* (seed {s['seed']})" for s in samples]
        lines.append("")
    return "\n".join(lines)


def prepare_upload(settings: Settings, name: str, repo_id: str, folder: Path, private: bool = True) -> PushPlan:
    """Write into `folder` what a push of LoRA `name` uploads; returns the plan (nothing leaves the machine)."""
    repo_id = check_repo_id(repo_id)
    item = get_item(settings, name, kind="lora")
    if item.damaged:
        raise UserError(f"{item.name}: damaged ({item.problem}); not pushing it")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plan = PushPlan(repo_id=repo_id, private=bool(private), folder=folder)
    shutil.copy2(item.path, folder / item.path.name)
    plan.files.append(item.path.name)
    for extra in item.extras:
        shutil.copy2(extra, folder / extra.name)
        plan.files.append(extra.name)
    samples = []
    for i, s in enumerate(last_samples(item)):
        rel = f"samples/{i:02d}-step{s['step']}.png"
        (folder / "samples").mkdir(exist_ok=True)
        shutil.copy2(s["path"], folder / rel)
        samples.append({**s, "repo_path": rel})
        plan.files.append(rel)
    plan.card = model_card(settings, item, repo_id, samples)
    (folder / "README.md").write_text(plan.card, encoding="utf-8")
    plan.files.append("README.md")
    return plan


def hub_token() -> str:
    """The token of the usual HF login (HF_TOKEN, or `hf auth login`); a UserError says how to get one."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise UserError(
            "No Hugging Face token on this machine: run `hf auth login` (or set HF_TOKEN) with a token that can "
            "write, then push again."
        )
    return token


def push_lora(settings: Settings, name: str, repo_id: str, private: bool = True, user: str | None = None,
              dry_run: bool = False, actor=None) -> PushPlan:  # fmt: skip
    """Upload LoRA `name` with its card and samples to `repo_id` (created if missing) as the HF login."""
    from zimage.loras.library import acting_checked

    item = get_item(settings, name, kind="lora")
    if dry_run:
        folder = Path(tempfile.mkdtemp(prefix="zimage-push-"))
        return prepare_upload(settings, name, repo_id, folder, private)
    token = hub_token()
    # "upload" is the owner-or-admin verb of zimage.auth; the push is recorded as lora.push in events.jsonl
    with (
        acting_checked(settings, user, "upload", item, actor) as note,
        tempfile.TemporaryDirectory(prefix="zimage-push-") as tmp,
    ):
        note["detail"] = f"push to {repo_id}"
        plan = prepare_upload(settings, name, repo_id, Path(tmp), private)
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(plan.repo_id, private=plan.private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=plan.repo_id, folder_path=tmp, commit_message=f"Upload {item.path.name}")
    return plan


def plan_summary(plan: PushPlan) -> str:
    return json.dumps({"repo_id": plan.repo_id, "private": plan.private, "files": sorted(plan.files)})
