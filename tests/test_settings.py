"""The data home (ZIMAGE_HOME, the checkout, or the user data folder of an installed package) and settings.toml."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from zimage.jobs.slots import SlotConfigError, slot_config
from zimage.settings import PACKAGE_PARENT, SettingsFileError, get_settings, is_checkout, read_home_settings

PROBE = "from zimage.settings import get_settings; s = get_settings(); print(s.home); print(s.why)"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ZIMAGE_HOME"}
    env.update(extra)
    return env


def test_a_checkout_is_its_own_home():
    assert is_checkout(PACKAGE_PARENT)
    out = subprocess.run([sys.executable, "-c", PROBE], env=_env(), capture_output=True, text=True, check=True)
    home, why = out.stdout.splitlines()
    assert Path(home) == PACKAGE_PARENT and "checkout" in why


def test_an_installed_package_uses_the_user_data_folder(tmp_path):
    # The package alone in a site-packages-like folder, as a wheel installs it: no pyproject.toml, no Home.py.
    site = tmp_path / "site-packages"
    shutil.copytree(PACKAGE_PARENT / "zimage", site / "zimage", ignore=shutil.ignore_patterns("__pycache__"))
    assert not is_checkout(site)
    env = _env(PYTHONPATH=str(site), XDG_DATA_HOME=str(tmp_path / "xdg"))
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True,
                         cwd=tmp_path)  # fmt: skip
    home, why = out.stdout.splitlines()
    assert Path(home) == tmp_path / "xdg" / "zimage-lora-studio"
    assert "installed package" in why and str(site) not in home


def test_zimage_home_wins(zhome):
    assert get_settings().home == zhome.home and get_settings().why == "ZIMAGE_HOME is set"


def test_settings_file_is_optional_and_typed(zhome, monkeypatch):
    for name in ("ZIMAGE_GPUS", "ZIMAGE_JOBS_PER_GPU"):
        monkeypatch.delenv(name, raising=False)
    assert zhome.home_settings().scheduler.jobs_per_gpu == 1  # no file: the defaults
    zhome.settings_path.write_text('[scheduler]\ngpus = "0,1"\njobs_per_gpu = 2\n')
    settings = zhome.home_settings()
    assert (settings.scheduler.gpus, settings.scheduler.jobs_per_gpu) == ("0,1", 2)
    slots = slot_config(home=settings.scheduler)
    assert slots.gpu_ids == ("0", "1") and slots.capacity == 4
    assert slot_config(gpus="none", home=settings.scheduler).gpu_ids == ()  # an explicit value wins


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[scheduler]\njobs_per_gpu = 0\n", "scheduler.jobs_per_gpu"),
        ("[scheduler]\nspeed = 3\n", "scheduler.speed"),
        ("[nonsense]\n", "nonsense"),
        ("[scheduler\n", "not valid TOML"),
        ("\xff\xfe", "not valid TOML"),
    ],
)
def test_a_bad_settings_file_names_the_file_and_the_field(tmp_path, text, named):
    path = tmp_path / "settings.toml"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(SettingsFileError) as err:
        read_home_settings(path)
    assert str(path) in str(err.value) and named in str(err.value)


def test_bad_gpu_ids_in_the_settings_file_are_refused(zhome, monkeypatch):
    monkeypatch.delenv("ZIMAGE_GPUS", raising=False)
    zhome.settings_path.write_text('[scheduler]\ngpus = "0,x"\n')
    with pytest.raises(SlotConfigError, match="'x'"):
        slot_config(home=zhome.home_settings().scheduler)


def test_zimage_info_says_which_home_and_why(zhome):
    zhome.settings_path.write_text("[scheduler]\njobs_per_gpu = 3\n")
    env = {**os.environ, "ZIMAGE_HOME": str(zhome.home)}
    out = subprocess.run([sys.executable, "-m", "zimage.cli", "info"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"home      {zhome.home}" in out.stdout and "ZIMAGE_HOME is set" in out.stdout
    assert "jobs_per_gpu=3" in out.stdout
    zhome.settings_path.write_text("[scheduler]\njobs_per_gpu = 'many'\n")
    bad = subprocess.run([sys.executable, "-m", "zimage.cli", "info"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "scheduler.jobs_per_gpu" in bad.stderr and "Traceback" not in bad.stderr
