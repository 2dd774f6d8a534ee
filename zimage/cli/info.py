"""`zimage info`: which home this command uses and why, its settings file, and the software versions."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("info", help="the data home (ZIMAGE_HOME) in use and why, settings.toml, versions")
    p.set_defaults(handler=run)


def run(args) -> int:
    import platform
    from importlib import metadata

    from zimage import __version__
    from zimage.settings import get_settings

    settings = get_settings()
    home_settings = settings.home_settings()  # a bad settings.toml stops here with the field named
    print(f"home      {settings.home}")
    print(f"why       {settings.why}")
    exists = settings.settings_path.is_file()
    print(f"settings  {settings.settings_path} ({'read' if exists else 'absent: defaults'})")
    for section, values in home_settings.model_dump().items():
        if not isinstance(values, dict):  # a top-level key (launcher)
            print(f"          {section} = {values!r}")
            continue
        shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
        print(f"          [{section}] {shown}")
    versions = []
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "streamlit", "duckdb"):
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    print(f"software  zimage {__version__}, Python {platform.python_version()}; " + ", ".join(versions))
    return 0
