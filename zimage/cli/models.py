"""`zimage models`: list the catalogue; `zimage models download NAME` fetches a hub model."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("models", help="list base models; `models download NAME` fetches one")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION")
    d = msub.add_parser("download", help="download a catalogue model (and its training adapter)")
    d.add_argument("name", help="catalogue name, e.g. z-image-turbo")
    d.set_defaults(handler=run_download)
    p.set_defaults(handler=run_list)


def run_list(args) -> int:
    from zimage.catalogue import list_models
    from zimage.settings import get_settings

    rows = list_models(get_settings())
    print(f"{'NAME':<22} {'TYPE':<9} {'SAMPLING':<14} {'STATUS':<12} SOURCE")
    for row in rows:
        e = row.entry
        status = "ready" if row.path else ("broken" if row.problem else "not local")
        source = e.repo_id or (str(row.path) if row.path else "local")
        print(
            f"{e.name:<22} {e.model_type:<9} {f'{e.sample_steps} st, CFG {e.sample_cfg:g}':<14} {status:<12} {source}"
        )
        if e.adapter:
            print(f"{'':<22} training adapter: {e.adapter.repo_id}/{e.adapter.filename}")
        if row.problem:
            print(f"{'':<22} {row.problem}")
    return 0


def run_download(args) -> int:
    from zimage.catalogue import download, download_adapter, known
    from zimage.settings import get_settings

    settings = get_settings()
    folder = download(args.name, settings, progress=print)
    print(f"ready: {folder}")
    entry = known(args.name)
    if entry and entry.adapter:
        print(f"training adapter: {download_adapter(entry.adapter, settings)}")
    return 0
