"""The typed reader: a valid object or a one-line problem naming the file and the field, never an exception."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import Field

from zimage.records import Damaged, Record, read_record


class Sample(Record):
    pid: int | None = None
    state: Literal["running", "completed"] = "running"
    loss: float | None = Field(default=None, allow_inf_nan=False)


def test_a_good_file_reads_and_keeps_unknown_keys(tmp_path):
    path = tmp_path / "status.json"
    path.write_text('{"pid": 12, "state": "completed", "loss": 0.5, "later_field": [1]}')
    rec = read_record(path, Sample)
    assert isinstance(rec, Sample) and (rec.pid, rec.state, rec.loss) == (12, "completed", 0.5)
    assert rec.model_extra == {"later_field": [1]}


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"pid": "abc"}', "status.json: pid must be a whole number, got 'abc'"),
        ('{"pid": 1.5}', "status.json: pid must be a whole number, got 1.5"),
        ('{"state": "exploded"}', "status.json: state input should be 'running' or 'completed', got 'exploded'"),
        ('{"loss": NaN}', "status.json: not valid JSON"),
        ("[1, 2]", "status.json: must hold a JSON object, found list"),
        ('{"pid": 1', "status.json: not valid JSON"),
        ("", "status.json: not valid JSON"),
    ],
)
def test_bad_content_names_the_file_and_the_field(tmp_path, content, problem):
    path = tmp_path / "status.json"
    path.write_text(content)
    rec = read_record(path, Sample)
    assert isinstance(rec, Damaged) and rec.path == path
    assert rec.problem.startswith(problem), rec.problem


def test_missing_folder_and_undecodable_files(tmp_path):
    assert read_record(tmp_path / "absent.json", Sample, missing=None) is None
    assert read_record(tmp_path / "absent.json", Sample).problem == "absent.json: missing"
    (tmp_path / "dir.json").mkdir()
    assert read_record(tmp_path / "dir.json", Sample).problem == "dir.json: is a folder, not a file"
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    assert read_record(tmp_path / "bin.json", Sample).problem == "bin.json: not UTF-8 text"
