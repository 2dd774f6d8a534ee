"""Where the studio keeps its data, and what the admin set for that home.

`ZIMAGE_HOME` names the home. Without it (DESIGN.md section 2):
- in a checkout (the package sits in a clone with pyproject.toml and Home.py beside it, as `pip install -e`
  leaves it) the clone's folder is the home, so `zimage demo` and the app find the same data;
- for an installed wheel (the package lives in site-packages) the user data folder is the home
  (platformdirs: `~/.local/share/zimage-lora-studio` on Linux), never site-packages itself.
`zimage info` prints which one applies and why.

`ZIMAGE_HOME/settings.toml` holds what an admin sets for the home (DESIGN.md section 8). It is optional
and empty by default; one schema (`HomeSettings`, pydantic, unknown keys refused), read in one place
(`Settings.home_settings()`), and sections: `launcher` (top level), [scheduler], [paths], [auth], [ray], [slurm].
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from zimage.errors import UserError

PACKAGE_PARENT = Path(__file__).resolve().parents[1]
APP_NAME = "zimage-lora-studio"
SETTINGS_FILE = "settings.toml"


def is_checkout(folder: Path = PACKAGE_PARENT) -> bool:
    """True when `folder` is a clone of the project (not site-packages): it holds the app and its build file."""
    return (folder / "pyproject.toml").is_file() and (folder / "Home.py").is_file()


def default_home() -> tuple[Path, str]:
    """(home, why) when ZIMAGE_HOME is not set."""
    if is_checkout():
        return PACKAGE_PARENT, f"ZIMAGE_HOME is not set and zimage runs from the checkout {PACKAGE_PARENT}"
    from platformdirs import user_data_path

    path = user_data_path(APP_NAME, appauthor=False)
    return path, f"ZIMAGE_HOME is not set and zimage is an installed package: the user data folder {path}"


# -- settings.toml -----------------------------------------------------------------------------------
class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SchedulerSettings(_Section):
    """GPU slots of this host's scheduler (ZIMAGE_GPUS / ZIMAGE_JOBS_PER_GPU in the environment win), the
    priority of a job queued without one, and how many runs one user may have active at once."""

    gpus: str | None = None  # "0,1", or "none" for CPU only; unset: every GPU nvidia-smi lists
    jobs_per_gpu: int = Field(default=1, ge=1, le=64)  # jobs that share one GPU
    default_priority: Literal["high", "normal", "low"] = "normal"  # a job queued without a priority gets this
    user_limit: int = Field(default=0, ge=0, le=4096)  # runs one user may have active at once; 0: no limit
    # Remote runs (ray, slurm): `lost` when the heartbeat is older than this while the backend says running
    heartbeat_timeout_s: float = Field(default=300.0, ge=2.0, le=86400.0)
    stop_grace_s: float = Field(default=60.0, ge=0.0, le=86400.0)  # a stop the worker ignores this long: cancel


class PathSettings(_Section):
    """Where runs may write outputs besides ZIMAGE_HOME (TrainingConfig.output_dir is checked against these)."""

    allowed_output_roots: list[str] = Field(default_factory=list)  # absolute folders, e.g. ["/mnt/shared/loras"]

    @field_validator("allowed_output_roots")
    @classmethod
    def _absolute(cls, roots: list[str]) -> list[str]:
        relative = [r for r in roots if not Path(r).expanduser().is_absolute()]
        if relative:
            raise ValueError(f"must be absolute folders; {relative} are not")
        return roots


class AuthSettings(_Section):
    """Who may use the app (zimage.auth): `none` (one person on localhost), `password` (the users file) or
    `oidc` (Streamlit's st.login, the provider in .streamlit/secrets.toml). Roles: viewer, member, admin."""

    mode: Literal["none", "password", "oidc"] = "none"
    session_minutes: int = Field(default=720, ge=5, le=43200)  # a login lasts this long, then asks again
    max_failed_logins: int = Field(default=5, ge=1, le=100)  # wrong passwords in a row before a lockout
    lockout_minutes: int = Field(default=15, ge=1, le=1440)
    oidc_provider: str | None = None  # the [auth.<provider>] section of secrets.toml; unset: [auth] itself
    roles: dict[str, Literal["viewer", "member", "admin"]] = Field(default_factory=dict)  # e-mail or "@domain"
    unknown_users: Literal["viewer", "refuse"] = "viewer"  # an oidc login that `roles` does not name


class RaySettings(_Section):
    """The `ray` launcher (zimage.jobs.backends.ray_jobs): Ray Jobs on an existing cluster."""

    address: str | None = None  # the dashboard's http://HOST:8265; unset: RAY_ADDRESS from the environment
    python: str | None = None  # the interpreter on the nodes (a shared venv); unset: this process's
    cpus_per_job: float = Field(default=1.0, gt=0, le=1024)  # what a job asks for on a cluster without GPUs
    max_jobs: int = Field(default=0, ge=0, le=100000)  # at most this many zimage jobs at once; 0: what fits


class SlurmSettings(_Section):
    """The `slurm` launcher (zimage.jobs.backends.slurm): sbatch through submitit, one node per job."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_limit_min: int = Field(default=1440, ge=1, le=525600)
    gpus_per_node: int = Field(default=8, ge=0, le=64)  # the most GPUs one job may ask for (one node)
    cpus_per_task: int = Field(default=8, ge=1, le=1024)
    mem_gb: int = Field(default=0, ge=0, le=65536)  # 0: the partition's default
    max_jobs: int = Field(default=4, ge=1, le=100000)  # zimage jobs in Slurm (pending or running) at once
    python: str | None = None  # the interpreter on the nodes; unset: this process's
    setup: list[str] = Field(default_factory=list)  # shell lines run before the worker, e.g. "module load cuda"
    sbatch: dict[str, str | int] = Field(default_factory=dict)  # more #SBATCH options, e.g. {constraint = "h100"}
    executor: Literal["slurm", "local"] = "slurm"  # local: submitit's local executor on this host (to try it)


class HomeSettings(_Section):
    """The whole of settings.toml; every section and field optional."""

    launcher: Literal["local", "ray", "slurm"] = "local"  # where queued jobs run; `queue add --backend` wins
    ray: RaySettings = Field(default_factory=RaySettings)
    slurm: SlurmSettings = Field(default_factory=SlurmSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    paths: PathSettings = Field(default_factory=PathSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)


class SettingsFileError(UserError):
    """settings.toml cannot be read or breaks the schema; the message names the file and the field."""


def read_home_settings(path: Path) -> HomeSettings:
    """The settings in `path`; a missing file gives the defaults, a bad one a SettingsFileError."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return HomeSettings()
    except OSError as exc:
        raise SettingsFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SettingsFileError(f"{path}: not valid TOML ({exc})") from None
    try:
        return HomeSettings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        raise SettingsFileError(f"{path}: {problems}") from None


_cache: dict[Path, tuple[tuple[int, int] | None, HomeSettings]] = {}


# -- the home ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    home: Path
    why: str = ""  # how the home was chosen (for `zimage info`)

    @property
    def datasets_dir(self) -> Path:
        return self.home / "datasets"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def base_models_dir(self) -> Path:
        return self.models_dir / "base"

    @property
    def adapter_dir(self) -> Path:
        return self.models_dir / "training_adapter"

    @property
    def loras_dir(self) -> Path:
        return self.models_dir / "loras" / "trained"

    @property
    def finetuned_dir(self) -> Path:
        return self.models_dir / "finetuned"

    @property
    def captioners_dir(self) -> Path:
        return self.models_dir / "captioners"

    @property
    def registry_dir(self) -> Path:
        return self.home / "registry"

    @property
    def runs_dir(self) -> Path:
        return self.registry_dir / "runs"

    @property
    def db_path(self) -> Path:
        return self.registry_dir / "registry.duckdb"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def settings_path(self) -> Path:
        return self.home / SETTINGS_FILE

    def home_settings(self) -> HomeSettings:
        """settings.toml of this home, re-read only when the file changed (SettingsFileError if it is bad)."""
        path = self.settings_path
        try:
            st = path.stat()
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        cached = _cache.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        value = read_home_settings(path)
        _cache[path] = (stamp, value)
        return value

    def ensure(self) -> Settings:
        """Create the data folders (cheap and idempotent)."""
        for d in (self.datasets_dir, self.base_models_dir, self.loras_dir, self.finetuned_dir, self.runs_dir):
            d.mkdir(parents=True, exist_ok=True)
        return self


def get_settings() -> Settings:
    """Read ZIMAGE_HOME each call, so a test or a server can move the home without restarting Python."""
    home = os.environ.get("ZIMAGE_HOME")
    if home:
        return Settings(home=Path(home).expanduser().resolve(), why="ZIMAGE_HOME is set")
    path, why = default_home()
    return Settings(home=path, why=why)
