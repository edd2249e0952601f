"""Training jobs from the command line (the same job manager as the Train tab):

    python -m training run --method dmd2 --base shapes-64-teacher [--set steps=500 ...] [--processes N] [--detach]
    python -m training list | methods
    python -m training status JOB | logs JOB [--lines N]
    python -m training cancel JOB [--wait] | resume JOB [--detach] | delete JOB
    python -m training export JOB [--name NAME] | try JOB [--prompt P] [--out image.png]

`run` and `resume` follow the job to its end with one progress line per change and exit 0 when it
completed, 1 when it failed or was cancelled (Ctrl-C only stops following; the job keeps training).
`--runs DIR` (or $ONESTEP_RUNS) picks the runs root. Errors are one line.
"""
from __future__ import annotations

import argparse
import sys


def _eta(seconds) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    return f" ETA {seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f" ETA {seconds // 60}m{seconds % 60:02d}s"


def progress_line(job, prog: dict) -> str:
    pct = f" ({100 * prog['fraction']:.0f}%)" if prog["total"] else ""
    rate = f" {prog['rate']:.1f} steps/s" if prog.get("rate") else ""
    return f"{job.id}: {job.status} step {prog['step']}/{prog['total']}{pct}{rate}{_eta(prog.get('eta'))} — {job.reason}"


def follow(mgr, job_id: str) -> int:
    try:
        job = mgr.wait(job_id, on_progress=lambda j, p: print(progress_line(j, p), flush=True))
    except KeyboardInterrupt:
        print(f"stopped following {job_id}; it keeps running (python -m training cancel {job_id} stops it)")
        return 130
    if job.status != "completed":
        if job.log_tail:
            print("--- log tail ---\n" + job.log_tail, file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default=None, help="runs root (default $ONESTEP_RUNS or runs/)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="start a job (follows it to its end unless --detach)")
    run.add_argument("--method", required=True)
    run.add_argument("--base", default=None, help="registry id or local diffusers folder (teacher or student)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    run.add_argument("--processes", type=int, default=1, help="accelerate processes (GPUs, or CPU workers)")
    run.add_argument("--name", default=None, help="job name (letters, digits, . _ -)")
    run.add_argument("--prompts", default=None,
                     help="'shapes', a built-in list name (shapeeval, heldout) or a text file under the data roots")
    run.add_argument("--detach", action="store_true", help="return once the job is queued or started")
    sub.add_parser("list", help="every job, newest first")
    sub.add_parser("methods", help="what can be trained, with the defaults")
    for name in ("status", "logs", "cancel", "resume", "delete", "export", "try"):
        p = sub.add_parser(name)
        p.add_argument("job")
        if name == "logs":
            p.add_argument("--lines", type=int, default=40)
        if name == "cancel":
            p.add_argument("--wait", action="store_true", help="wait until it has stopped")
        if name == "resume":
            p.add_argument("--detach", action="store_true")
        if name == "export":
            p.add_argument("--name", default=None)
        if name == "try":
            p.add_argument("--prompt", default="a red circle")
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--out", default="outputs/try.png")
    args = ap.parse_args(argv)

    from . import catalog
    from .jobs import JobManager

    if args.cmd == "methods":
        for m in catalog.METHODS.values():
            base = f" base={m.default_base}" if m.base_field else ""
            print(f"{m.name:12s} {m.label}.{base} defaults: {m.defaults}")
        return 0
    try:
        mgr = JobManager(args.runs, background=False)
        if args.cmd == "run":
            settings = list(args.set)
            if args.prompts:
                lists = catalog.builtin_prompt_lists()
                settings.append(f"prompts={lists.get(args.prompts, args.prompts)}")
            job = mgr.submit(args.method, base=args.base, settings=settings, name=args.name, processes=args.processes)
            print(f"{job.id}: {job.status} in {job.run_dir}", flush=True)
            return 0 if args.detach else follow(mgr, job.id)
        if args.cmd == "list":
            for j in mgr.list():
                print(f"{j.id:24s} {j.method:10s} {j.status:9s} {j.step:>7}/{j.total:<7} {j.reason[:90]}")
            return 0
        if args.cmd == "status":
            j = mgr.get(args.job)
            print(progress_line(j, mgr.progress(j)))
            print(f"run folder {j.run_dir}; checkpoint {j.checkpoint or 'none'}; exit code {j.exit_code}")
            return 0
        if args.cmd == "logs":
            print(mgr.log(mgr.get(args.job), args.lines))
            return 0
        if args.cmd == "cancel":
            j = mgr.cancel(args.job)
            print(f"{j.id}: {j.reason}")
            if args.wait:
                j = mgr.wait(j.id)
                print(f"{j.id}: {j.status}: {j.reason}")
            return 0
        if args.cmd == "resume":
            j = mgr.resume(args.job)
            print(f"{j.id}: {j.status}: {j.reason}", flush=True)
            return 0 if args.detach else follow(mgr, j.id)
        if args.cmd == "delete":
            mgr.delete(args.job)
            print(f"deleted {args.job}")
            return 0
        if args.cmd == "export":
            print(mgr.export(args.job, args.name))
            return 0
        if args.cmd == "try":
            from pathlib import Path

            folder, image = mgr.try_in_playground(args.job, args.prompt, seed=args.seed)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            image.save(args.out)
            print(f"{args.out} from {folder}")
            return 0
    except ValueError as e:  # LoadError and UnknownModelError-as-ValueError included: one line
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
