"""Build the whole shapes-64 model family from nothing, stage by stage, resumably.

    python -m training.recipes.shapes --out assets/models/shapes-64 [--work ~/.cache/onestep/shapes]
        [--stages tokenizer,clip,vae,teacher,report] [--max-minutes M] [--threads N] [--set clip.steps=100 ...]

Each stage trains in its own run folder under --work (checkpoints outside the work tree), resumes
from its latest complete checkpoint when run again, and exports its model in the standard hub layout
under --out when it finishes:

    OUT/clip/      CLIPModel + CLIPTokenizer + CLIPImageProcessor (reward, CLIP score)
    OUT/vae/       AutoencoderKL (its decoder fine-tuned again by the vae_decoder stage)
    OUT/tiny-decoder/  AutoencoderTiny distilled from the VAE's decoder (the `--tiny-decoder` of shapes-64)
    OUT/teacher/   StableDiffusionPipeline (text encoder = the CLIP text tower)
    OUT/controlnet-canny/  ControlNetModel for the teacher (canny maps of rendered images)
    OUT/student/, OUT/student-4step/, OUT/msd/   DMD2 one- and four-step students, multi-student model
    OUT/nct-canny/ NCT adapter (ControlNet architecture) for the frozen one-step student

The `report` stage measures the exported family (CLIP retrieval, VAE PSNR and ShapeEval of its
reconstructions, teacher ShapeEval on both prompt suites) into OUT/report.json.
OUT/recipe.json records, per stage, the accumulated wall time on this machine, the step reached and
the stage's measured quality. `--max-minutes` stops a stage with a checkpoint after that long, so a
long stage can run across sessions; `--export-partial` exports whatever a stopped stage has. When a
stage's run folder is gone (a fresh machine), the stage warm-starts from its committed partial
export at the step recorded in recipe.json (a fresh optimizer, its LR warmed up again). The teacher,
the students and the CLIP image tower train in phases (TEACHER_PHASES, ...), each resuming the run
the phase before left; phases already passed are skipped.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


from training.config import ClipConfig, TeacherConfig, VaeConfig, with_overrides
from training.data import cache_dir, make_pool

PROMPTS = Path(__file__).resolve().parents[2] / "assets" / "prompts"
STAGES = ("tokenizer", "clip", "vae", "vae_decoder", "tiny_decoder", "teacher", "clip_vision", "controlnet",
          "student", "nct", "student_4step", "msd", "report")
# DMD2 settings shared by the embedded students (CPU-sized: small batch, a few thousand steps)
STUDENT = dict(prompts="shapes", height=64, width=64, real_guidance=5.0, ratio=5, gan_weight=1e-3, batch_size=16,
               lr=5e-5, guidance_lr=5e-5, steps=3000, save_every=250, eval_images=48)
# The one-step student's run in phases, each resuming the one before: the shared settings to step 4,000 at a
# constant LR (no gain after 3,000), its LR decayed (cosine, to a tenth) over 1,000 more, then 600 steps with ten
# times the GAN weight (1e-2), the LR again decaying from its full value to a tenth (ShapeEval 0.086 -> 0.103)
STUDENT_PHASES = {"student": [dict(steps=4000), dict(steps=5000, decay_start=4000, min_lr_ratio=0.1),
                              dict(steps=5600, decay_start=5000, min_lr_ratio=0.1, gan_weight=1e-2)]}
# The CLIP image tower (4-px patches, text tower frozen): 3,000 steps of 256, then on at batch 512 over a pool of
# 40,000 with its LR decaying from 3e-4 (retrieval 0.48 -> 0.61 exact, 0.58 -> 0.77 satisfying). Phases resume
# one run, as the students' do. The shipped tower ran the second phase as two time-bounded runs warm-started from
# its export on a lent H100, 3,750 steps in all (recipe.json), so a run here continues it from step 6,750.
CLIP_VISION_PHASES = [dict(steps=3000), dict(steps=7000, batch_size=512, lr=3e-4, decay_start=3000, data_size=40000)]
# The VAE's decoder alone, fine-tuned from the exported VAE (encoder and latents unchanged, so every UNet stays
# valid): 800 steps at LR 1e-4 with shape outlines weighted 5x, for small squares' corners and triangles' tips
# (on the report's 512 fresh renders: reconstruction ShapeEval 0.969 -> 0.979, PSNR 37.4 -> 38.0 dB; on 512 others
# 0.979 -> 0.980)
VAE_DECODER = dict(decoder_only=True, edge_weight=4.0, lr=1e-4, steps=800, warmup=20, save_every=200)
# The teacher in phases, each resuming the one before. The shipped run to step 17,086 (batch 64, then 32 over a
# 40,000-step schedule on this CPU, then batch 128 on a lent H100); then on with SD's noise schedule shifted to 16x
# the SNR at every timestep (teacher.schedule), which suits 16x16 latents: warm from that teacher, the shift doubled
# ShapeEval on a lent H100 in 3,175 steps of 512 (README). The second phase is sized for 2 CPU cores.
TEACHER_PHASES = [dict(steps=17086),
                  dict(steps=30000, snr_shift=16.0, batch_size=32, lr=4e-4, warmup=200, decay_start=17086,
                       min_lr_ratio=0.1)]
# The teacher's canny ControlNet: 2,000 steps, then 1,500 more with the LR restarted and decayed again (held-out
# edge F1 with the shift-16 teacher 0.460 -> 0.499), then 1,500 more once Canny ran on the color image (the gray
# copy it ran on before lost edges between colors of one brightness: 55 of the 360 held-out layouts had no edges)
CONTROLNET_PHASES = [dict(steps=2000), dict(steps=3500, decay_start=2000), dict(steps=5000, decay_start=3500)]
# The NCT adapter: 6,000 steps (the LR decaying to a tenth), then 1,500 more with the LR restarted once Canny ran on
# the color image (see CONTROLNET_PHASES), then 1,100 more with the boundary loss allowed up to 0.03 instead of 0.01
# (a stronger adapter: held-out edge F1 0.445 -> 0.522, each with its scale calibrated)
NCT_PHASES = [dict(steps=6000), dict(steps=7500, decay_start=6000),
              dict(steps=8600, decay_start=7500, boundary_target=0.03)]


def _record(out: Path, stage: str, seconds: float, info: dict) -> None:
    path = out / "recipe.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    prev = data.get(stage, {})
    data[stage] = {**prev, **info, "wall_seconds": round(prev.get("wall_seconds", 0) + seconds, 1)}
    path.write_text(json.dumps(data, indent=2))


def _device_name() -> str:
    """What the stage ran on (recipe.json keeps it beside the wall time)."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _warm_start(out: Path, work: Path, stage: str, key: str, folder: str = "") -> dict:
    """With no run checkpoint on this machine, a stage continues from its committed (partial) export
    (`key` = that folder: the stage's UNet unless `folder` names another) at the step recipe.json recorded."""
    from training import checkpoint

    path = out / (folder or f"{stage.replace('_', '-')}/unet")
    done = json.loads((out / "recipe.json").read_text()).get(stage, {}) if (out / "recipe.json").is_file() else {}
    if checkpoint.latest(work / stage) is not None or not path.is_dir() or not done.get("step"):
        return {}
    return {key: str(path), "init_step": int(done["step"])}


def _step_reached(run_dir: Path, warm: dict) -> int:
    """The step a stage's run has reached: its latest complete checkpoint's, else its warm start's."""
    from training import checkpoint

    last = checkpoint.latest(run_dir)
    return json.loads((last / "state.json").read_text())["step"] if last else warm.get("init_step", 0)


def _run_phases(train, phases: list, run_dir: Path, warm: dict) -> dict:
    """Train the phases of one run in order, each resuming the one before; phases already passed are
    skipped, the last always runs (from its checkpoint at once, when done: its result exports)."""
    for cfg in phases:
        if cfg is not phases[-1] and cfg.steps <= _step_reached(run_dir, warm):
            continue
        res = {**train(cfg), "config": cfg}
        if not res["finished"]:
            break
    return res


def _overrides(pairs: list[str], stage: str) -> list[str]:
    return [p.split(".", 1)[1] for p in pairs if p.startswith(stage + ".")]


def _finish_clip(res: dict, out: Path, export_partial: bool) -> dict:
    """Measure retrieval on fresh layouts (never trained on) and export, when the stage finished."""
    from training.methods import clip

    if res["finished"] or export_partial:
        images, prompts = make_pool(1000, seed=20_000)
        top1 = clip.retrieval_top1(res["model"], res["tokenizer"], images, prompts)
        res.update({f"retrieval_top1_of_100_{k}": v for k, v in top1.items()})
        clip.export(res["model"], res["tokenizer"], out / "clip")
    return res


def run_stage(stage: str, out: Path, work: Path, args) -> dict:
    budget = 60 * args.max_minutes if args.max_minutes else 0.0
    common = dict(run_dir=str(work / stage), threads=args.threads, max_seconds=budget)
    if stage == "tokenizer":
        from training.methods.clip import build_tokenizer

        return {"finished": True, "vocab_size": len(build_tokenizer(work / "tokenizer"))}
    if stage == "clip":
        from training.methods import clip

        cfg = with_overrides(ClipConfig(tokenizer_dir=str(work / "tokenizer"), **common), _overrides(args.set, stage))
        res = clip.train(cfg)
        return _finish_clip(res, out, args.export_partial)
    if stage == "clip_vision":
        # a finer image tower (4px patches) trained against the frozen text tower the teacher uses
        from training.methods import clip

        warm = _warm_start(out, work, stage, "init_from", "clip")  # the committed tower, at its recorded step
        # the text tower is the teacher's text encoder, the UNets' conditioner (the teacher may have trained it)
        moved_tower = out / "teacher" / "text_encoder"
        text = {"text_from": str(moved_tower)} if moved_tower.is_dir() else {}
        phases = [with_overrides(ClipConfig(tokenizer_dir=str(out / "clip"), freeze_text=True, patch_size=4, **text,
                                            **{"init_from": str(out / "clip"), **common, **phase, **warm}),
                                 _overrides(args.set, stage)) for phase in CLIP_VISION_PHASES]
        res = _run_phases(clip.train, phases, work / stage, warm)
        return _finish_clip(res, out, args.export_partial)
    if stage in ("vae", "vae_decoder"):
        from training.methods import vae

        tune = {}
        if stage == "vae_decoder":  # from the exported VAE; on a fresh machine at its recorded step (not twice)
            tune = {**VAE_DECODER, "init_from": str(out / "vae"), **_warm_start(out, work, stage, "init_from", "vae")}
        cfg = with_overrides(VaeConfig(**{**common, **tune}), _overrides(args.set, stage))
        res = vae.train(cfg)
        if res["finished"] or args.export_partial:
            vae.export(res["model"], out / "vae")
        return res
    if stage == "tiny_decoder":  # measured beside the full VAE on the same fresh renders
        from training.config import TinyDecoderConfig
        from training.methods import tiny_decoder

        cfg = with_overrides(TinyDecoderConfig(vae_dir=str(out / "vae"), **common), _overrides(args.set, stage))
        res = tiny_decoder.train(cfg)
        if res["finished"] or args.export_partial:
            res.update(tiny_decoder.evaluate(res["model"], res["vae"], n=512, seed=30_000))
            tiny_decoder.export(res["model"], out / "tiny-decoder")
        return res
    if stage == "teacher":
        from training.methods import teacher

        warm = _warm_start(out, work, stage, "init_unet")
        if warm:  # the export's text encoder too (a phase with text_lr moved it away from the CLIP's)
            warm["init_text_encoder"] = str(out / "teacher" / "text_encoder")
        phases = [with_overrides(TeacherConfig(clip_dir=str(out / "clip"), vae_dir=str(out / "vae"), **common,
                                               **phase, **warm), _overrides(args.set, stage))
                  for phase in TEACHER_PHASES]
        res = _run_phases(teacher.train, phases, work / stage, warm)
        if res["finished"] or args.export_partial:
            teacher.export(res["unet"], res["vae"], res["text_encoder"], res["tokenizer"], out / "teacher",
                           res["snr_shift"])
        return res
    if stage in ("student", "student_4step"):
        from training.config import Dmd2Config
        from training.methods import dmd2

        timesteps = (999,) if stage == "student" else (999, 749, 499, 249)
        warm = _warm_start(out, work, stage, "generator_init")
        phases = [with_overrides(Dmd2Config(teacher=str(out / "teacher"), timesteps=timesteps,
                                            **{**STUDENT, **phase}, **common, **warm), _overrides(args.set, stage))
                  for phase in STUDENT_PHASES.get(stage, [{}])]
        res = _run_phases(dmd2.train, phases, work / stage, warm)
        if res["finished"] or args.export_partial:
            dmd2.export(res, res["config"], out / stage.replace("_", "-"))
        return res
    if stage == "controlnet":  # canny ControlNet for the teacher, from the renderer's images
        from training.config import ControlNetConfig
        from training.methods import controlnet

        phases = [with_overrides(ControlNetConfig(teacher=str(out / "teacher"), **common, **phase),
                                 _overrides(args.set, stage)) for phase in CONTROLNET_PHASES]
        res = _run_phases(controlnet.train, phases, work / stage, {})
        if res["finished"] or args.export_partial:
            controlnet.export(res["controlnet"], out / "controlnet-canny")
        return res
    if stage == "nct":  # canny NCT adapter for the frozen one-step student: prompts and Canny only
        from training.config import NctConfig
        from training.methods import nct

        warm = _warm_start(out, work, stage, "init_adapter", "nct-canny")
        phases = [with_overrides(NctConfig(student=str(out / "student"), **common, **phase, **warm),
                                 _overrides(args.set, stage)) for phase in NCT_PHASES]
        res = _run_phases(nct.train, phases, work / stage, warm)
        if res["finished"] or args.export_partial:  # its scale calibrated on the suite's layouts, not the held-out ones
            from pipelines.evaluate import read_prompts

            calib = nct.calibrate(res["adapter"], res["config"], read_prompts(PROMPTS / "shapeeval.txt"))
            nct.export(res["adapter"], res["config"], out / "nct-canny", scale=calib["scale"])
            res.update(folded_scale=calib["scale"],
                       **{f"suite_edge_f1_at_scale_{s:g}": r["edge_f1"] for s, r in calib["scales"].items()})
        return res
    if stage == "msd":
        from training.config import MsdConfig
        from training.methods import msd

        # three students by category, each a rank-8 LoRA (1 MB) on the shipped one-step student: three full-size
        # students would not fit the 80 MB assets budget, and smaller ones trained from scratch need GPU hours
        settings = {**STUDENT, "lr": 1e-4, "steps": 750}
        cfg = with_overrides(MsdConfig(teacher=str(out / "teacher"), student_init=str(out / "student"),
                                       generator_lora_rank=8, lora_alpha=8.0, fake_warmup=150, **settings, **common),
                             _overrides(args.set, stage))
        res = msd.train(cfg)
        if res["finished"]:
            msd.export(res, out / "msd")
        return {k: v for k, v in res.items() if k != "model_dir"}  # a path on this machine: not for recipe.json
    if stage == "report":
        return {"finished": True, **report(out, args.report_images)}
    raise ValueError(f"unknown stage {stage!r}; allowed: {', '.join(STAGES)}")


def report(out: Path, images_per_prompt: int = 4) -> dict:
    """Measure the exported family against the acceptance lines (written to OUT/report.json)."""
    from transformers import CLIPModel, CLIPTokenizer

    from pipelines.evaluate import evaluate, read_prompts
    from training.common import to_tensor
    from training.methods import clip, vae
    from diffusers import AutoencoderKL

    result: dict = {}
    images, prompts = make_pool(1000, seed=20_000)  # layouts never trained on
    model = CLIPModel.from_pretrained(out / "clip", use_safetensors=True)
    top1 = clip.retrieval_top1(model, CLIPTokenizer.from_pretrained(out / "clip"), images, prompts)
    result.update({f"clip_retrieval_top1_of_100_{k}": v for k, v in top1.items()})
    ae = AutoencoderKL.from_pretrained(out / "vae", use_safetensors=True).eval()
    held, held_prompts = make_pool(512, seed=30_000)
    rec = vae.reconstruct(ae, to_tensor(held))
    result["vae_psnr_db"] = float(vae.psnr(rec, to_tensor(held)).mean())
    result["vae_reconstruction_shapeeval"] = vae.reconstruction_shapeeval(rec, held_prompts)
    if (out / "teacher" / "model_index.json").is_file():
        for suite in ("shapeeval", "heldout"):
            path = PROMPTS / f"{suite}.txt"
            result[f"teacher_{suite}"] = evaluate(str(out / "teacher"), read_prompts(path), images_per_prompt)
    (out / "report.json").write_text(json.dumps(result, indent=2))
    flat = {k: v for k, v in result.items() if not isinstance(v, dict)}
    flat.update({f"{k}_overall": v["overall"] for k, v in result.items() if isinstance(v, dict)})
    return flat


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="where the finished models go (e.g. assets/models/shapes-64)")
    ap.add_argument("--work", default=str(cache_dir() / "shapes"), help="run folders with checkpoints")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma list from {','.join(STAGES)}")
    ap.add_argument("--max-minutes", type=float, default=0.0, help="stop each stage after this long (resumable)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--set", action="append", default=[], help="stage.key=value config override")
    ap.add_argument("--export-partial", action="store_true", help="export a stage even if it stopped early")
    ap.add_argument("--report-images", type=int, default=4, help="teacher images per prompt in the report stage")
    args = ap.parse_args(argv)
    out, work = Path(args.out), Path(args.work).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stages {bad}; allowed: {', '.join(STAGES)}")
    for stage in stages:
        t0 = time.time()
        res = run_stage(stage, out, work, args)
        info = {k: v for k, v in res.items() if isinstance(v, (int, float, str, bool))}
        info["device"] = _device_name()
        _record(out, stage, time.time() - t0, info)
        print(json.dumps({"stage": stage, **info}), flush=True)
        if not res.get("finished"):
            print(f"stage {stage} stopped before its last step; run the same command again to resume", flush=True)
            return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
