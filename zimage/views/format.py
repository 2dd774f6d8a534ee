"""Numbers and times as people read them: durations, clock times, progress lines, sizes."""

from __future__ import annotations

import math
import time

from zimage.runfolder import silence


def _is_number(value) -> bool:
    try:
        return value is not None and not math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def duration(seconds) -> str:
    """3 s, 4 min 05 s, 2 h 10 min, 3 d 4 h; '' for nothing / NaN; negative counts as 0."""
    if not _is_number(seconds):
        return ""
    s = max(0, int(round(float(seconds))))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def clock(ts, now: float | None = None) -> str:
    """A Unix time as 'HH:MM' today, else 'YYYY-MM-DD HH:MM'; '' for nothing."""
    if not _is_number(ts):
        return ""
    ts = float(ts)
    now = time.time() if now is None else now
    same_day = time.strftime("%Y-%m-%d", time.localtime(ts)) == time.strftime("%Y-%m-%d", time.localtime(now))
    return time.strftime("%H:%M" if same_day else "%Y-%m-%d %H:%M", time.localtime(ts))


def fraction(step, total) -> float:
    """step / total clamped to 0..1 (0 when the total is unknown)."""
    if not _is_number(step) or not _is_number(total) or float(total) <= 0:
        return 0.0
    return min(1.0, max(0.0, float(step) / float(total)))


def state_text(state: str | None, heartbeat=None, now: float | None = None) -> str:
    """'running', or 'running · silent 4 min 10 s' when the worker has not stamped its status for long."""
    quiet = silence(state, heartbeat, now)
    return f"{state} · silent {duration(quiet)}" if quiet is not None else (state or "")


def progress_text(step, total, eta=None, state: str | None = None) -> str:
    """'step 45 / 100 (45%) · ETA 3 min 10 s' — the line over a progress bar."""
    step_i = int(float(step)) if _is_number(step) else 0
    parts = []
    if _is_number(total) and float(total) > 0:
        parts.append(f"step {step_i} / {int(float(total))} ({fraction(step, total) * 100:.0f}%)")
    else:
        parts.append(f"step {step_i}")
    if state:
        parts.append(state)
    if _is_number(eta) and state in (None, "running", "starting") and float(eta) > 0:
        parts.append(f"ETA {duration(eta)}")
    return " · ".join(parts)


def number(value, digits: int = 4) -> str:
    """A metric value: 4 significant digits, scientific for tiny/huge ones, '' for nothing."""
    if not _is_number(value):
        return ""
    v = float(value)
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
        return f"{v:.{max(1, digits - 1)}e}"
    return f"{v:.{digits}g}"


def damaged_lines(df) -> list[str]:
    """`registry.damaged_runs` rows as warnings: 'Run <id> is damaged: status.json: pid must be ...'."""
    out = []
    for r in df.itertuples(index=False):
        what = "is damaged" if r.state == "damaged" else f"({r.state or 'state unknown'}) has a damaged file"
        out.append(f"Run {r.run_id} {what}: {r.problem}")
    return out
