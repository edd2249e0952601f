"""Teacher probes: train variants of the shapes-64 teacher for the same wall time, side by side, and
measure what each learned -- to choose a recipe before spending a long run on it.

    python -m training.recipes.probe --out assets/models/shapes-64 --seconds 150 [--export DIR] \\
        --variant base --variant shift16:snr_shift=16 --variant warm16:snr_shift=16,init=teacher \\
        --variant attn:block_out_channels=[64,128,128],cross_attention_levels=3

A variant is NAME[:key=value,...] with TeacherConfig keys (`init=teacher` warm-starts from OUT/teacher's
UNet and text encoder). `--export DIR` saves each variant as a teacher pipeline folder DIR/NAME (the registry
serves it by path). The variants run as concurrent processes (one GPU holds them all; on a CPU give --threads) in
WORK/probe-NAME, each from its first step. Each reports its steps, final loss and two ShapeEval pass
rates on the same fixed prompts and seeds:

- `shapeeval`: samples at the teacher's default 25 steps and CFG 5;
- `restore_snr1`: real renders noised to SNR 1 (as much noise as signal) and denoised (img2img from the
  timestep where the variant's own schedule reaches SNR 1, so variants with other schedules compare
  fairly): it shows whether a model restores shapes it is half given;
- `shape_follow`: from one noise, one object of each of the six shapes asked for (a color per noise, on
  black; a noise per 16 prompts): the fraction ShapeEval judges right, i.e. whether the model reads the
  shape word (the step-30,000 teacher drew one round blob for circle, square and heart, and one spiky
  one for triangle, star and cross).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from training.config import TeacherConfig, field_names, parse_value
from training.data import cache_dir

DEFAULTS = dict(batch_size=128, eval_images=0, save_every=10 ** 9, steps=10 ** 9, warmup=200, log_every=100)


def parse_variant(text: str) -> tuple[str, dict]:
    """'shift16:snr_shift=16,init=teacher' -> ('shift16', {'snr_shift': 16, 'init': 'teacher'})."""
    name, _, rest = text.partition(":")
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"variant name {name!r}: use letters, digits, '-' and '_'")
    allowed = set(field_names(TeacherConfig)) | {"init"}
    changes = {}
    for pair in filter(None, re.split(r",(?=\w+=)", rest)):  # a list value keeps its commas
        key, sep, raw = pair.partition("=")
        if not sep or key not in allowed:
            raise ValueError(f"bad variant setting {pair!r}: expected key=value with key one of {sorted(allowed)}")
        value = parse_value(raw)
        changes[key] = tuple(value) if isinstance(value, list) else value
    if changes.get("init", "teacher") != "teacher":
        raise ValueError(f"init={changes['init']!r}: the only warm start offered is init=teacher")
    return name, changes


def run_one(name: str, changes: dict, out: Path, work: Path, seconds: float, threads: int, prompts: int,
            export: Path | None = None) -> dict:
    import numpy as np
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    from shapes import judge, render, sample_spec, to_prompt
    from training.methods import teacher

    changes = dict(changes)
    if changes.pop("init", None):
        changes.update(init_unet=str(out / "teacher" / "unet"),
                       init_text_encoder=str(out / "teacher" / "text_encoder"))
    cfg = TeacherConfig(clip_dir=str(out / "clip"), vae_dir=str(out / "vae"), run_dir=str(work / f"probe-{name}"),
                        max_seconds=seconds, threads=threads, **{**DEFAULTS, **changes})
    res = teacher.train(cfg)
    if export is not None:
        teacher.export(res["unet"], res["vae"], res["text_encoder"], res["tokenizer"], export / name, cfg.snr_shift)
    pipe = teacher.make_pipeline(res["unet"].eval(), res["vae"], res["text_encoder"], res["tokenizer"], cfg.snr_shift)
    rng = np.random.default_rng(123)
    specs = [sample_spec(rng) for _ in range(prompts)]
    texts = [to_prompt(s) for s in specs]

    def passed(images) -> float:
        images = (np.asarray(images) * 255).round().astype(np.uint8)
        return float(np.mean([judge(s, im)[0] for s, im in zip(specs, images)]))

    common = dict(num_inference_steps=25, guidance_scale=5.0, guidance_rescale=0.7, output_type="np")
    with torch.no_grad():
        samples = pipe(texts, height=64, width=64, generator=torch.Generator().manual_seed(0), **common).images
        i2i = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
        real = [Image.fromarray(render(s, k)) for k, s in enumerate(specs)]
        ac = pipe.scheduler.alphas_cumprod
        t_snr1 = int(torch.argmin((ac / (1 - ac).clamp_min(1e-12) - 1).abs()))
        restored = i2i(texts, image=real, strength=(t_snr1 + 1) / len(ac), generator=torch.Generator().manual_seed(0),
                       **common).images
    return {"variant": name, "settings": changes, "steps": res["step"] - cfg.init_step, "seconds": seconds,
            "loss": round(float(res.get("loss", float("nan"))), 5), "shapeeval": passed(samples),
            "restore_snr1": passed(restored), "restore_strength": round((t_snr1 + 1) / len(ac), 3),
            "shape_follow": shape_following(pipe, max(1, prompts // 16), common)}


def shape_following(pipe, noises: int, common: dict) -> float:
    """`shape_follow` of the module docstring."""
    import numpy as np
    import torch

    from shapes import COLORS, SHAPES, judge

    colors, unet, right = [c for c in COLORS if c != "black"], pipe.unet.config, []
    for k in range(noises):
        texts = [f"a {colors[k % len(colors)]} {shape} on a black background" for shape in SHAPES]
        noise = torch.randn((1, unet.in_channels, unet.sample_size, unet.sample_size),
                            generator=torch.Generator().manual_seed(k))
        with torch.no_grad():
            images = pipe(texts, height=64, width=64, latents=noise.repeat(len(texts), 1, 1, 1), **common).images
        images = (np.asarray(images) * 255).round().astype(np.uint8)
        right += [judge(t, im)[0] for t, im in zip(texts, images)]
    return float(np.mean(right))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the shapes-64 folder (its clip/, vae/ and teacher/ are read)")
    ap.add_argument("--work", default=str(cache_dir() / "shapes"), help="probe run folders go here")
    ap.add_argument("--variant", action="append", default=[], help="NAME[:key=value,...]; repeat for each")
    ap.add_argument("--seconds", type=float, default=150.0, help="training wall time of every variant")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per variant (0: torch's default)")
    ap.add_argument("--prompts", type=int, default=128, help="prompts (one image each) for both measures")
    ap.add_argument("--export", default=None, help="save each variant as a teacher pipeline folder EXPORT/NAME")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run this variant here
    args = ap.parse_args(argv)
    out, work = Path(args.out), Path(args.work).expanduser()
    try:
        variants = [parse_variant(v) for v in args.variant or ["base"]]
    except ValueError as e:
        ap.error(str(e))
    if len({n for n, _ in variants}) != len(variants):
        ap.error("variant names must differ")
    if args.one is not None:
        name, changes = next(v for v in variants if v[0] == args.one)
        export = Path(args.export) if args.export else None
        print(json.dumps(run_one(name, changes, out, work, args.seconds, args.threads, args.prompts, export)),
              flush=True)
        return 0
    base = [sys.executable, "-m", "training.recipes.probe", "--out", str(out), "--work", str(work),
            "--seconds", str(args.seconds), "--threads", str(args.threads), "--prompts", str(args.prompts),
            *(["--export", args.export] if args.export else []),
            *[a for v in args.variant for a in ("--variant", v)]]
    procs = [subprocess.Popen([*base, "--one", name], stdout=subprocess.PIPE, text=True) for name, _ in variants]
    results = []
    for (name, _), proc in zip(variants, procs):
        lines = [line for line in proc.communicate()[0].splitlines() if line.startswith('{"variant"')]
        results.append(json.loads(lines[-1]) if proc.returncode == 0 and lines else
                       {"variant": name, "error": f"exit code {proc.returncode}"})
    work.mkdir(parents=True, exist_ok=True)
    (work / "probe.json").write_text(json.dumps(results, indent=2))
    for r in results:
        print(json.dumps(r))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
