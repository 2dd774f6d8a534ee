"""Reading the append-only JSONL files of a run folder in batches, from a remembered byte offset.

A chunk is cut at its last newline: a half-written last line stays on disk for the next pass. Lines are
numbered by their position among the file's non-blank lines, the same whether the file is read in one
go (rebuild) or in many small pieces (live ingest), so a rebuilt registry has identical rows.

What a good line is, is decided by one place: the line schemas of zimage.run_records (MetricsLine,
SampleLine), through their line readers. Samples are read line by line with them.

Metrics keep a fast path through pyarrow's JSON reader (a whole chunk at C speed, ≈1 M lines/s against
≈60 k/s for the line reader, and a rebuild reads millions of lines), but only for chunks shaped so that
pyarrow reads them as the line reader does. pyarrow accepts what the line reader refuses (NaN and
Infinity, a number too large for a double read as infinity, two objects on one line, bytes that are not
UTF-8, a byte-order mark, nesting deeper than Python's parser goes) and crashes on a chunk that starts
with `null`; a chunk with any such trait, and any chunk pyarrow refuses, is read by the line reader,
which keeps the good lines and counts the bad.
tests/test_fuzz_records.py checks the agreement on generated lines.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.json as pa_json

from zimage.records import Damaged
from zimage.registry.schema import METRIC_COLUMNS
from zimage.run_records import parse_metrics_line, parse_sample_line

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


def _metric_row(line: bytes) -> dict | None:
    rec = parse_metrics_line(line)
    return None if isinstance(rec, Damaged) else rec.model_dump()


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


def _fast_table(data: bytes) -> pa.Table | None:
    """pyarrow's table of a chunk when it is sure to agree with the line reader, else None.

    The chunk must look like what the studio writes: every line starts with its only "{", no blank lines
    (counted with bytes.count, much faster than a regex), and pyarrow must find one row per line. pyarrow
    reads other shapes in ways the line reader does not: a chunk starting with `null` even crashes
    pyarrow 26 with a segmentation fault."""
    # Single bytes are found at memchr speed: "N" / "I" of NaN and Infinity (the studio's metrics lines hold
    # no capital letters), "[" of arrays (they may nest deeper than Python's parser goes), non-ASCII bytes
    # (a byte-order mark, text that may not be UTF-8). Any of them: the line reader decides.
    if not data.isascii() or b"N" in data or b"I" in data or b"[" in data:
        return None
    lines = data.count(b"\n")
    if not data.endswith(b"\n") or data.count(b"{") != lines:
        return None
    if data.count(b"\n{") + data.startswith(b"{") != lines:  # every line starts with its only "{"
        return None
    try:
        table = pa_json.read_json(io.BytesIO(data), parse_options=_PARSE)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    if table.num_rows != lines:  # two objects on one line
        return None
    import pyarrow.compute as pc

    for col in METRIC_COLUMNS:  # a literal too large for a double comes back as infinity
        values = table.column(col)
        if values.null_count < len(values) and not pc.all(pc.is_finite(values).fill_null(True)).as_py():
            return None
    return table


def parse_metrics(data: bytes, first_line: int) -> Chunk:
    """Parse complete metrics lines; `first_line` is the index of the first non-blank line in `data`."""
    chunk = Chunk(consumed=len(data))
    if not data:
        return chunk
    table = _fast_table(data)
    if table is not None:
        lines = table.num_rows
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
    """samples.jsonl lines (SampleLine): an integer step and a text path; prompt and seed optional."""
    chunk = Chunk(consumed=len(data))
    for i, line in enumerate(_non_blank(data)):
        chunk.lines += 1
        rec = parse_sample_line(line)
        if isinstance(rec, Damaged):
            _bad(chunk, line)
            continue
        extra = rec.model_extra or {}
        chunk.rows.append(
            {
                "line": first_line + i,
                "step": rec.step,
                "prompt": rec.prompt,
                "seed": rec.seed,
                "path": rec.path,
                "extra": json.dumps(extra, sort_keys=True, default=str) if extra else None,
            }
        )
    return chunk
