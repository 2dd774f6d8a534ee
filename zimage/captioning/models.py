"""Captioning models: the catalogue, local folders under models/captioners/, and hub downloads.

Only models that transformers implements natively are loaded (no `trust_remote_code`): BLIP
(`BlipForConditionalGeneration`) and Florence-2 (`Florence2ForConditionalGeneration`). The original
`microsoft/Florence-2-*` repositories ship their own Python code; the `florence-community/Florence-2-*`
repositories hold the same weights converted for transformers' own classes, so those are what we download.
Downloads fetch safetensors and configs only (never pickled weights); the Salesforce BLIP repositories
keep only pickled weights on main, so for them the safetensors come from Hugging Face's conversion PR.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from zimage.errors import UserError
from zimage.settings import Settings

FAMILIES = ("blip", "florence2")
# What a hub download may fetch: configs, tokenizer files and safetensors weights; no .bin/.pt/.h5/code.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
# Hugging Face's bot that opens "safetensors variant" pull requests; transformers trusts only its PRs too.
CONVERSION_BOT, CONVERSION_TITLE = "SFconvertbot", "Adding `safetensors` variant of this model"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


@dataclass(frozen=True)
class CaptionerEntry:
    name: str  # folder name under models/captioners and the id used in configs
    title: str
    family: str  # "blip" | "florence2"
    repo_id: str
    size: str
    description: str = ""


KNOWN_CAPTIONERS: tuple[CaptionerEntry, ...] = (
    CaptionerEntry("florence-2-base", "Florence-2 base", "florence2", "florence-community/Florence-2-base", "0.23 B",
                   "Short, detailed or paragraph captions; fast. Microsoft's weights in transformers' own format."),
    CaptionerEntry("florence-2-large", "Florence-2 large", "florence2", "florence-community/Florence-2-large", "0.77 B",
                   "More accurate detailed captions; about 3x slower than base."),
    CaptionerEntry("blip-base", "BLIP base", "blip", "Salesforce/blip-image-captioning-base", "0.25 B",
                   "Short one-line captions; an optional prompt starts the sentence."),
    CaptionerEntry("blip-large", "BLIP large", "blip", "Salesforce/blip-image-captioning-large", "0.47 B",
                   "Short one-line captions, a little better than base."),
)  # fmt: skip
DEFAULT_CAPTIONER = "florence-2-base"
# Repos that need remote code, mapped to their native-format copies.
ALIASES = {
    "microsoft/Florence-2-base": "florence-2-base",
    "microsoft/Florence-2-large": "florence-2-large",
    "blip": "blip-base",
    "florence-2": "florence-2-base",
}
MARKER = "zimage_captioner.json"  # written next to a downloaded or built model: where it came from, its title
PROBE_TIMEOUT_S = 1.5  # one connection attempt to the hub, no retries, before a download is tried


class CaptionerError(UserError):
    """A captioning model that cannot be used; the message says why and what to do."""


def known_captioner(name: str) -> CaptionerEntry | None:
    name = ALIASES.get(name, name)
    return next((e for e in KNOWN_CAPTIONERS if name in (e.name, e.repo_id)), None)


def model_family(path: Path) -> str:
    """'blip' or 'florence2' for a model folder, from its config.json; refuses anything else."""
    config_path = Path(path) / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CaptionerError(f"{path}: no config.json; not a transformers model folder") from None
    except (OSError, ValueError) as exc:
        raise CaptionerError(f"{config_path}: unreadable ({exc})") from None
    model_type = config.get("model_type")
    if config.get("auto_map"):
        raise CaptionerError(
            f"{path}: this model ships its own Python code (auto_map in config.json), which the studio does not "
            "run. For Florence-2 use florence-community/Florence-2-base or -large (the same weights in "
            "transformers' native format)."
        )
    if model_type not in FAMILIES:
        raise CaptionerError(
            f"{path}: model type {model_type!r} is not a supported captioner (supported: BLIP, Florence-2)"
        )
    return model_type


def missing_files(path: Path) -> list[str]:
    """What a captioner folder lacks (empty: complete)."""
    path = Path(path)
    if not path.is_dir():
        return ["the folder"]
    missing = []
    if not (path / "config.json").exists():
        missing.append("config.json")
    if not any(path.glob("*.safetensors")):
        missing.append("safetensors weights")
    if not ((path / "preprocessor_config.json").exists() or (path / "processor_config.json").exists()):
        missing.append("the image processor config")
    if not any((path / f).exists() for f in ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer_config.json")):
        missing.append("the tokenizer")
    return missing


def _folder_for(name_or_repo: str, settings: Settings) -> Path:
    entry = known_captioner(name_or_repo)
    if entry is not None:
        return settings.captioners_dir / entry.name
    return settings.captioners_dir / name_or_repo.replace("/", "--")


def resolve_captioner(name_or_path: str, settings: Settings) -> tuple[str, Path]:
    """(family, local folder) for a catalogue name, a hub id or a folder path; does not download."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise CaptionerError("model: must name a captioner (e.g. florence-2-base) or a folder")
    name_or_path = name_or_path.strip()
    entry = known_captioner(name_or_path)
    candidate = Path(name_or_path).expanduser()
    if entry is None and candidate.is_absolute():
        if not candidate.is_dir():
            raise CaptionerError(f"model: folder {candidate} does not exist")
        folder = candidate
    elif entry is None and not _REPO_ID.match(name_or_path):
        under = settings.captioners_dir / name_or_path
        if ".." in Path(name_or_path).parts or not under.is_dir():
            names = ", ".join(e.name for e in KNOWN_CAPTIONERS)
            raise CaptionerError(f"model: {name_or_path!r} is not a captioner name ({names}), hub id or folder")
        folder = under
    else:
        folder = _folder_for(name_or_path, settings)
        if missing_files(folder):
            cached = hub_cache_snapshot(entry.repo_id if entry else name_or_path)
            if cached is None:
                shown = entry.name if entry else name_or_path
                raise CaptionerError(
                    f"model: {shown} is not downloaded yet; run `zimage models download {shown}` "
                    f"(it goes to {folder}), or tick 'download if missing'."
                )
            folder = cached
    missing = missing_files(folder)
    if missing:
        raise CaptionerError(f"model: {folder} is incomplete: missing {', '.join(missing)}")
    return model_family(folder), folder


def hub_cache_snapshot(repo_id: str) -> Path | None:
    """A complete copy of `repo_id` in the Hugging Face cache (HF_HOME / HF_HUB_CACHE), found by reading the
    cache folder only (no network): the snapshot `main` points at, else the newest complete one."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    if not _REPO_ID.match(repo_id or ""):
        return None
    repo = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    main = (repo / "refs" / "main").read_text().strip() if (repo / "refs" / "main").is_file() else ""
    found = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: (p.name != main, -p.stat().st_mtime))
    return next((p for p in found if not missing_files(p)), None)


def not_downloaded(name_or_repo: str, why: str = "") -> CaptionerError:
    """The message for a captioner that is neither in models/captioners nor in the hub cache, on a host
    that cannot download it."""
    entry = known_captioner(name_or_repo)
    title = entry.title.split()[0] if entry else name_or_repo  # "BLIP", "Florence-2"
    shown = entry.name if entry else name_or_repo
    return CaptionerError(
        f"{title} is not downloaded; run `zimage models download {shown}` where there is network, or set HF_HOME "
        f"to a cache that has it ({entry.repo_id if entry else name_or_repo}){f'. {why}' if why else ''}"
    )


def hub_unreachable() -> str:
    """Why the hub cannot be reached right now ('' when it can): HF_HUB_OFFLINE, or one connection attempt
    that fails within PROBE_TIMEOUT_S (huggingface_hub itself retries a dead network for ~25 s)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set on this host"
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f"{url.hostname}:{port} cannot be reached from this host ({exc.strerror or type(exc).__name__})"
    return ""


def safetensors_revision(repo_id: str) -> str | None:
    """The revision to download: None (main) when main has safetensors weights, else the newest open
    safetensors-conversion pull request of Hugging Face's conversion bot (the route transformers takes
    itself; e.g. Salesforce/blip-image-captioning-* keep only pickled weights on main). None when neither."""
    from huggingface_hub import HfApi

    api = HfApi()
    if any(f.endswith(".safetensors") for f in api.list_repo_files(repo_id)):
        return None
    prs = [
        d
        for d in api.get_repo_discussions(
            repo_id, author=CONVERSION_BOT, discussion_type="pull_request", discussion_status="open"
        )  # fmt: skip
        if d.title == CONVERSION_TITLE
    ]
    if not prs:
        raise CaptionerError(
            f"{repo_id} has no safetensors weights (only pickled ones, which the studio does not load) and no "
            "safetensors conversion; choose another model or convert it to safetensors yourself."
        )
    return f"refs/pr/{max(prs, key=lambda d: d.num).num}"


def download_captioner(name_or_repo: str, settings: Settings, progress: Callable[[str], None] | None = None) -> Path:
    """Fetch a captioner from the hub into models/captioners/ (resumable; no-op when complete).

    Only configs, tokenizer files and safetensors weights are fetched; where main has no safetensors,
    the conversion bot's pull request is used (see safetensors_revision).
    """
    from huggingface_hub import snapshot_download

    from zimage.catalogue import explain_hub_error

    entry = known_captioner(name_or_repo)
    repo_id = entry.repo_id if entry else name_or_repo
    if not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise CaptionerError(f"model: {name_or_repo!r} is not a hub id (owner/name) or a captioner name")
    folder = _folder_for(name_or_repo, settings)
    if not missing_files(folder):
        return folder
    if why := hub_unreachable():
        raise not_downloaded(name_or_repo, why)
    existed = folder.exists()
    try:
        revision = safetensors_revision(repo_id)
        if progress:
            progress(f"Downloading {repo_id}{f' ({revision})' if revision else ''} into {folder} ...")
        snapshot_download(repo_id, revision=revision, local_dir=folder, allow_patterns=ALLOW_PATTERNS)
    except CaptionerError:
        raise
    except Exception as exc:  # every hub failure becomes one readable paragraph
        if not existed:
            _remove_if_empty(folder)
        message = str(explain_hub_error(exc, repo_id)).replace("models/base/", "models/captioners/")
        raise CaptionerError(message) from exc
    missing = missing_files(folder)
    if missing:
        raise CaptionerError(f"{repo_id} downloaded but lacks {', '.join(missing)} (only safetensors are fetched)")
    model_family(folder)
    (folder / MARKER).write_text(json.dumps({"repo_id": repo_id, "revision": revision}) + "\n")
    return folder


def _remove_if_empty(folder: Path) -> None:
    """Drop a folder a failed download created but filled with nothing but hub bookkeeping."""
    import shutil

    if folder.is_dir() and not any(p.is_file() for p in folder.rglob("*") if ".cache" not in p.parts):
        shutil.rmtree(folder, ignore_errors=True)


def ensure_captioner(
    name_or_path: str, settings: Settings, allow_download: bool = True, progress: Callable[[str], None] | None = None
) -> tuple[str, Path]:
    """resolve_captioner, downloading a catalogue model or hub id first when allowed and needed."""
    try:
        return resolve_captioner(name_or_path, settings)
    except CaptionerError as exc:
        if not allow_download or "not downloaded yet" not in str(exc):
            raise
    folder = download_captioner(name_or_path, settings, progress)
    return model_family(folder), folder


def check_captioner(name_or_path: str, settings: Settings, allow_download: bool = True) -> str:
    """Refuse, before a job is queued, a model that the worker could neither find nor download."""
    try:
        resolve_captioner(name_or_path, settings)
    except CaptionerError as exc:
        if not (allow_download and "not downloaded yet" in str(exc)):
            raise
        if why := hub_unreachable():  # say so now, not after the job has queued and retried for half a minute
            raise not_downloaded(name_or_path.strip(), why) from None
    return name_or_path.strip()


def _marker(folder: Path) -> dict:
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def local_captioners(settings: Settings) -> dict[str, str]:
    """Folder name -> title of complete captioner folders under models/captioners that are not catalogue
    entries (a model copied in by hand, the demo's tiny random-weight BLIP)."""
    known_names = {e.name for e in KNOWN_CAPTIONERS}
    root = settings.captioners_dir
    if not root.is_dir():
        return {}
    out = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if folder.name not in known_names and not missing_files(folder):
            out[folder.name] = str(_marker(folder).get("title") or folder.name)
    return out


def captioner_rows(settings: Settings) -> list[dict]:
    """The catalogue with what is here (models/captioners or the hub cache), then other local folders."""
    rows = []
    for e in KNOWN_CAPTIONERS:
        folder = settings.captioners_dir / e.name
        if not missing_files(folder):
            status = "ready"
        elif cached := hub_cache_snapshot(e.repo_id):
            status = f"ready (HF cache: {cached.parent.parent.name})"
        else:
            status = "not downloaded"
        rows.append(
            {"name": e.name, "model": e.title, "size": e.size, "status": status, "source": e.repo_id,
             "about": e.description}
        )  # fmt: skip
    for name, title in local_captioners(settings).items():
        about = _marker(settings.captioners_dir / name).get("about", "")
        rows.append({"name": name, "model": title, "size": "", "status": "ready", "source": "local", "about": about})
    return rows


def captioner_choices(settings: Settings) -> dict[str, str]:
    """Name -> label of every captioner a person can pick: the catalogue, then local folders."""
    labels = {e.name: f"{e.title} ({e.size})" for e in KNOWN_CAPTIONERS}
    return labels | local_captioners(settings)
