"""Pages render without the heavy libraries: torch, diffusers, transformers (seconds of import each) are
loaded only where a button needs them, never at page import or render (issue 15, item 3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["Home.py", "pages/1_Datasets.py", "pages/2_Captioning.py", "pages/3_Train.py", "pages/4_Runs.py",
         "pages/5_Compare.py"]  # fmt: skip
HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes")

# Renders every page in one fresh interpreter (a new app server's first visitor) and reports, after each page,
# which heavy modules are loaded.
PROBE = """
import json, os, sys
from streamlit.testing.v1 import AppTest
heavy = os.environ["HEAVY_MODULES"].split(",")
out = {}
for page in sys.argv[1:]:
    at = AppTest.from_file(page, default_timeout=120).run()
    out[page] = {"heavy": [m for m in heavy if m in sys.modules], "exception": [e.message for e in at.exception]}
from zimage.jobs.scheduler import stop_all
stop_all()
print(json.dumps(out))
"""


def test_no_page_imports_torch_diffusers_or_transformers(zhome_demo):
    env = dict(os.environ, ZIMAGE_HOME=str(zhome_demo.home), ZIMAGE_SCHEDULER_LAUNCH="0", HEAVY_MODULES=",".join(HEAVY))
    proc = subprocess.run([sys.executable, "-c", PROBE, *[str(ROOT / p) for p in PAGES]], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for page in PAGES:
        got = report[str(ROOT / page)]
        assert not got["exception"], (page, got["exception"])
        assert got["heavy"] == [], f"rendering {page} imported {got['heavy']}"
