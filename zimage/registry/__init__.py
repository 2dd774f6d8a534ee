"""The registry: a DuckDB index (registry/registry.duckdb) of datasets, runs, metrics, samples and
checkpoints, rebuilt from the folders at any time. Pages import the query functions from here; each takes a Registry
(`zimage.jobs.registry_for(settings)` gives the app's). See db.py for how the database is shared between
processes. This package never imports zimage.jobs: the scheduler uses the registry, not the other way.
"""

from zimage.registry.db import Registry
from zimage.registry.queries import (
    checkpoints,
    config_diff,
    damaged_runs,
    datasets,
    filter_choices,
    list_jobs,
    list_runs,
    metric_series,
    overview,
    queue,
    run_detail,
    run_numbers,
    sample_steps,
    samples,
)
from zimage.registry.schema import SCHEMA_VERSION, RegistryError

__all__ = [
    "SCHEMA_VERSION",
    "Registry",
    "RegistryError",
    "checkpoints",
    "config_diff",
    "damaged_runs",
    "datasets",
    "filter_choices",
    "list_jobs",
    "list_runs",
    "metric_series",
    "overview",
    "queue",
    "run_detail",
    "run_numbers",
    "sample_steps",
    "samples",
]
