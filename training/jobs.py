"""Background training jobs: a SQLite registry, one process group per job, cancel/resume/reconcile.

Each job is one command line, never a shell:

    python -m accelerate.commands.launch --num_processes N [--cpu] ... -m training.run --config runs/<id>/config.json

started in its own session (so its process group is the job: the accelerate launcher and every worker),
with stdout and stderr in runs/<id>/log.txt. The run writes metrics.jsonl, samples/ and atomic
checkpoints (training/checkpoint.py) into runs/<id>/. One job runs at a time; the rest wait queued.

- Cancel: SIGTERM to the group; the trainer finishes its step, writes a checkpoint and exits. If the
  group is still alive `kill_timeout` seconds later, SIGKILL to the group.
- A job whose processes are gone is finished by the manager that started it (it holds the exit code),
  or by any manager when that one is gone too: completed when the run reached its last step, cancelled
  when a cancel was asked, else failed with the trainer's exit code, the reason and the log's tail.
- On start a manager reconciles: a `running` job whose processes are gone (the app or machine went down)
  becomes failed ("process vanished"); one whose processes live on is adopted and watched.
- Resume queues the same run folder again; the run continues from its latest COMPLETE checkpoint.

The tab (ui/train.py) and the CLI (python -m training) both drive this class; either can be closed and
the jobs keep running.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

import psutil

from . import catalog, checkpoint, runlog
from .config import load_json, save_json

ROOT = catalog.ROOT
FINAL = ("completed", "failed", "cancelled")
TAIL_LINES = runlog.TAIL_LINES
RESERVED_NAMES = {"exports", "uploads", "data"}  # folders of the runs root that are not jobs
MAX_PROMPT_BYTES = 1 << 20
# The launchers this process started, by job id: a process-wide fact (only the parent can reap a child and
# learn its exit code), shared by every JobManager in the process.
_CHILDREN: dict[str, subprocess.Popen] = {}

SCHEMA = """CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, seq INTEGER, method TEXT, base TEXT, processes INTEGER, run_dir TEXT, status TEXT,
    created REAL, started REAL, ended REAL, pid INTEGER, pgid INTEGER, owner TEXT, attempts INTEGER DEFAULT 0,
    step INTEGER DEFAULT 0, total INTEGER DEFAULT 0, checkpoint TEXT DEFAULT '', exit_code INTEGER,
    reason TEXT DEFAULT '', log_tail TEXT DEFAULT '', cancel_at REAL, stopping INTEGER DEFAULT 0)"""


@dataclass
class Job:
    id: str
    seq: int
    method: str
    base: str
    processes: int
    run_dir: str
    status: str
    created: float
    started: float | None
    ended: float | None
    pid: int | None
    pgid: int | None
    owner: str | None
    attempts: int
    step: int
    total: int
    checkpoint: str
    exit_code: int | None
    reason: str
    log_tail: str
    cancel_at: float | None
    stopping: int  # stop signals sent to its group: 0 none, 1 SIGTERM, 2 SIGKILL

    @property
    def path(self) -> Path:
        return Path(self.run_dir)

    @property
    def config(self):
        return load_json(self.path / "config.json")


def default_root() -> Path:
    return Path(os.environ.get("ONESTEP_RUNS", ROOT / "runs"))


def _me() -> str:
    """This process as '<pid>:<start time>', so a recycled pid is never mistaken for a live manager."""
    p = psutil.Process()
    return f"{p.pid}:{p.create_time():.2f}"


def _owner_alive(owner: str | None) -> bool:
    if not owner:
        return False
    pid, _, start = owner.partition(":")
    try:
        p = psutil.Process(int(pid))
        return f"{p.create_time():.2f}" == start and p.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, ValueError):
        return False


def group_alive(pgid: int | None) -> bool:
    """True while any process of the group lives (zombies waiting to be reaped do not count)."""
    if not pgid:
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (OSError, psutil.Error):
            continue
    return False


class JobManager:
    """The registry and scheduler of training jobs under `root` (default runs/, or $ONESTEP_RUNS)."""

    def __init__(self, root: str | Path | None = None, data_roots=None, kill_timeout: float = 60.0,
                 poll_interval: float = 1.0, background: bool = True):
        self.root = Path(root or default_root()).resolve()
        self.exports = self.root / "exports"
        # prompt files and image folders must live here (an uploaded prompt file is copied into its run folder)
        self.data_roots = [Path(p) for p in (data_roots or [ROOT / "data", catalog.BUILTIN_PROMPTS])]
        self.kill_timeout = kill_timeout
        self.poll_interval = poll_interval
        self.background = background  # a scheduler thread polls while jobs are queued or running
        self.me = _me()
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.root.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute(SCHEMA)
        self.poll()  # reconcile what happened while no manager was watching
        self._ensure_scheduler()

    # --- registry ---------------------------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.root / "jobs.db", timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        return _Closing(db)

    def _update(self, job_id: str, **values) -> None:
        cols = ", ".join(f"{k} = ?" for k in values)
        with self._db() as db:
            db.execute(f"UPDATE jobs SET {cols} WHERE id = ?", [*values.values(), job_id])

    def get(self, job_id: str) -> Job:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (str(job_id),)).fetchone()
        if row is None:
            raise ValueError(f"no job {str(job_id)[:80]!r}; `python -m training list` shows the jobs")
        return Job(**{f.name: row[f.name] for f in fields(Job)})

    def list(self) -> list[Job]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY seq DESC").fetchall()
        return [Job(**{f.name: r[f.name] for f in fields(Job)}) for r in rows]

    # --- submit ------------------------------------------------------------------------------------------
    def submit(self, method: str, base: str | None = None, settings=(), name: str | None = None,
               processes: int = 1, prompts_text: str | None = None) -> Job:
        """Check everything, then write runs/<id>/config.json and queue the job. Raises ValueError (one line)
        before anything is written when the method, a setting, a name, a path or the memory is wrong."""
        m = catalog.get_method(method)
        overrides = catalog.parse_overrides(settings)
        if name is not None and str(name).strip():
            job_id = catalog.check_name(str(name).strip())
            if job_id in RESERVED_NAMES or job_id.startswith("jobs.db"):
                raise ValueError(f"job name {job_id!r} is reserved (the runs root uses it); pick another")
            if self._exists(job_id) or (self.root / job_id).exists():
                raise ValueError(f"job name {job_id!r} is taken; pick another or delete that job")
        else:
            job_id = self._next_id(m.name)
        processes = self._check_processes(m, processes)
        run_dir = self.root / job_id
        if prompts_text is not None:
            _check_prompt_text(prompts_text)
        cfg = catalog.build_config(m, base, overrides, run_dir, self.data_roots,
                                   prompts_file=run_dir / "prompts.txt" if prompts_text is not None else None)
        self.preflight(m, cfg, processes)
        run_dir.mkdir(parents=True)
        if prompts_text is not None:
            (run_dir / "prompts.txt").write_text(prompts_text)
        save_json(cfg, run_dir / "config.json")
        with self._db() as db:
            seq = (db.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()[0] or 0) + 1
            db.execute("INSERT INTO jobs (id, seq, method, base, processes, run_dir, status, created, total, reason) "
                       "VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?)",
                       (job_id, seq, m.name, getattr(cfg, m.base_field or "", "") if m.base_field else "",
                        processes, str(run_dir), time.time(), _total(cfg), "waiting for the running job"))
        self.poll()
        self._ensure_scheduler()
        return self.get(job_id)

    def _exists(self, job_id: str) -> bool:
        with self._db() as db:
            return db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is not None

    def _next_id(self, method: str) -> str:
        with self._db() as db:
            n = (db.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()[0] or 0) + 1
        while self._exists(f"{method}-{n}") or (self.root / f"{method}-{n}").exists():
            n += 1
        return f"{method}-{n}"

    def _check_processes(self, m: catalog.Method, processes) -> int:
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ValueError(f"processes must be a whole number of at least 1, got {str(processes)[:20]!r}")
        gpus = _gpu_count()
        most = gpus if gpus else (os.cpu_count() or 1)
        if processes > 1 and not m.multi_process:
            raise ValueError(f"the {m.name} method trains in one process; allowed processes: 1")
        if processes > most:
            raise ValueError(f"processes {processes} is more than this machine has "
                             f"({most} {'GPUs' if gpus else 'CPU cores'}); allowed: 1..{most}")
        return processes

    def preflight(self, m: catalog.Method, cfg, processes: int = 1) -> dict:
        """Refuse (ValueError) a job whose rough memory need does not fit the device's free memory."""
        need = catalog.estimate_memory(m, cfg)
        gpus = _gpu_count()
        if gpus:
            import torch

            free, where = min(torch.cuda.mem_get_info(i)[0] for i in range(processes)), "the GPU"
            total = need["total"]
        else:
            free, where = psutil.virtual_memory().available, "this machine's RAM"
            total = need["total"] * processes  # every CPU process holds its own copy
        if total > 0.9 * free:
            parts = ", ".join(f"{k} {catalog.gb(v)}" for k, v in need.items() if k != "total")
            raise ValueError(f"not enough memory: the job needs about {catalog.gb(total)} ({parts}"
                             f"{f', x{processes} processes' if processes > 1 and not gpus else ''}) but {where} has "
                             f"{catalog.gb(free)} free; lower batch_size, use generator_lora_rank/fake_lora_rank, "
                             "or mixed_precision=bf16")
        return {**need, "free": free}

    # --- scheduling ----------------------------------------------------------------------------------------
    def poll(self) -> None:
        """Watch running jobs (progress, death, cancel timeout) and start the next queued one when idle."""
        with self._lock:
            with self._db() as db:
                running = [r["id"] for r in db.execute("SELECT id FROM jobs WHERE status = 'running'")]
            for job_id in running:
                self._watch(self.get(job_id))
            self._start_next()

    def _watch(self, job: Job) -> None:
        own = _CHILDREN.get(job.id)
        code = own.poll() if own is not None else None
        fields = self._progress_fields(job)
        if (fields["step"], fields["checkpoint"]) != (job.step, job.checkpoint):  # no write when nothing moved
            self._update(job.id, **fields)
        if job.pgid is None:  # claimed but not spawned: only its claimant can be in the middle of starting it
            if not _owner_alive(job.owner):
                self._finish(job, None, vanished=True)
            return
        if group_alive(job.pgid):
            if own is None and not _owner_alive(job.owner):
                self._update(job.id, owner=self.me)  # adopt: its manager went away, the job did not
            if job.cancel_at and job.stopping < 1:  # cancelled while it was being started
                _signal_group(job.pgid, signal.SIGTERM)
                self._update(job.id, stopping=1)
            elif job.cancel_at and job.stopping < 2 and time.time() - job.cancel_at > self.kill_timeout:
                _signal_group(job.pgid, signal.SIGKILL)  # graceful stop took too long: the whole group goes
                self._update(job.id, stopping=2)
            return
        if own is None and job.owner != self.me and _owner_alive(job.owner):
            return  # the manager process that started it holds the exit code and will report it
        _CHILDREN.pop(job.id, None)
        self._finish(job, code, vanished=own is None)

    def _finish(self, job: Job, code: int | None, vanished: bool = False) -> None:
        tail = runlog.current_attempt(runlog.read_tail(job.path / "log.txt", lines=200))
        prog = self._progress_fields(job)
        ckpt = checkpoint.latest(job.path)
        saved = f"checkpoint {ckpt.name} kept; resume continues from it" if ckpt else "no checkpoint was written"
        summary = runlog.summary(tail)
        if summary.get("finished") or (prog["step"] >= job.total > 0 and code == 0):
            status, reason, child = "completed", f"finished {job.total} steps", 0
        elif job.cancel_at:
            status, child = "cancelled", None
            killed = f" (still running {self.kill_timeout:.0f} s after SIGTERM: killed)" if job.stopping == 2 else ""
            reason = f"cancelled at step {prog['step']}{killed}; {saved}"
        elif summary.get("finished") is False:
            status, child = "cancelled", 3
            reason = f"stopped early at step {summary.get('step', prog['step'])} (time budget); {saved}"
        elif vanished and code is None:
            status, child = "failed", None
            last = runlog.explain_exit(tail, None)[1] if re.search(r"Error|Traceback|died with", tail) else ""
            reason = (f"process vanished (the app or machine stopped while it ran){'; ' + last if last else ''}; "
                      f"{saved}")
        else:
            status = "failed"
            child, why = runlog.explain_exit(tail, code)
            reason = f"{why}; {saved}"
        with self._db() as db:  # only if nobody finished (and resumed) it meanwhile
            db.execute("UPDATE jobs SET status = ?, ended = ?, exit_code = ?, reason = ?, log_tail = ?, step = ?, "
                       "checkpoint = ? WHERE id = ? AND status = 'running' AND pgid IS ?",
                       (status, time.time(), child, reason[:1000], "\n".join(tail.splitlines()[-TAIL_LINES:]),
                        prog["step"], prog["checkpoint"], job.id, job.pgid))

    def _start_next(self) -> None:
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")  # one claimant at a time, across processes
            if db.execute("SELECT 1 FROM jobs WHERE status = 'running'").fetchone():
                db.execute("COMMIT")
                return
            row = db.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                db.execute("COMMIT")
                return
            db.execute("UPDATE jobs SET status = 'running', owner = ?, pid = NULL, pgid = NULL, cancel_at = NULL, "
                       "stopping = 0, exit_code = NULL, reason = '', attempts = attempts + 1, "
                       "started = COALESCE(started, ?) WHERE id = ?", (self.me, time.time(), row["id"]))
            db.execute("COMMIT")
        job = self.get(row["id"])
        try:
            proc = self._spawn(job)
        except OSError as e:
            self._update(job.id, status="failed", ended=time.time(), reason=f"could not start: {e}"[:500])
            return
        _CHILDREN[job.id] = proc
        self._update(job.id, pid=proc.pid, pgid=os.getpgid(proc.pid), reason=f"attempt {job.attempts} started")

    def launch_command(self, job: Job) -> list[str]:
        """The argument list of a job (no shell anywhere)."""
        gpus = _gpu_count()
        mp = getattr(job.config, "mixed_precision", "no")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(job.processes),
               "--num_machines", "1", "--mixed_precision", mp, "--dynamo_backend", "no"]
        if not gpus:
            cmd.append("--cpu")
        elif job.processes > 1:
            cmd.append("--multi_gpu")
        return cmd + ["-m", "training.run", "--config", str(job.path / "config.json")]

    def _spawn(self, job: Job) -> subprocess.Popen:
        if _gpu_count() and "pipelines.loading" in sys.modules:  # give the GPU to the job (one lease)
            from pipelines import generation

            generation.free_memory()
            import torch

            torch.cuda.empty_cache()
        cmd = self.launch_command(job)
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        with open(job.path / "log.txt", "ab") as log:
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} attempt {job.attempts}: {' '.join(cmd)}\n".encode())
            log.flush()
            return subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def watching(self) -> bool:
        """True while this manager's own thread polls the jobs (callers need not poll too)."""
        return self._thread is not None and self._thread.is_alive()

    def _ensure_scheduler(self) -> None:
        if not self.background:
            return
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="training-jobs", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                self.poll()
            except Exception as e:  # noqa: BLE001  (e.g. the database is busy): the next tick retries
                print(f"training jobs: poll failed ({e.__class__.__name__}: {e}); retrying", file=sys.stderr)
                continue
            with self._lock:
                with self._db() as db:
                    busy = db.execute("SELECT 1 FROM jobs WHERE status IN ('queued', 'running')").fetchone()
                if not busy:
                    self._thread = None
                    return

    def close(self) -> None:
        """Stop watching (the jobs keep running; the next manager adopts them)."""
        self._stop.set()

    # --- actions -------------------------------------------------------------------------------------------
    def cancel(self, job_id: str) -> Job:
        """Queued: cancelled at once. Running: SIGTERM to its group (checkpoint, then exit); SIGKILL later."""
        job = self.get(job_id)
        if job.status == "queued":
            with self._db() as db:  # unless a scheduler claimed it a moment ago: then it is running, see below
                gone = db.execute("UPDATE jobs SET status = 'cancelled', ended = ?, reason = ? WHERE id = ? AND "
                                  "status = 'queued'", (time.time(), "cancelled before it started", job.id)).rowcount
            if not gone:
                return self.cancel(job_id)
        elif job.status == "running":
            if not job.cancel_at:
                self._update(job.id, cancel_at=time.time(), reason="stopping: writing a checkpoint")
                if job.pgid:
                    _signal_group(job.pgid, signal.SIGTERM)
                    self._update(job.id, stopping=1)
        else:
            raise ValueError(f"job {job.id} is {job.status}; only queued or running jobs can be cancelled")
        self._ensure_scheduler()
        return self.get(job.id)

    def resume(self, job_id: str) -> Job:
        """Queue a failed or cancelled job again; it continues from its latest complete checkpoint."""
        job = self.get(job_id)
        if job.status not in ("failed", "cancelled"):
            raise ValueError(f"job {job.id} is {job.status}; only failed or cancelled jobs can be resumed")
        if not (job.path / "config.json").is_file():
            raise ValueError(f"job {job.id} has lost its run folder {job.path}; start a new job")
        ckpt = checkpoint.latest(job.path)
        self._update(job.id, status="queued", ended=None, cancel_at=None, stopping=0, exit_code=None,
                     reason=f"queued to resume from {ckpt.name if ckpt else 'the start (no checkpoint yet)'}")
        self.poll()
        self._ensure_scheduler()
        return self.get(job.id)

    def delete(self, job_id: str) -> None:
        """Forget a job that is not running and remove its run folder (exports stay)."""
        job = self.get(job_id)
        if job.status == "running":
            raise ValueError(f"job {job.id} is running; cancel it first")
        with self._db() as db:  # the scheduler may have claimed it since: delete only a job still not running
            deleted = db.execute("DELETE FROM jobs WHERE id = ? AND status != 'running'", (job.id,)).rowcount
        if not deleted:
            raise ValueError(f"job {job.id} has just started; cancel it first")
        if job.path.resolve().parent == self.root:  # never remove anything outside the runs root
            shutil.rmtree(job.path, ignore_errors=True)

    def wait(self, job_id: str, timeout: float | None = None, on_progress=None) -> Job:
        """Poll until the job ends (or `timeout` seconds); `on_progress(job, progress)` on each change."""
        end = None if timeout is None else time.time() + timeout
        last = None
        while True:
            self.poll()
            job = self.get(job_id)
            prog = self.progress(job)
            if on_progress and (job.status, prog["step"], job.reason) != last:
                on_progress(job, prog)
                last = (job.status, prog["step"], job.reason)
            if job.status in FINAL or (end is not None and time.time() > end):
                return job
            time.sleep(self.poll_interval)

    # --- what a run shows -----------------------------------------------------------------------------------
    def metrics(self, job: Job, max_bytes: int = 1 << 20) -> list[dict]:
        return runlog.metrics(job.method, job.path, max_bytes)

    def _progress_fields(self, job: Job) -> dict:
        ckpt = checkpoint.latest(job.path)
        return {"step": max(runlog.step_reached(job.method, job.path), 0), "checkpoint": ckpt.name if ckpt else ""}

    def progress(self, job: Job) -> dict:
        """step, total, fraction, pace (steps/s), ETA and `quiet` (seconds since the run last wrote a line)."""
        running = job.status == "running"
        rows = runlog.timed_rows(job.method, job.path)  # read once for both step and pace
        step = runlog.step_reached(job.method, job.path, rows) if running else job.step
        rate = runlog.pace(job.method, job.path, rows)
        total = job.total or 1
        return {"step": step, "total": job.total, "fraction": min(1.0, step / total), "rate": rate,
                "eta": (total - step) / rate if rate and running else None, "status": job.status,
                "quiet": runlog.quiet_seconds(job.method, job.path) if running else None}

    def latest_sample(self, job: Job) -> Path | None:
        return runlog.latest_sample(job.path)

    def log(self, job: Job, lines: int = TAIL_LINES) -> str:
        return runlog.read_tail(job.path / "log.txt", lines)

    # --- models from a run -----------------------------------------------------------------------------------
    def export(self, job_id: str, name: str | None = None) -> Path:
        """Write the latest complete checkpoint as a model folder under <root>/exports/ (the registry's
        local models); the job may still be running."""
        job = self.get(job_id)
        step = checkpoint.latest(job.path)
        name = catalog.check_name(name.strip() if name and name.strip() else
                                  f"{job.id}-{step.name if step else 'none'}", "export name")
        out = self.exports / name
        if out.exists():
            raise ValueError(f"export {name!r} exists; choose another name or remove {out}")
        return self._export_to(job, out)

    def playground(self, job_id: str) -> Path:
        """Export the latest checkpoint to runs/<id>/export/<step>/ (reused when it is already there)."""
        job = self.get(job_id)
        m = catalog.get_method(job.method)
        if not m.makes_images:
            raise ValueError(f"a {job.method} job makes no images to try; use Export to write its model folder")
        ckpt = catalog.latest_complete(job.path)
        out = job.path / "export" / ckpt.name
        if not out.exists():
            self._export_to(job, out)
            for old in sorted((job.path / "export").glob("step-*"))[:-2]:  # keep the newest two
                shutil.rmtree(old, ignore_errors=True)
        return out

    def try_in_playground(self, job_id: str, prompt: str = "a red circle", seed: int = 0, device: str | None = None):
        """The latest checkpoint as a model folder, and one image it makes: (folder, PIL image)."""
        from pipelines import generation

        folder = self.playground(job_id)
        image = generation.generate(str(folder), prompt, seed=seed, device=device).images[0]
        return folder, image

    def _export_to(self, job: Job, out: Path) -> Path:
        m = catalog.get_method(job.method)
        tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        for attempt in (1, 2):  # the running job may rotate the checkpoint away mid-read: once more
            try:
                m.export(job.config, job.path, tmp)
                break
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                if attempt == 2:
                    raise
        os.replace(tmp, out)  # a folder appears only when it is whole
        return out


class _Closing:
    """sqlite3 connection as a context manager that closes (sqlite3's own only commits)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        return self.db

    def __exit__(self, *exc) -> None:
        if self.db.in_transaction:
            self.db.rollback() if exc[0] else self.db.commit()
        self.db.close()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def _total(cfg) -> int:
    if cfg.method == "msd":
        students = len(cfg.groups) if cfg.router == "category" else cfg.num_students
        return cfg.steps * students
    return cfg.steps


def _check_prompt_text(text: str) -> None:
    if len(text.encode("utf-8", errors="replace")) > MAX_PROMPT_BYTES:
        raise ValueError(f"prompt file is larger than {MAX_PROMPT_BYTES // 1024} KB; allowed: a text file up to 1 MB")
    if "\x00" in text:
        raise ValueError("prompt file is not text (it holds NUL bytes); allowed: UTF-8 text, one prompt a line")
    if not any(ln.strip() for ln in text.splitlines()):
        raise ValueError("prompt file holds no prompts; one prompt a line")
