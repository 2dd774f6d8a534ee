"""Reading the append-only JSONL files of a run folder in batches, from a remembered byte offset.

A chunk is cut at its last newline: a half-written last line stays on disk for the next pass. Lines are
numbered by their position among the file's non-blank lines, the same whether the file is read in one
go (rebuild) or in many small pieces (live ingest), so a rebuilt registry has identical rows.

Metrics take a fast path through pyarrow's JSON reader (whole chunk at C speed, ≈1 M lines/s); only a
chunk with a bad line falls back to line-by-line parsing, which keeps the good lines and counts the bad.
A metrics line is good when it is a JSON object whose `step` is an integer and whose other DESIGN.md
fields, where present, are numbers or null; unknown keys are ignored.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.json as pa_json

from zimage.registry.schema import METRIC_COLUMNS

MAX_CHUNK = 64 * 1024 * 1024  # bytes read per file per pass; bounds memory on a huge backlog

METRICS_SCHEMA = pa.schema([("step", pa.int64())] + [(c, pa.float64()) for c in METRIC_COLUMNS])
_PARSE = pa_json.ParseOptions(explicit_schema=METRICS_SCHEMA, unexpected_field_behavior="ignore")


@dataclass
class Chunk:
    """What one pass over a file produced."""

    consumed: int = 0  # bytes up to and including the last complete line
    lines: int = 0  # non-blank complete lines seen (good + bad)
    malformed: int = 0
    bad_examples: list[str] = field(default_factory=list)
    table: pa.Table | None = None  # metrics: columns line, step, <metric fields>
    rows: list[dict] = field(default_factory=list)  # samples


def read_new_bytes(path, pos: int) -> bytes:
    """Complete lines after byte `pos` (possibly empty); never the unfinished tail."""
    with open(path, "rb") as fh:
        fh.seek(pos)
        data = fh.read(MAX_CHUNK)
    end = data.rfind(b"\n")
    return data[: end + 1] if end >= 0 else b""


def _non_blank(data: bytes) -> list[bytes]:
    return [ln for ln in data.split(b"\n") if ln.strip()]


def _is_number(v) -> bool:
    return v is None or (isinstance(v, int | float) and not isinstance(v, bool))


def _metric_row(line: bytes) -> dict | None:
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict):
        return None
    step = obj.get("step")
    if isinstance(step, float) and step.is_integer():
        step = int(step)
    if not isinstance(step, int) or isinstance(step, bool) or not -(2**63) <= step < 2**63:
        return None
    row = {"step": step}
    for col in METRIC_COLUMNS:
        v = obj.get(col)
        if not _is_number(v):
            return None
        try:
            row[col] = None if v is None else float(v)
        except OverflowError:  # an integer with hundreds of digits
            return None
    return row


def _bad(chunk: Chunk, line: bytes) -> None:
    chunk.malformed += 1
    if len(chunk.bad_examples) < 3:
        chunk.bad_examples.append(line[:120].decode("utf-8", "replace"))


def drop_superseded(table: pa.Table) -> pa.Table:
    """The rows of a metrics chunk that no later row supersedes.

    A run resumed from a checkpoint trains again from the checkpoint's step, so metrics.jsonl holds a
    line for step s and, further down, another line for s or an earlier step. The later line is the one
    that counts, and it also voids every earlier line at or after its step (a trajectory that was
    thrown away): a row is kept when its step is below every step that follows it. Cheap when the steps
    only increase, which is every run that never restarted.
    """
    if table.num_rows < 2:
        return table
    steps = table.column("step").to_numpy()
    if bool((steps[1:] > steps[:-1]).all()):
        return table
    later_min = np.minimum.accumulate(steps[::-1])[::-1]  # later_min[i] = min(steps[i:])
    keep = np.append(steps[:-1] < later_min[1:], True)
    return table.filter(pa.array(keep))


def parse_metrics(data: bytes, first_line: int) -> Chunk:
    """Parse complete metrics lines; `first_line` is the index of the first non-blank line in `data`."""
    chunk = Chunk(consumed=len(data))
    if not data:
        return chunk
    try:
        table = pa_json.read_json(io.BytesIO(data), parse_options=_PARSE)
        lines = table.num_rows
        fast = True
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        fast = False
    if fast:
        # pyarrow skips blank lines, so row i is non-blank line first_line + i. A line without a
        # step parses as a null step: that line is malformed.
        import pyarrow.compute as pc

        table = table.add_column(0, "line", pa.array(np.arange(first_line, first_line + lines, dtype=np.int64)))
        nulls = table.column("step").null_count
        if nulls:
            missing = pc.is_null(table.column("step"))
            all_lines = _non_blank(data)
            for idx in pc.indices_nonzero(missing).to_pylist()[:3]:
                chunk.bad_examples.append(all_lines[idx][:120].decode("utf-8", "replace"))
            chunk.malformed = nulls
            table = table.filter(pc.invert(missing))
        chunk.lines, chunk.table = lines, table
        return chunk
    rows: list[dict] = []
    all_lines = _non_blank(data)
    for i, line in enumerate(all_lines):
        row = _metric_row(line)
        if row is None:
            _bad(chunk, line)
            continue
        row["line"] = first_line + i
        rows.append(row)
    chunk.lines = len(all_lines)
    schema = pa.schema([("line", pa.int64())] + list(METRICS_SCHEMA))
    chunk.table = pa.Table.from_pylist(rows, schema=schema)
    return chunk


def parse_samples(data: bytes, first_line: int) -> Chunk:
    """samples.jsonl lines: an object with an integer step and a string path; prompt and seed optional."""
    chunk = Chunk(consumed=len(data))
    for i, line in enumerate(_non_blank(data)):
        chunk.lines += 1
        try:
            obj = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            obj = None
        step = obj.get("step") if isinstance(obj, dict) else None
        path = obj.get("path") if isinstance(obj, dict) else None
        seed = obj.get("seed") if isinstance(obj, dict) else None
        if (
            not isinstance(step, int)
            or isinstance(step, bool)
            or not -(2**63) <= step < 2**63
            or not isinstance(path, str)
            or not (seed is None or (isinstance(seed, int) and not isinstance(seed, bool)))
        ):
            _bad(chunk, line)
            continue
        extra = {k: v for k, v in obj.items() if k not in ("step", "prompt", "seed", "path")}
        chunk.rows.append(
            {
                "line": first_line + i,
                "step": step,
                "prompt": None if obj.get("prompt") is None else str(obj.get("prompt")),
                "seed": seed if seed is None or abs(seed) < 2**63 else None,
                "path": path,
                "extra": json.dumps(extra, sort_keys=True, default=str) if extra else None,
            }
        )
    return chunk
