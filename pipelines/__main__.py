"""Command line: python -m pipelines {generate,refine,evaluate,fd,prefetch,models,export-onnx} ...

    python -m pipelines generate --model shapes-64 --prompt "a red circle" --seed 1 --out outputs/a.png --json
    python -m pipelines refine --model shapes-64 --prompt "two red circles" --iterations 50 --out outputs/r.png --json
    python -m pipelines evaluate --model shapes-64-teacher --prompts assets/prompts/shapeeval.txt --json eval.json
    python -m pipelines evaluate --model shapes-64 --prompts assets/prompts/shapeeval.txt --reno --json reno.json
    python -m pipelines fd runs/eval-student runs/eval-teacher   # two evaluate --save-images folders
    python -m pipelines prefetch stabilityai/sd-turbo
    python -m pipelines export-onnx --model shapes-64 --out DIR   # ONNX Runtime graphs, verified

Errors are one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .registry import DEFAULT_MODEL, MODELS


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number") from None


def _int_list(text: str) -> list[int]:
    values = [_int(part) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected whole numbers separated by commas, e.g. 25,50")
    return values


def cmd_generate(args) -> int:
    from .generation import generate, image_settings, save_png

    noise = None
    if args.noise:
        from .loading import load_noise

        noise = load_noise(args.noise)[0]
    res = generate(args.model, args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, seed=args.seed,
                   batch_size=args.batch_size, height=args.height, width=args.width, guidance_scale=args.guidance_scale,
                   negative_mode=args.negative_mode, nasa_alpha=args.nasa_alpha, noise=noise,
                   control_image=args.control_image, preprocessor=args.preprocessor, control_model=args.control_model,
                   control_scale=args.control_scale, engine=args.engine, torch_options=_torch_options(args))
    out = Path(args.out or f"outputs/{time.strftime('%Y%m%d-%H%M%S')}-{args.seed}.png")
    paths = []
    for i, img in enumerate(res.images):
        path = out if len(res.images) == 1 else out.with_name(f"{out.stem}_{i}{out.suffix or '.png'}")
        paths.append(str(save_png(img, path, image_settings(res.settings, i))))
    if args.json:
        print(json.dumps({"settings": res.settings, "timings": res.timings, "files": paths, **res.info,
                          **({"notice": res.notice} if res.notice else {})}, indent=2))
    else:
        t = res.timings
        print(f"wrote {', '.join(paths)}  ({res.info.get('engine', 'torch')}: text {t['text_encoding'] * 1000:.0f} ms, "
              f"denoise {t['denoising'] * 1000:.0f} ms, decode {t['decoding'] * 1000:.0f} ms)")
    if res.notice:
        print(f"notice: {res.notice}", file=sys.stderr)
    return 0


def _torch_options(args):
    from .speed import TorchOptions

    return TorchOptions(channels_last=args.channels_last, dtype=args.dtype, compile=args.compile,
                        tiny_decoder=True if args.tiny_decoder == "auto" else (args.tiny_decoder or False)).check()


def cmd_export_onnx(args) -> int:
    from . import onnx_engine
    from .registry import get

    spec = get(args.model)
    onnx_engine.check_exportable(spec)
    out = args.out or onnx_engine.cache_folder(spec)
    manifest = onnx_engine.export(args.model, out, device=args.device, nasa_graph=not args.no_nasa,
                                  progress=None if args.json else lambda m: print(m, file=sys.stderr, flush=True))
    report = {"out": str(out), "model": manifest["model"], "seconds": manifest["seconds"], "dtype": manifest["dtype"],
              "graphs": {k: {"bytes": v["bytes"], "max_abs_diff": manifest["verification"][k]["max_abs_diff"],
                             "tolerance": manifest["verification"][k]["tolerance"]} for k, v in manifest["graphs"].items()},
              "not_exported": manifest["not_exported"]}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, g in report["graphs"].items():
            print(f"{name:14s} {g['bytes'] / 2**20:7.1f} MB  max abs diff vs PyTorch {g['max_abs_diff']:.2e} "
                  f"(tolerance {g['tolerance']:.0e})")
        print(f"wrote {out} in {manifest['seconds']:.1f} s (report: {Path(out) / 'export-report.json'})")
    return 0


def _reno_config(args):
    from .reno import RenoConfig

    return RenoConfig(iterations=args.iterations, lr=args.lr, seconds=args.seconds).check()


def cmd_refine(args) -> int:
    from . import loading, reno
    from .generation import routed, save_png
    from .registry import get

    model_id = routed(args.model, args.prompt)[0]  # a multi-student model: the student its router picks
    spec = get(model_id)
    pipe = loading.load_pipeline(model_id)
    res = reno.refine(pipe, spec, args.prompt, args.rewards, seed=args.seed, steps=args.steps, config=_reno_config(args),
                      callback=None if args.json else lambda s: print(
                          f"\riteration {s.iteration + 1}: loss {s.loss:.4f}{' (best)' if s.best else ''}",
                          end="", file=sys.stderr, flush=True))
    if not args.json:
        print(file=sys.stderr)
    out = Path(args.out or f"outputs/{time.strftime('%Y%m%d-%H%M%S')}-{args.seed}-reno.png")
    image = save_png(res.best, out, res.settings)
    start = save_png(res.initial, out.with_name(f"{out.stem}-start{out.suffix or '.png'}"), {**res.settings, "reno": None})
    noise = reno.save_noise(res.best_noise, res.settings, out.with_suffix(".noise.safetensors"))
    first, best = res.history[0], res.history[res.best_iteration]
    report = {"settings": res.settings, "files": {"image": str(image), "start": str(start), "noise": str(noise)},
              "best_iteration": res.best_iteration, "iterations": len(res.history), "stopped": res.stopped,
              "seconds": res.seconds, "start_rewards": first["rewards"], "best_rewards": best["rewards"],
              "history": res.history}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"wrote {image} (start: {start}, noise: {noise}); best iteration {res.best_iteration} of "
              f"{len(res.history)} ({res.stopped}), {res.seconds:.1f} s; rewards {first['rewards']} -> {best['rewards']}")
    return 0


def cmd_fd(args) -> int:
    from .evaluate import fd_between

    print(json.dumps(fd_between(args.a, args.b, args.clip), indent=2))
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate, read_prompts

    if args.budgets and not args.reno:
        raise ValueError("--budgets judges ReNO's best iterate within each budget; add --reno")
    prompts = read_prompts(args.prompts)
    summary = evaluate(args.model, prompts, args.images_per_prompt, args.steps, args.seed, args.save_images,
                       progress=lambda i, n: print(f"\r{i}/{n} prompts", end="", file=sys.stderr, flush=True),
                       reno=_reno_config(args) if args.reno else None, rewards=args.rewards,
                       control=args.control, control_model=args.control_model, control_scale=args.control_scale,
                       budgets=args.budgets)
    print(file=sys.stderr)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


def cmd_prefetch(args) -> int:
    from .loading import prefetch

    for path in prefetch(args.model):
        print(path)
    return 0


def cmd_models(args) -> int:
    from .registry import install_hint, installed

    for spec in MODELS.values():
        state = "installed" if installed(spec) else f"missing ({install_hint(spec)})"
        print(f"{spec.id:60s} {spec.family:5s} {spec.role:8s} {state}")
    return 0


def _control_args(p, with_preprocessor: bool = True) -> None:
    if with_preprocessor:
        p.add_argument("--preprocessor", default="canny", help="control map: canny, sketch or none")
    p.add_argument("--control-model", default="auto",
                   help="auto (a student's NCT adapter, else its teacher's ControlNet), nct, controlnet, or a folder")
    p.add_argument("--control-scale", type=float, default=1.0, help="conditioning scale, 0 to 2")


def _reno_args(p) -> None:
    from .reno import RenoConfig

    d = RenoConfig()
    p.add_argument("--iterations", type=_int, default=d.iterations, help=f"evaluations incl. the start (default {d.iterations})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"SGD learning rate (default {d.lr})")
    p.add_argument("--seconds", type=float, default=d.seconds, help="wall-time budget per image (0: none)")
    p.add_argument("--rewards", default=None, help="weights, e.g. clip=0.01,pickscore=0.05 (default: the model's)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipelines", description="OneStep Studio inference CLI")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images; PNGs carry their settings")
    g.add_argument("--model", default=DEFAULT_MODEL, help="registry id or a local diffusers folder")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--negative-mode", default="nasa", metavar="nasa|cfg",
                   help="how a student steers away from the negative prompt: nasa (in attention, one pass; default) "
                        "or cfg (two passes, x0 extrapolated by --guidance-scale); teachers always use cfg")
    g.add_argument("--nasa-alpha", type=float, default=None, help="NASA strength, 0 to 16 (default: the model's)")
    g.add_argument("--seed", type=_int, default=0)
    g.add_argument("--steps", type=_int, default=None, help="default: the model's")
    g.add_argument("--height", type=_int, default=None)
    g.add_argument("--width", type=_int, default=None)
    g.add_argument("--batch-size", type=_int, default=1)
    g.add_argument("--guidance-scale", type=float, default=None)
    g.add_argument("--out", default=None, help="PNG path (batch: _<i> is added)")
    g.add_argument("--json", action="store_true", help="print settings and timings as JSON")
    g.add_argument("--noise", default=None, help="initial noise from a .safetensors file exported by refine")
    _control_args(g)
    g.add_argument("--control-image", default=None, help="an image whose layout the output follows")
    g.add_argument("--engine", default=None, choices=["auto", "torch", "onnx"],
                   help="students: auto (ONNX Runtime when exported, else PyTorch; default), torch, onnx")
    g.add_argument("--channels-last", action="store_true", help="PyTorch: NHWC memory layout")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="PyTorch: weights dtype (auto: fp16 on CUDA, fp32 on CPU)")
    g.add_argument("--compile", action="store_true", help="PyTorch: torch.compile the UNet and the VAE decode")
    g.add_argument("--tiny-decoder", nargs="?", const="auto", default=None, metavar="FOLDER",
                   help="PyTorch: decode with AutoencoderTiny (shapes-64's own, TAESD/TAESDXL from the hub "
                        "cache, or a folder)")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("evaluate", help="ShapeEval over a prompt file")
    e.add_argument("--model", required=True, help="registry id, local folder, or 'renderer'")
    e.add_argument("--prompts", required=True)
    e.add_argument("--images-per-prompt", type=_int, default=4)
    e.add_argument("--steps", type=_int, default=None)
    e.add_argument("--seed", type=_int, default=0)
    e.add_argument("--save-images", default=None)
    e.add_argument("--json", required=True, help="where the summary JSON goes")
    e.add_argument("--reno", action="store_true", help="refine every image with ReNO; reports plain and refined")
    e.add_argument("--control", default=None, metavar="PREPROCESSOR",
                   help="render a control image per prompt and report control consistency (e.g. canny)")
    _control_args(e, with_preprocessor=False)
    _reno_args(e)
    e.add_argument("--budgets", type=_int_list, default=None, metavar="N,N,...",
                   help="with --reno: also judge the best iterate within each of these iteration counts (e.g. 25,50)")
    e.set_defaults(func=cmd_evaluate)

    f = sub.add_parser("fd", help="Fréchet distance (tiny CLIP image features) between two evaluate folders")
    f.add_argument("a", help="a folder written by evaluate --save-images")
    f.add_argument("b", help="another, made on the same prompts and seeds (e.g. the teacher's)")
    f.add_argument("--clip", default=None, help="CLIPModel folder for the features (default: shapes-64's)")
    f.set_defaults(func=cmd_fd)

    r = sub.add_parser("refine", help="ReNO: optimize one image's initial noise against rewards")
    r.add_argument("--model", default=DEFAULT_MODEL, help="a one-step (or few-step) student")
    r.add_argument("--prompt", required=True)
    r.add_argument("--seed", type=_int, default=0, help="the start noise (the same image Generate makes)")
    r.add_argument("--steps", type=_int, default=None, help="student steps (default: the model's)")
    r.add_argument("--out", default=None, help="PNG of the best image; beside it -start.png and .noise.safetensors")
    r.add_argument("--json", action="store_true", help="print settings, rewards per iteration and files as JSON")
    _reno_args(r)
    r.set_defaults(func=cmd_refine)

    p = sub.add_parser("prefetch", help="download a hub model's safetensors (needs a network)")
    p.add_argument("model")
    p.set_defaults(func=cmd_prefetch)

    m = sub.add_parser("models", help="list the registry and what is installed")
    m.set_defaults(func=cmd_models)

    x = sub.add_parser("export-onnx", help="export a student to ONNX Runtime graphs, verified against PyTorch")
    x.add_argument("--model", default=DEFAULT_MODEL, help="a one- to four-step student (registry id or folder)")
    x.add_argument("--out", default=None, help="folder to write (default: the cache Generate looks in, "
                                                "~/.cache/onestep/onnx/<model>-<weights hash>)")
    x.add_argument("--device", default=None, help="trace on this device (cuda: fp16 weights; default: cuda when onnxruntime-gpu can run it, else cpu)")
    x.add_argument("--no-nasa", action="store_true", help="skip the NASA UNet graph")
    x.add_argument("--json", action="store_true", help="print the export report as JSON")
    x.set_defaults(func=cmd_export_onnx)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
