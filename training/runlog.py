"""Reading a run folder while it trains: the log's tail and what the launcher said about an exit, the
metrics lines, the step reached and its pace (for an ETA), the newest sample grid. Reads only the ends
of files (a long run's log and metrics grow without bound)."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

TAIL_LINES = 40


def read_tail(path: Path, lines: int = TAIL_LINES, max_bytes: int = 16384) -> str:
    """The last lines of a log without reading all of it; progress-bar redraws (\\r) keep their last state."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - max_bytes))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    kept = [ln.rsplit("\r", 1)[-1] for ln in text.split("\n")]
    return "\n".join([ln for ln in kept if ln.strip()][-lines:])


def current_attempt(tail: str) -> str:
    """The part of a log tail written by the latest attempt (each starts with a '=== ... attempt' line)."""
    lines = tail.splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.startswith("=== ") and " attempt " in ln]
    return "\n".join(lines[starts[-1]:] if starts else lines)


def explain_exit(tail: str, code: int | None) -> tuple[int | None, str]:
    """The trainer's own exit code and a one-line reason, from the launcher's report in the log."""
    sig = re.findall(r"died with <Signals\.(SIG\w+): (\d+)>", tail) or re.findall(r"Signal (\d+) \((SIG\w+)\)", tail)
    if sig:
        name, num = sig[-1] if sig[-1][0].startswith("SIG") else sig[-1][::-1]
        why = " (out of memory, or stopped from outside)" if name == "SIGKILL" else ""
        return -int(num), f"killed by {name}{why}"
    codes = re.findall(r"returned non-zero exit status (-?\d+)", tail) or re.findall(r"exitcode\s*:\s*(-?\d+)", tail)
    child = int(codes[-1]) if codes else code
    errors = [ln.strip() for ln in tail.splitlines()
              if re.match(r"\s*(\w+\.)*\w*(Error|Exception|error)\b:?", ln) and "CalledProcessError" not in ln
              and "ChildFailedError" not in ln]
    detail = errors[-1][:300] if errors else "no error message in the log"
    if child == 2:
        return child, f"bad config: {detail}"
    return child, f"exit code {child}: {detail}" if child is not None else f"ended: {detail}"


def summary(tail: str) -> dict:
    """training.run's last line: {"method": ..., "finished": bool, "step": N, ...}."""
    for ln in reversed(tail.splitlines()):
        if ln.startswith('{"method"'):
            try:
                return json.loads(ln)
            except json.JSONDecodeError:
                return {}
    return {}


def metric_files(method: str, run_dir: Path) -> list[Path]:
    """MSD trains its students one after another, each in its own sub-run."""
    if method == "msd":
        return sorted(run_dir.glob("student-*/metrics.jsonl"))
    return [run_dir / "metrics.jsonl"]


def metrics(method: str, run_dir: Path, max_bytes: int = 1 << 20) -> list[dict]:
    """Logged training lines ({"step", "time", losses...}) and sample scores, oldest first; each with its
    `source` ("" or "student-<i>/")."""
    out = []
    for f in metric_files(method, run_dir):
        prefix = f"{f.parent.name}/" if f.parent != run_dir else ""
        try:
            with open(f, "rb") as fh:
                fh.seek(max(0, fh.seek(0, 2) - max_bytes))
                lines = fh.read().decode("utf-8", errors="replace").splitlines()
        except OSError:
            continue
        for ln in lines:
            try:
                row = json.loads(ln)
            except json.JSONDecodeError:
                continue  # a line cut by the tail window, or being written
            if isinstance(row, dict) and "step" in row:
                out.append({"source": prefix, **row})
    return out


def timed_rows(method: str, run_dir: Path) -> list[dict]:
    """The training lines (those with a `time`) near the end of the metrics: what step and pace need."""
    return [r for r in metrics(method, run_dir, max_bytes=65536) if "time" in r]


def metrics_stamp(method: str, run_dir: Path) -> tuple:
    """(name, size, mtime) of each metrics file: changes exactly when there is something new to read."""
    return tuple((str(f), st.st_size, st.st_mtime_ns) for f in metric_files(method, run_dir)
                 if f.is_file() and (st := f.stat()))


def step_reached(method: str, run_dir: Path, rows: list[dict] | None = None) -> int:
    rows = timed_rows(method, run_dir) if rows is None else rows
    if method == "msd":  # the sum over students of each one's last step
        last = {}
        for r in rows:
            last[r["source"]] = r["step"]
        return sum(last.values())
    return rows[-1]["step"] if rows else 0


def pace(method: str, run_dir: Path, rows: list[dict] | None = None) -> float | None:
    """Steps per second over the newest stretch of one attempt (its `time` restarts at each attempt)."""
    rows = timed_rows(method, run_dir) if rows is None else rows
    recent = []
    for r in reversed(rows):  # going back, `time` keeps falling within one attempt of one sub-run
        if recent and (r["time"] >= recent[-1]["time"] or r["source"] != recent[-1]["source"]):
            break
        recent.append(r)
        if len(recent) >= 20:
            break
    if len(recent) >= 2 and recent[0]["time"] > recent[-1]["time"]:
        return (recent[0]["step"] - recent[-1]["step"]) / (recent[0]["time"] - recent[-1]["time"])
    return None


def quiet_seconds(method: str, run_dir: Path) -> float | None:
    """Seconds since the run last wrote a metrics or log line (a live process that stays quiet may hang)."""
    beats = [f.stat().st_mtime for f in [*metric_files(method, run_dir), run_dir / "log.txt"] if f.is_file()]
    return time.time() - max(beats) if beats else None


def latest_sample(run_dir: Path) -> Path | None:
    grids = [*run_dir.glob("samples/step-*.png"), *run_dir.glob("student-*/samples/step-*.png")]  # MSD: per student
    return max(grids, key=lambda p: (p.stat().st_mtime, p.name)) if grids else None
