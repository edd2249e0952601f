"""Benchmarks, measured side by side in one process: `python -m bench` (or `make bench`).

    python -m bench [--student shapes-64] [--batches 1,8] [--repeats 5] [--out bench/results/<machine>.json]

Prints images/s of the one-step student and of its teacher (default steps + CFG) at each batch size,
and the student/teacher ratio, with the prompt embedding recomputed every call (end to end).
Results go to bench/results/<machine>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from pipelines import loading, onestep, registry, teacher

RESULTS = Path(__file__).resolve().parent / "results"


def machine_name() -> str:
    gpu = torch.cuda.get_device_name(0).replace(" ", "-") if torch.cuda.is_available() else f"cpu{torch.get_num_threads()}"
    return f"{platform.machine()}-{gpu}"


def images_per_second(fn, batch: int, repeats: int) -> float:
    fn(batch)  # warm-up (first call pays for lazy init)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def bench_student_vs_teacher(student_id: str, batches: list[int], repeats: int) -> dict:
    student = registry.get(student_id)
    if not student.teacher:
        raise ValueError(f"{student_id} has no teacher to compare with")
    tspec = registry.get(student.teacher)
    spipe, tpipe = loading.load_pipeline(student_id), loading.load_pipeline(student.teacher)
    prompt = "a red circle left of a blue square"
    rows = []
    for b in batches:
        s = images_per_second(lambda n: onestep.generate(spipe, student, prompt, batch_size=n), b, repeats)
        t = images_per_second(lambda n: teacher.sample(tpipe, tspec, prompt, batch_size=n), b, max(1, repeats // 2))
        rows.append({"batch": b, "student_images_per_s": s, "teacher_images_per_s": t, "ratio": s / t})
    nfe_student = student.steps
    nfe_teacher = tspec.steps * (2 if tspec.guidance_scale > 1 else 1)
    return {"student": student_id, "teacher": student.teacher, "student_nfe": nfe_student, "teacher_nfe": nfe_teacher,
            "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", default=registry.DEFAULT_MODEL)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    res = bench_student_vs_teacher(args.student, batches, args.repeats)
    print(f"{'batch':>5} {'student img/s':>14} {'teacher img/s':>14} {'ratio':>8}   "
          f"(NFE {res['student_nfe']} vs {res['teacher_nfe']})")
    for r in res["rows"]:
        print(f"{r['batch']:>5} {r['student_images_per_s']:>14.2f} {r['teacher_images_per_s']:>14.2f} {r['ratio']:>8.1f}")
    out = Path(args.out) if args.out else RESULTS / f"{machine_name()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine_name(), "torch": torch.__version__, **res}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
