"""A process that ran the scheduler (the app, a page render) shuts it down in order at exit: the thread stops
before interpreter teardown and closes DuckDB itself (a closed database leaves no .wal file behind)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

START_AND_EXIT = """
from zimage.jobs.scheduler import ensure_scheduler
from zimage.settings import get_settings
sched = ensure_scheduler(get_settings(), tick=0.2, launch_jobs=False)
assert sched.scanned.wait(60), "no first scan"
print("scanned", flush=True)
"""

RENDER_EVERY_PAGE = """
import sys
from pathlib import Path
from streamlit.testing.v1 import AppTest
root = Path(sys.argv[1])
for page in ["Home.py", *sorted(str(p.relative_to(root)) for p in (root / "pages").glob("*.py"))]:
    at = AppTest.from_file(str(root / page), default_timeout=60).run()
    assert not at.exception, (page, [e.value for e in at.exception])
    print(page, "rendered", flush=True)
"""

BAD_EXIT = ("interpreter shutdown", "terminate called", "Traceback")


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "ZIMAGE_HOME": str(home), "ZIMAGE_SCHEDULER_LAUNCH": "0"}


def test_the_scheduler_closes_the_registry_before_the_interpreter_exits(zhome_demo):
    out = subprocess.run([sys.executable, "-c", START_AND_EXIT], env=_env(zhome_demo.home), capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0 and "scanned" in out.stdout, out.stderr
    assert zhome_demo.db_path.is_file()
    assert not Path(str(zhome_demo.db_path) + ".wal").exists(), "the database was not closed at exit"
    assert not any(bad in out.stderr for bad in BAD_EXIT), out.stderr


@pytest.mark.slow
def test_rendering_every_page_exits_cleanly_three_times_in_a_row(zhome_demo):
    for attempt in range(3):
        out = subprocess.run([sys.executable, "-c", RENDER_EVERY_PAGE, str(ROOT)], env=_env(zhome_demo.home),
                             capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
        assert out.returncode == 0, f"attempt {attempt + 1}: exit code {out.returncode}\n{out.stderr[-3000:]}"
        assert out.stdout.count("rendered") == 1 + len(list((ROOT / "pages").glob("*.py")))
        assert not any(bad in out.stderr for bad in BAD_EXIT), out.stderr[-3000:]
        assert not Path(str(zhome_demo.db_path) + ".wal").exists()
