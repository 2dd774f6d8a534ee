"""What a captioning job is asked to do (its config.json), and which images that selects.

Pages and the CLI build the dict with `caption_config(...)` (validated, unknown keys refused) and pass it
to `zimage.jobs.enqueue(settings, "caption", config)`; the worker reads it back with CaptionConfig.from_dict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from zimage.captioning.models import DEFAULT_CAPTIONER
from zimage.data.folders import DatasetFolder, DatasetItem
from zimage.data.manage import join_prefix, open_dataset
from zimage.errors import UserError
from zimage.settings import Settings

MODES = ("missing", "all")


class CaptionConfigError(UserError):
    """A captioning config that cannot run; the message names the field."""


@dataclass
class CaptionConfig:
    dataset: str  # dataset name under datasets/, or an absolute dataset folder
    model: str = DEFAULT_CAPTIONER  # catalogue name, hub id or model folder
    detail: str = "short"  # short | detailed | paragraph
    mode: str = "missing"  # missing: only images without a caption | all: overwrite every caption
    images: list[str] | None = None  # only these image file names (None: the whole dataset)
    trigger_prefix: bool = True  # start each caption with the dataset's trigger word
    prompt: str = ""  # BLIP only: words every caption starts with
    batch_size: int = 4
    num_beams: int = 3
    max_new_tokens: int | None = None  # None: by detail level
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    download: bool = True  # fetch a catalogue model that is not on disk yet
    kind: str = "caption"
    config_version: int = 1

    @classmethod
    def from_dict(cls, data: dict) -> CaptionConfig:
        if not isinstance(data, dict) or not data:
            raise CaptionConfigError("config: empty or not a mapping (is config.json there?)")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CaptionConfigError(
                f"config: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}"
            )
        if "dataset" not in data:
            raise CaptionConfigError("dataset: missing; name the dataset to caption")
        cfg = cls(**data)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        from zimage.captioning.captioners import CaptionOptions

        if self.kind != "caption":
            raise CaptionConfigError(f"kind: {self.kind!r} is not a captioning job")
        if self.mode not in MODES:
            raise CaptionConfigError(f"mode: {self.mode!r} must be one of {', '.join(MODES)}")
        if not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= 64:
            raise CaptionConfigError(f"batch_size: {self.batch_size!r} must be a whole number from 1 to 64")
        if self.images is not None and (
            not isinstance(self.images, list) or not all(isinstance(n, str) for n in self.images)
        ):
            raise CaptionConfigError("images: must be a list of image file names")
        CaptionOptions(self.detail, self.max_new_tokens, self.num_beams, self.prompt)  # raises on bad values

    def to_dict(self) -> dict:
        return asdict(self)


def caption_config(**values) -> dict:
    """A validated config dict for enqueue(settings, "caption", ...); raises CaptionConfigError."""
    return CaptionConfig.from_dict(dict(values)).to_dict()


def dataset_for(cfg: CaptionConfig, settings: Settings) -> DatasetFolder:
    path = Path(cfg.dataset).expanduser()
    if path.is_absolute():
        folder = DatasetFolder(path)
        if not path.is_dir():
            raise CaptionConfigError(f"dataset: folder {path} does not exist")
        return folder
    return open_dataset(settings, cfg.dataset)


def is_uncaptioned(item: DatasetItem) -> bool:
    caption = item.caption
    return caption is None or not caption.strip()


def select_targets(folder: DatasetFolder, cfg: CaptionConfig, done: set[str] | None = None) -> list[DatasetItem]:
    """The images this job captions: the chosen ones (or all), minus captioned ones in `missing` mode."""
    items = folder.items()
    if cfg.images is not None:
        by_name = {i.image.name: i for i in items}
        unknown = [n for n in cfg.images if n not in by_name]
        if unknown:
            raise CaptionConfigError(f"images: not in dataset {folder.path.name!r}: {', '.join(unknown[:10])}")
        items = [by_name[n] for n in dict.fromkeys(cfg.images)]
    if cfg.mode == "missing":
        items = [i for i in items if is_uncaptioned(i)]
    if done:
        items = [i for i in items if i.image.name not in done]
    return items


def with_trigger(caption: str, trigger: str) -> str:
    """Start the caption with the trigger word unless it already contains it."""
    trigger = (trigger or "").strip()
    if not trigger or trigger.lower() in caption.lower():
        return caption
    return join_prefix(trigger, caption)
