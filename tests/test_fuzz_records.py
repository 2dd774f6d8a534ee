"""Fuzzing the run-folder readers: whatever bytes a file holds, a reader returns a valid object or a named
problem, and never raises anything else. Random JSON values, the schema's own keys with values of every
type, truncations of valid files, random bytes and a few known traps (deep nesting, 1e999, a byte-order
mark, an integer too long to parse) go through each reader; the bulk metrics parser must agree with the
line reader on every generated chunk, and ingesting any status.json must leave a row in the registry.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zimage.records import Damaged
from zimage.registry.db import Registry
from zimage.registry.ingest import Ingester
from zimage.registry.jsonl import parse_metrics, parse_samples
from zimage.registry.schema import METRIC_COLUMNS
from zimage.run_records import (
    DAMAGED,
    STATES,
    ConfigRecord,
    ControlFile,
    ControlRequest,
    LaunchRecord,
    MetricsLine,
    ProgressRecord,
    SampleLine,
    StatusRecord,
    parse_metrics_line,
    parse_sample_line,
    read_config,
    read_control,
    read_launch,
    read_progress,
    read_status,
    salvage_status,
)
from zimage.runfolder import ControlRequests, RunFolder
from zimage.settings import Settings

FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),  # NaN and infinities too: json.dumps writes them as NaN / Infinity
    st.text(max_size=12),
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
TRAPS = [
    b"[" * 5000, b'{"a": ' * 3000, b"1e999", b'{"step": 1e999}', b"\xef\xbb\xbf{}", b"1" * 5000, b"", b"   ",
    b"\xff\xfe\x00", b'{"step": 1, "step": "x"}', b"null", b'"text"', b'{"requests": [' + b"{}," * 500 + b"{}]}",
]  # fmt: skip


def documents(schema, valid: list[dict]):
    """Bytes for one file of `schema`: random JSON, the schema's keys with random values, a valid file
    with one field replaced, a valid file cut short, random bytes, the traps."""
    keys = [*schema.model_fields, "unknown"]
    shaped = st.dictionaries(st.sampled_from(keys), json_values, max_size=8)
    one_off = st.tuples(st.sampled_from(valid), st.sampled_from(keys), json_values).map(lambda t: {**t[0], t[1]: t[2]})
    texts = [json.dumps(v, indent=2) for v in valid]
    cut = st.tuples(st.sampled_from(texts), st.integers(0, 600)).map(lambda t: t[0][: t[1]].encode())
    dumped = st.one_of(json_values, shaped, one_off, st.sampled_from(valid)).map(
        lambda v: json.dumps(v, allow_nan=True).encode()
    )
    return st.one_of(dumped, cut, st.binary(max_size=80), st.sampled_from(TRAPS))


VALID_STATUS = [
    {"state": "running", "kind": "train", "user": "ann", "pid": 4242, "pid_start_time": 1.7e9, "step": 3,
     "total_steps": 10, "heartbeat": 1.7e9, "control_done": ["a-1"], "phase": "training", "gpus": 1},
    {"state": "queued", "kind": "caption", "queue_order": 1.7e9, "created": 1.7e9, "name": "x", "resumes": 2},
]  # fmt: skip
VALID_CONTROL = [
    {"requests": [{"id": "a-1", "action": "stop", "at": 1.7e9, "user": "ann"}, {"id": "b", "action": "pause"}]}
]
VALID_PROGRESS = [{"step": 4, "epoch": 1, "position": 3, "saved": 1.7e9, "complete": True, "reason": "every_n_steps"}]
VALID_LAUNCH = [{"pid": 12, "pid_start_time": 1.7e9, "launched": 1.7e9, "gpu_ids": "", "cmd": ["python", "-m"]}]
VALID_CONFIG = [{"model_path": "tiny-zimage", "dataset_path": "demo-shapes", "num_steps": 4}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _finite_fields(rec) -> bool:
    return all(not isinstance(v, float) or math.isfinite(v) for v in rec.model_dump(exclude={"requests"}).values())


def _check(rec, schema, name: str) -> None:
    assert isinstance(rec, schema | Damaged), type(rec)
    if isinstance(rec, Damaged):
        assert isinstance(rec.problem, str) and rec.problem.startswith(f"{name}: "), rec.problem
        assert "\n" not in rec.problem[:200]
    else:
        assert _finite_fields(rec)


@FUZZ
@given(raw=documents(StatusRecord, VALID_STATUS))
def test_status_reader(folder, raw):
    path = folder / "status.json"
    path.write_bytes(raw)
    rec = read_status(path)
    _check(rec, StatusRecord, "status.json")
    if isinstance(rec, StatusRecord):
        assert rec.state is None or rec.state in STATES
        assert rec.pid is None or 0 <= rec.pid < 2**31
    else:
        salvaged = salvage_status(rec.data)  # what the registry keeps of a damaged one
        assert isinstance(StatusRecord.model_validate(salvaged), StatusRecord)
    run = RunFolder(folder)  # the app-side calls on the same file
    assert isinstance(run.read_status(), dict) and run.worker_alive() in (True, False)
    assert isinstance(run.handled_control(), list)


@FUZZ
@given(raw=documents(ConfigRecord, VALID_CONFIG))
def test_config_reader(folder, raw):
    path = folder / "config.json"
    path.write_bytes(raw)
    _check(read_config(path), ConfigRecord, "config.json")


@FUZZ
@given(raw=documents(LaunchRecord, VALID_LAUNCH))
def test_launch_reader(folder, raw):
    path = folder / "launch.json"
    path.write_bytes(raw)
    _check(read_launch(path), LaunchRecord, "launch.json")


@FUZZ
@given(raw=documents(ProgressRecord, VALID_PROGRESS))
def test_progress_reader(folder, raw):
    path = folder / "progress.json"
    path.write_bytes(raw)
    rec = read_progress(path)
    _check(rec, ProgressRecord, "progress.json")
    assert isinstance(rec, Damaged) or rec.step >= 0


control_docs = st.one_of(
    documents(ControlFile, VALID_CONTROL),  # whole files of every kind
    st.lists(st.one_of(json_values, st.dictionaries(st.sampled_from(["id", "action", "at", "user"]), json_values)),
             max_size=5).map(lambda reqs: json.dumps({"requests": reqs}, allow_nan=True).encode()),
)  # fmt: skip


@FUZZ
@given(raw=control_docs)
def test_control_reader_and_the_worker_poll(tmp_path_factory, raw):
    run = RunFolder(tmp_path_factory.mktemp("control"))
    run.update_status(state="running")
    run.control_path.write_bytes(raw)
    found = read_control(run.control_path)
    assert all(isinstance(r, ControlRequest) and r.id and math.isfinite(r.at) for r in found.requests)
    assert all(isinstance(k, str) and p.startswith("control.json: ") for k, p in found.problems)
    req = run.poll_control()
    assert isinstance(req, ControlRequests)
    assert run.handled_control() == [r.id for r in found.requests]  # recorded, in order
    assert run.poll_control() == ControlRequests(stop=req.stop, pause=req.pause)  # acted on once
    said = (
        [ln for ln in run.log_path.read_text().splitlines() if ln.endswith("; ignored")]
        if run.log_path.exists()
        else []
    )
    assert len(said) == len({k for k, _ in found.problems})  # each problem said once


def _good_line():
    fields = {k: st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False), st.integers(-(10**20), 10**20))
              for k in METRIC_COLUMNS}  # fmt: skip
    extra = st.dictionaries(
        st.sampled_from(["phase", "x", ""]), st.one_of(st.none(), st.integers(), st.text(max_size=5))
    )
    return st.tuples(st.fixed_dictionaries({"step": st.integers(-5, 10**6)}, optional=fields), extra).map(
        lambda t: json.dumps({**t[1], **t[0]}).encode()
    )


TOKENS = [b"{", b"[", b"]", b"NaN", b"Infinity", b"\xef\xbb\xbf", b'"', b",", b" ", b"\\", b"e999", b"0" * 400,
          b".0", b"-", b"\xff", b"}{", b"} {", b"\t", b"\r", b"\x0c", b'"step": 2, ', b"true", b"null", b"1e-400"]  # fmt: skip


def _line_piece():
    good = _good_line()
    mutated = st.tuples(good, st.integers(0, 200), st.sampled_from(TOKENS)).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :]
    )
    other = json_values.map(lambda v: json.dumps(v, allow_nan=True).encode())
    return st.one_of(good, good, mutated, other, st.binary(max_size=30), st.just(b""), st.just(b"  "), st.just(b"null"))


def _join(lines: list[bytes]) -> bytes:
    return b"\n".join(ln.replace(b"\n", b" ") for ln in lines) + b"\n"


# Mostly clean chunks (the fast path) and chunks with every kind of damage (the line reader's path).
chunks = st.one_of(
    st.lists(_good_line(), min_size=1, max_size=12).map(_join),
    st.tuples(st.lists(_good_line(), min_size=1, max_size=8), st.integers(0, 200), st.sampled_from(TOKENS)).map(
        lambda t: _join(t[0])[: t[1]] + t[2] + _join(t[0])[t[1] :]
    ),
    st.lists(_line_piece(), min_size=1, max_size=12).map(_join),
)


@FUZZ
@given(data=chunks, first=st.integers(0, 50))
def test_bulk_metrics_parsing_agrees_with_the_line_reader(data, first):
    """pyarrow reads clean chunks whole; whatever it reads must be exactly what the line reader reads."""
    lines = [ln for ln in data.split(b"\n") if ln.strip()]
    want, bad = [], 0
    for i, line in enumerate(lines):
        rec = parse_metrics_line(line)
        if isinstance(rec, Damaged):
            bad += 1
        else:
            assert isinstance(rec, MetricsLine)
            want.append({"line": first + i, **rec.model_dump()})
    chunk = parse_metrics(data, first)
    assert chunk.table.to_pylist() == want
    assert (chunk.lines, chunk.malformed, chunk.consumed) == (len(lines), bad, len(data))


@FUZZ
@given(data=chunks)
def test_sample_lines_never_raise(data):
    chunk = parse_samples(data, 0)
    assert chunk.lines == len([ln for ln in data.split(b"\n") if ln.strip()])
    assert len(chunk.rows) + chunk.malformed == chunk.lines
    for line in data.split(b"\n"):
        assert isinstance(parse_sample_line(line), SampleLine | Damaged)


@pytest.fixture(scope="module")
def ingest_home(tmp_path_factory):
    settings_ = Settings(home=tmp_path_factory.mktemp("ingest-home")).ensure()
    reg = Registry(settings_.db_path)
    yield settings_, reg, Ingester(reg, settings_)
    reg.close()


@settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(raw=documents(StatusRecord, VALID_STATUS))
def test_any_status_file_is_indexed_as_its_state_or_damaged(ingest_home, raw):
    settings_, reg, ing = ingest_home
    run = RunFolder(settings_.runs_dir / "run-x")
    run.path.mkdir(parents=True, exist_ok=True)
    run.status_path.write_bytes(raw)
    ing.ingest_run("run-x")
    ((state, problem),) = reg.fetch("SELECT state, problem FROM runs WHERE run_id = 'run-x'")
    rec = read_status(run.status_path)
    if isinstance(rec, Damaged):
        assert state == DAMAGED and problem == rec.problem
    else:
        assert state == rec.state and problem is None
