"""Markdown tables of a `python -m bench` result, and the README section that shows the latest one.

    python -m bench.report bench/results/<machine>.json [--readme]   # print (and put in README.md)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
ENGINES = (("eager", "eager PyTorch"), ("torch_cached", "PyTorch + caches"), ("onnx", "ONNX Runtime"),
           ("onnx_tiny", "ONNX + tiny decoder"))


def _f(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _weights(rewards) -> str:
    """{'clip': 0.01} -> 'clip=0.01' (older results hold a list of names)."""
    return ", ".join(f"{k}={v:g}" for k, v in rewards.items()) if isinstance(rewards, dict) else ", ".join(rewards)


def _missing(section: dict) -> str | None:
    if not isinstance(section, dict):
        return "not run"
    if section.get("skipped"):
        return "skipped"
    if "error" in section:
        return section["error"]
    return None


def render(res: dict) -> str:
    """The student/teacher table and the table of the other rows, as markdown."""
    threads = f"{res.get('threads')} thread{'' if res.get('threads') == 1 else 's'}"
    head = (f"Measured on `{res['machine']}` ({res.get('gpu') or res.get('cpu')}, {threads}; "
            f"torch {res.get('torch')}, onnxruntime {res.get('onnxruntime')}), {res.get('date', '')}, student "
            f"`{Path(str(res['student'])).name}`.")
    lines = [head]
    if res.get("note"):
        lines += ["", f"*{res['note']}*"]
    st, te = res.get("student_throughput", {}), res.get("teacher", {})
    lines += [""]
    if _missing(st):
        lines.append(f"Student throughput: {_missing(st)}")
    else:
        t_rows = {r["batch"]: r for r in te.get("rows", [])} if not _missing(te) else {}
        tname = (f"teacher ({te['teacher_steps']} steps, CFG {te['teacher_cfg']:g})" if not _missing(te) else "teacher")
        nfe = f" (NFE ratio {te['nfe_ratio']:g})" if not _missing(te) else ""
        lines += [f"| batch | {' | '.join(n + ' img/s' for _, n in ENGINES)} | ORT / eager | {tname} img/s | "
                  f"fastest student / teacher | speedup / NFE ratio{nfe} |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in st["rows"]:
            t = t_rows.get(r["batch"], {})
            lines.append(f"| {r['batch']} | " + " | ".join(_f(r.get(k, {}).get("images_per_s")) for k, _ in ENGINES)
                         + f" | {r['onnx_vs_eager']:.2f}x | {_f(t.get('teacher', {}).get('images_per_s'), 2)} | "
                         f"{_f(t.get('speedup'))}x | {_f(t.get('speedup_over_nfe_ratio'), 2)} |")
        if _missing(te):
            lines.append(f"\nTeacher: {_missing(te)}")
    lines += ["", "| measurement | result |", "|---|---|"]
    for name, text in _other_rows(res):
        lines.append(f"| {name} | {text} |")
    return "\n".join(lines)


def _other_rows(res: dict):
    st = res.get("student_throughput", {})
    if not _missing(st):
        r1 = st["rows"][0]
        stages = " · ".join(f"{n} {r1[k]['stages_ms']['text_encoding']:.1f} / {r1[k]['stages_ms']['denoising']:.1f} / "
                            f"{r1[k]['stages_ms']['decoding']:.1f}" for k, n in ENGINES if "stages_ms" in r1.get(k, {}))
        yield f"stages at batch {r1['batch']}, ms (text / denoise / decode)", stages
        if st.get("bf16_batch1"):
            b = st["bf16_batch1"]
            yield "bf16 vs fp32, eager PyTorch, batch 1", f"{_f(b['images_per_s'])} img/s = {_f(b.get('vs_fp32'), 2)}x fp32"
        what = "export + load" if st.get("onnx_exported") else "load of the cached export"
        yield "ONNX engine setup", f"{st['onnx_setup_seconds']:.1f} s ({what}; providers {', '.join(st['onnx_providers'])})"
    te = res.get("teacher", {})
    if not _missing(te):
        d = [f"batch {r['batch']}: {r['denoising_speedup_eager']:.0f}x" for r in te["rows"] if "denoising_speedup_eager" in r]
        if d:
            yield f"denoising only, eager student vs teacher (NFE ratio {te['nfe_ratio']:g})", ", ".join(d)
        t = [f"batch {r['batch']}: {r['speedup_tiny']:.1f}x = {r['speedup_tiny_over_nfe_ratio']:.2f} of the NFE ratio"
             for r in te["rows"] if "speedup_tiny" in r]
        if t:
            yield "ONNX + tiny decoder student vs teacher + tiny decoder (same decoder both sides)", ", ".join(t)
        c = [f"batch {r['batch']}: {r['speedup_over_call_ratio']:.2f}" for r in te["rows"] if "speedup_over_call_ratio" in r]
        if c:
            yield (f"end-to-end speedup / ratio of UNet calls ({te['unet_call_ratio']:g}: CFG runs both prompts in one "
                   "call)", ", ".join(c))
    nasa = res.get("nasa", {})
    yield "NASA on vs off, batch 8 (time ratio)", _missing(nasa) or " · ".join(
        f"{'PyTorch' if k == 'torch' else 'ONNX'}: NASA {v['nasa_ratio']:.2f}x, CFG baseline {v['cfg_ratio']:.2f}x"
        for k, v in nasa.items() if isinstance(v, dict))
    reno = res.get("reno", {})
    engines = (("torch_cached", "cached PyTorch"), ("onnx", "ONNX"))
    yield "ReNO, seconds per iteration", _missing(reno) or (
        f"{reno['seconds_per_iteration']:.3f} s ({reno['iterations']} iterations, rewards {_weights(reno['rewards'])})"
        + "".join(f" = {reno[f'ratio_vs_{k}']:.0f}x one {n} generation" for k, n in engines if f"ratio_vs_{k}" in reno))
    if "seconds" in reno:  # results from before the whole budget was timed lack it
        yield "ReNO, the whole default budget", (
            f"{reno['seconds']:.2f} s for {reno['iterations']} iterations"
            + "".join(f" = {reno[f'budget_ratio_vs_{k}']:.0f}x one {n} generation" for k, n in engines
                      if f"budget_ratio_vs_{k}" in reno))
    ctl = res.get("control", {})
    yield "ControlNet/NCT overhead (time ratio, PyTorch)", _missing(ctl) or (
        f"batch 1: {ctl['batch1']['overhead']:.2f}x, batch 4: {ctl['batch4']['overhead']:.2f}x ({ctl['model']})")
    cold = res.get("cold_start", {})
    yield "cold start, process start to first image", _missing(cold) or " · ".join(
        f"{'PyTorch' if k == 'torch' else 'ONNX'}: " + (v["error"] if "error" in v else
                                                      f"{v['seconds']:.1f} s (first image {v['first_image_seconds'] * 1000:.0f} ms)")
        for k, v in cold.items() if isinstance(v, dict))
    fl = res.get("flops", {})
    if _missing(fl):
        yield "FLOPs per image", _missing(fl)
    else:
        g = fl["gflop_per_image"]
        yield "student FLOPs per image", (f"{g['total']:.2f} GFLOP (text {g['text_encoder']:.3f}, UNet {g['unet']:.2f}, "
                                          f"VAE decoder {g['vae_decoder']:.2f})")
        peak = fl["matmul_peak"]
        frac = ", ".join(f"batch {r['batch']}: {r['onnx_fraction_of_peak']:.2f} (eager {r['eager_fraction_of_peak']:.2f})"
                         for r in fl["rows"])
        yield (f"fraction of measured fp32 matmul peak ({peak['gflops_per_s']:.0f} GFLOP/s), ONNX",
               frac or "-")


def update_readme(res: dict, readme: Path) -> None:
    """Replace the text between the bench markers in README.md with this result's tables."""
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme} has no {START} ... {END} section to write the table into")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    readme.write_text(f"{before}{START}\n{render(res)}\n{END}{after}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description="print a bench result as markdown")
    ap.add_argument("results", help="a bench/results/<machine>.json")
    ap.add_argument("--readme", action="store_true", help="also write it into README.md")
    args = ap.parse_args(argv)
    try:
        res = json.loads(Path(args.results).read_text())
        print(render(res))
        if args.readme:
            update_readme(res, Path(__file__).resolve().parent.parent / "README.md")
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
