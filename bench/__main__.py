"""Speed benchmarks, measured side by side in one process: `python -m bench` (or `make bench`).

    python -m bench [--student shapes-64] [--batches 1,8,16] [--seconds 1.0] [--repeats 50]
                    [--skip cold,reno,...] [--note TEXT] [--out bench/results/<machine>.json] [--readme]

Rows (each a ratio to its baseline, measured in this run on this machine):
  student   images/s at each batch: eager PyTorch (a private NCHW pipeline, prompt encoded every call),
            PyTorch with caches (prompt-embedding cache + channels_last), ONNX Runtime (cached prompt;
            the export is built into the cache first when missing); bf16 vs fp32 at batch 1
  teacher   its default steps with CFG, images/s, and the student/teacher speedup against their ratio
            of UNet evaluations (CFG counts two per step)
  nasa      NASA on vs off (and the CFG-style baseline), bench.nasa's timing on each engine
  reno      ReNO seconds per iteration vs one generation
  control   ControlNet/NCT overhead: a control image vs none (the model's own adapter, else a
            ControlNet initialised from the student's UNet: same architecture, timing only)
  cold      cold start: process start to first image, `python -m pipelines generate` in a subprocess
  flops     the student's FLOPs per image (torch.utils.flop_counter) and the fraction of this
            machine's measured fp32 matmul peak that each engine reaches

Each measurement runs one warm-up call, then repeats until --seconds or --repeats, and keeps the
median. A row that cannot run here says why instead of stopping the bench. Results go to
bench/results/<machine>.json; --readme also rewrites the table in README.md (bench/report.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipelines import generation, loading, onestep, registry, teacher
from pipelines.errors import first_line

from . import report

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red circle left of a blue square"
SECTIONS = ("student", "teacher", "nasa", "reno", "control", "cold", "flops")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name() -> str:
    """A short slug: the GPU's name, else the CPU model and its core count (e.g. amd-epyc-2c)."""
    if torch.cuda.is_available():
        return _slug(torch.cuda.get_device_name(0))
    return f"{_slug(cpu_model())}-{os.cpu_count()}c"


def measure(fn, batch: int, seconds: float, repeats: int, warmup: bool = True) -> dict:
    """Median wall time of fn(batch) over repeats (at least one, at most `repeats`, stop after `seconds`)."""
    if warmup:
        fn(batch)
    times, last = [], None
    end = time.perf_counter() + seconds
    while not times or (len(times) < repeats and time.perf_counter() < end):
        t0 = time.perf_counter()
        last = fn(batch)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    out = {"images_per_s": batch / med, "seconds": med, "repeats": len(times)}
    if last is not None and getattr(last, "timings", None):
        out["stages_ms"] = {k: round(v * 1000, 2) for k, v in last.timings.items()}
    return out


def matmul_peak(seconds: float = 1.0, n: int = 2048) -> dict:
    """This machine's fp32 matmul rate (GFLOP/s), the best of repeated n x n products."""
    device = loading.default_device()
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best, end = 0.0, time.perf_counter() + seconds
    torch.matmul(a, b)
    while best == 0.0 or time.perf_counter() < end:
        onestep.sync(device)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        onestep.sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return {"gflops_per_s": best, "n": n, "dtype": "float32", "device": device}


def student_flops(pipe, spec) -> dict:
    """FLOPs of one image, per stage (matmuls, convolutions, attention: what FlopCounterMode counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    res, h = spec.resolution, spec.resolution
    out = {}
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            cond = onestep.encode_prompt(pipe, [PROMPT], res, h)
        out["text_encoder"] = fc.get_total_flops()
        noise = onestep.make_noise(pipe, [0], res, h)
        ts = onestep.resolve_timesteps(spec, spec.steps, None, pipe.scheduler.config.num_train_timesteps)
        with FlopCounterMode(display=False) as fc:
            lat = onestep.denoise(pipe, cond, noise, ts)
        out["unet"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            onestep.decode(pipe, lat)
        out["vae_decoder"] = fc.get_total_flops()
    out["total"] = sum(out.values())
    return {k: v / 1e9 for k, v in out.items()}  # GFLOP


def bench_student(student: str, batches: list[int], seconds: float, repeats: int) -> dict:
    from pipelines import onnx_engine, speed

    spec = registry.get(student)
    eager = loading.load_pipeline(student, cache=False)  # private: stays NCHW, nothing cached
    cached = speed.pipeline(student, speed.TorchOptions(channels_last=True))
    t0 = time.perf_counter()
    exported = onnx_engine.find(spec, fresh=True)[0] is None  # no usable export yet: this run makes one
    engine, _ = onnx_engine.engine_for(spec, build="now")
    export_s = time.perf_counter() - t0
    engines = {
        "eager": lambda n: onestep.generate(eager, spec, PROMPT, batch_size=n, prompt_cache=False),
        "torch_cached": lambda n: onestep.generate(cached, spec, PROMPT, batch_size=n),
        "onnx": lambda n: onnx_engine.generate(engine, spec, PROMPT, batch_size=n),
    }
    if "tiny_decoder" in engine.sessions:  # the fastest configuration: ONNX with the tiny decoder graph
        engines["onnx_tiny"] = lambda n: onnx_engine.generate(engine, spec, PROMPT, batch_size=n, tiny_decoder=True)
    rows = []
    for b in batches:
        row = {"batch": b}
        for name, fn in engines.items():
            row[name] = measure(fn, b, seconds, repeats)
        row["onnx_vs_eager"] = row["onnx"]["images_per_s"] / row["eager"]["images_per_s"]
        row["cached_vs_eager"] = row["torch_cached"]["images_per_s"] / row["eager"]["images_per_s"]
        rows.append(row)
    out = {"rows": rows, "onnx_folder": str(engine.folder), "onnx_setup_seconds": export_s, "onnx_exported": exported,
           "onnx_providers": engine.sessions["unet"].get_providers()}
    if loading.default_device() == "cpu":  # does bf16 pay on this CPU? (auto keeps fp32 where it does not)
        bf16 = loading.load_pipeline(student, device="cpu", dtype=torch.bfloat16, cache=False)
        fp32 = rows[0]["eager"]["images_per_s"] if batches[0] == 1 else None
        b = measure(lambda n: onestep.generate(bf16, spec, PROMPT, batch_size=n, prompt_cache=False), 1, seconds, 5)
        out["bf16_batch1"] = {**b, "vs_fp32": b["images_per_s"] / fp32 if fp32 else None}
        del bf16
    return out


def bench_teacher(student: str, batches: list[int], seconds: float, repeats: int, student_res: dict) -> dict:
    from pipelines import speed

    spec = registry.get(student)
    if not spec.teacher:
        raise ValueError(f"{student} has no teacher to compare with")
    tspec = registry.get(spec.teacher)
    tpipe = loading.load_pipeline(spec.teacher)
    nfe_s, nfe_t = spec.steps, tspec.steps * (2 if tspec.guidance_scale > 1 else 1)
    rows = []
    for i, b in enumerate(batches):
        t = measure(lambda n: teacher.sample(tpipe, tspec, PROMPT, batch_size=n), b, seconds, max(1, repeats // 10),
                    warmup=i == 0)
        srow = next((r for r in student_res.get("rows", []) if r["batch"] == b), None)
        row = {"batch": b, "teacher": t}
        if srow and "onnx_tiny" in srow:  # the same decoder on both sides: the teacher with the tiny decoder too
            tiny = speed.pipeline(spec.teacher, speed.TorchOptions(tiny_decoder=True))
            row["teacher_tiny"] = measure(lambda n: teacher.sample(tiny, tspec, PROMPT, batch_size=n), b, seconds,
                                          max(1, repeats // 10), warmup=i == 0)
            row["speedup_tiny"] = srow["onnx_tiny"]["images_per_s"] / row["teacher_tiny"]["images_per_s"]
            row["speedup_tiny_over_nfe_ratio"] = row["speedup_tiny"] / (nfe_t / nfe_s)
        if srow:
            best = max(("eager", "torch_cached", "onnx"), key=lambda k: srow[k]["images_per_s"])
            row.update(fastest_student=best, speedup=srow[best]["images_per_s"] / t["images_per_s"],
                       speedup_eager=srow["eager"]["images_per_s"] / t["images_per_s"])
            row["speedup_over_nfe_ratio"] = row["speedup"] / (nfe_t / nfe_s)
            # diffusers batches CFG's two evaluations into one UNet call of twice the batch
            row["speedup_over_call_ratio"] = row["speedup"] / (tspec.steps / spec.steps)
            if "stages_ms" in srow["eager"] and "stages_ms" in t:  # same framework, UNet work only
                row["denoising_speedup_eager"] = t["stages_ms"]["denoising"] / max(srow["eager"]["stages_ms"]["denoising"], 1e-9)
        rows.append(row)
    return {"teacher": spec.teacher, "teacher_steps": tspec.steps, "teacher_cfg": tspec.guidance_scale,
            "student_nfe": nfe_s, "teacher_nfe": nfe_t, "nfe_ratio": nfe_t / nfe_s,
            "unet_call_ratio": tspec.steps / spec.steps, "rows": rows}


def bench_nasa(student: str, repeats: int) -> dict:
    from .nasa import _timing

    spec = registry.get(student)
    alpha = spec.offered_nasa_alpha
    out: dict = {}
    for engine in ("torch", "onnx"):
        try:
            out[engine] = _timing(student, alpha, 2.0, 8, repeats, None, engine=engine)
        except ValueError as e:  # e.g. a model whose NASA the ONNX graph does not serve (nasa_words_only)
            out[engine] = f"skipped: {e}"
    return out


def bench_reno(student: str, student_res: dict) -> dict:
    """The default budget with the model's default rewards, end to end: per iteration and in all."""
    from pipelines import reno

    spec = registry.get(student)
    pipe = loading.load_pipeline(student)
    res = reno.refine(pipe, spec, PROMPT, None, seed=0)
    per_it = res.seconds / len(res.history)
    one = {k: 1 / student_res["rows"][0][k]["images_per_s"] for k in ("torch_cached", "onnx")} \
        if student_res.get("rows") and student_res["rows"][0]["batch"] == 1 else {}
    return {"iterations": len(res.history), "rewards": res.settings["reno"]["rewards"], "seconds": res.seconds,
            "seconds_per_iteration": per_it, "generation_seconds": one,
            **{f"ratio_vs_{k}": per_it / v for k, v in one.items()},
            **{f"budget_ratio_vs_{k}": res.seconds / v for k, v in one.items()}}


def bench_control(student: str, seconds: float, repeats: int, workdir: Path) -> dict:
    from PIL import Image, ImageDraw

    from pipelines import control

    spec = registry.get(student)
    img = Image.new("RGB", (spec.resolution, spec.resolution), "white")
    ImageDraw.Draw(img).ellipse((8, 8, spec.resolution - 8, spec.resolution - 8), fill="red")
    try:
        source, kind = control.resolve(spec, "canny", "auto")
        if not Path(source).is_dir():
            raise ValueError(f"{source} is not installed")
        # generation refuses a control model made for other latents: then time the stand-in below
        generation.generate(student, PROMPT, engine="torch", control_image=img, control_model=source)
        label = f"{kind} {source}"
    except ValueError as e:  # no trained adapter here: the same architecture, from the student's UNet
        from training.methods.controlnet import new_controlnet

        pipe = loading.load_pipeline(student)
        source = workdir / "controlnet-from-unet"
        new_controlnet(pipe.unet, pipe.vae_scale_factor).save_pretrained(source, safe_serialization=True)
        source, kind = str(source), "controlnet"
        label = "ControlNet initialised from the student UNet (timing only: " + (
            "no trained control model installed)" if "not installed" in str(e) else f"{e})")
    out = {"model": label}
    for b in (1, 4):
        plain = measure(lambda n: generation.generate(student, PROMPT, batch_size=n, engine="torch"), b, seconds, repeats)
        ctl = measure(lambda n: generation.generate(student, PROMPT, batch_size=n, engine="torch", control_image=img,
                                                    control_model=source), b, seconds, repeats)
        out[f"batch{b}"] = {"plain": plain, "control": ctl, "overhead": plain["images_per_s"] / ctl["images_per_s"]}
    return out


def bench_cold(student: str, workdir: Path) -> dict:
    """Process start to first image on each engine: the CLI a user runs, timed from outside."""
    out = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    for engine in ("torch", "onnx"):
        png = workdir / f"cold-{engine}.png"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pipelines", "generate", "--model", student, "--prompt", PROMPT,
                               "--engine", engine, "--out", str(png), "--json"], capture_output=True, text=True,
                              cwd=ROOT, env=env, timeout=600)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            out[engine] = {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]}
            continue
        first = json.loads(proc.stdout)["timings"]["total"]
        out[engine] = {"seconds": wall, "first_image_seconds": first}
    return out


def run(student: str, batches: list[int], seconds: float, repeats: int, skip: set, note: str = "") -> dict:
    import onnxruntime

    res = {"machine": machine_name(), "cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "torch": torch.__version__,
           "onnxruntime": onnxruntime.__version__, "student": student, "note": note, "batches": batches,
           "date": time.strftime("%Y-%m-%d %H:%M")}
    t_start = time.perf_counter()

    def section(name, fn):
        if name in skip:
            return {"skipped": True}
        t0 = time.perf_counter()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        try:
            out = fn()
        except Exception as e:  # one row that cannot run here must not lose the others
            out = {"error": f"{e.__class__.__name__}: {first_line(e)}"}
        out["bench_seconds"] = round(time.perf_counter() - t0, 1)
        return out

    res["student_throughput"] = section("student", lambda: bench_student(student, batches, seconds, repeats))
    res["teacher"] = section("teacher", lambda: bench_teacher(student, batches, seconds, repeats, res["student_throughput"]))
    res["nasa"] = section("nasa", lambda: bench_nasa(student, max(2, min(5, repeats))))
    res["reno"] = section("reno", lambda: bench_reno(student, res["student_throughput"]))
    with tempfile.TemporaryDirectory() as tmp:
        res["control"] = section("control", lambda: bench_control(student, seconds, repeats, Path(tmp)))
        res["cold_start"] = section("cold", lambda: bench_cold(student, Path(tmp)))
    res["flops"] = section("flops", lambda: _flops(student, seconds, res["student_throughput"]))
    # the rows of the earlier bench (student vs teacher per batch), kept for readers of old results
    res["rows"] = [{"batch": r["batch"], "student_images_per_s": s["onnx"]["images_per_s"],
                    "teacher_images_per_s": r["teacher"]["images_per_s"], "ratio": r["speedup"]}
                   for r, s in zip(res["teacher"].get("rows", []), res["student_throughput"].get("rows", []))
                   if "speedup" in r]
    res["bench_seconds"] = round(time.perf_counter() - t_start, 1)
    return res


def _flops(student: str, seconds: float, student_res: dict) -> dict:
    spec = registry.get(student)
    per_image = student_flops(loading.load_pipeline(student, cache=False), spec)
    peak = matmul_peak(seconds)
    rows = []
    for r in student_res.get("rows", []):
        rows.append({"batch": r["batch"], **{f"{k}_fraction_of_peak": per_image["total"] * r[k]["images_per_s"]
                                              / peak["gflops_per_s"] for k in ("eager", "torch_cached", "onnx")}})
    return {"gflop_per_image": per_image, "matmul_peak": peak, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", default=registry.DEFAULT_MODEL, help="registry id or a student folder")
    ap.add_argument("--batches", default="1,8,16", help="batch sizes (1 and 8: the student-vs-teacher figures)")
    ap.add_argument("--seconds", type=float, default=1.0, help="measurement time per configuration")
    ap.add_argument("--repeats", type=int, default=50, help="at most this many timed calls per configuration")
    ap.add_argument("--skip", default="", help=f"comma-separated sections to skip: {', '.join(SECTIONS)}")
    ap.add_argument("--note", default="", help="a line stored with the results (e.g. what the student is)")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/<machine>.json)")
    ap.add_argument("--readme", action="store_true", help="also write the table into README.md")
    args = ap.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
        if not batches or any(not 1 <= b <= onestep.MAX_BATCH for b in batches):
            raise ValueError
    except ValueError:
        print(f"error: --batches {args.batches[:40]!r}: allowed: comma-separated whole numbers from 1 to "
              f"{onestep.MAX_BATCH}", file=sys.stderr)
        return 2
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(SECTIONS):
        print(f"error: unknown --skip {', '.join(sorted(skip - set(SECTIONS)))}; allowed: {', '.join(SECTIONS)}",
              file=sys.stderr)
        return 2
    try:
        spec = registry.get(args.student)
    except KeyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not registry.installed(spec):
        print(f"error: {args.student} is not on this machine (build or fetch it, or give --student FOLDER, e.g. a "
              "student exported from a training run)", file=sys.stderr)
        return 2
    res = run(args.student, batches, args.seconds, args.repeats, skip, args.note)
    out = Path(args.out) if args.out else RESULTS / f"{res['machine']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(report.render(res))
    print(f"wrote {out}")
    if args.readme:
        report.update_readme(res, ROOT / "README.md")
        print("updated README.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
