"""The registry: a DuckDB index (registry/registry.duckdb) of datasets, runs, metrics, samples and
checkpoints, rebuilt from the folders at any time. Pages import the query functions from here; each
takes a Registry or a Settings. See db.py for how the database is shared between processes.
"""

from zimage.registry.db import Registry
from zimage.registry.queries import (
    checkpoints,
    config_diff,
    datasets,
    filter_choices,
    list_jobs,
    list_runs,
    metric_series,
    overview,
    queue,
    run_detail,
    sample_steps,
    samples,
)
from zimage.registry.rebuild import rebuild
from zimage.registry.schema import SCHEMA_VERSION, RegistryError

__all__ = [
    "SCHEMA_VERSION",
    "Registry",
    "RegistryError",
    "checkpoints",
    "config_diff",
    "datasets",
    "filter_choices",
    "list_jobs",
    "list_runs",
    "metric_series",
    "overview",
    "queue",
    "rebuild",
    "registry_for",
    "run_detail",
    "sample_steps",
    "samples",
]


def registry_for(settings, timeout: float = 15.0) -> Registry:
    """This process's registry (starts the host's scheduler here if needed)."""
    from zimage.jobs.scheduler import registry_for as _registry_for

    return _registry_for(settings, timeout)
