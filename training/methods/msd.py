"""MSD: Multi-Student Diffusion Distillation (Song, Lorraine, Nie, Kreis, Lucas; ICML 2025,
arXiv 2410.23274). K one-step students, each distilled with DMD2 on its own part of the prompt
space; a router picks the one student for a prompt at inference (one network evaluation).

Partition (state of our choice, which the paper leaves open for text): on the shapes world by
GenEval category, {single object, colors}, {two objects, color attribution}, {counting, position};
for free text by the sign pattern of the token-pooled text embedding on its top one or two
principal directions (2 or 4 students, near-equal halves/quadrants).

Smaller students (channels x `width_mult`) are first warmed up by teacher score matching,

    L_TSM = E_{t, x_t} || u_student(x_t, t, c) - u_teacher(x_t, t, c) ||^2,

on noised latents (renders of the shapes world; the teacher's own one-step estimates otherwise),
then distilled with DMD2 like full-size ones.

Or (`student_init`, our variant for a small storage budget) every student starts from one trained
one-step student and trains a LoRA of its UNet with DMD2 on its own share of the prompts; each is
stored as its adapter alone and borrows the shared UNet. A fresh fake score (the teacher) is first
fitted to the starting student's samples for `fake_warmup` steps, so its first gradients are sound.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from pipelines import msd, onestep

from ..common import train_loop
from ..config import Dmd2Config
from . import dmd2


def smaller_unet(teacher: UNet2DConditionModel, width_mult: float) -> UNet2DConditionModel:
    """The teacher's architecture with every block's channels scaled (kept a multiple of its norm groups)."""
    cfg = dict(teacher.config)
    groups = cfg.get("norm_num_groups") or 32
    cfg["block_out_channels"] = [max(groups, int(round(c * width_mult / groups)) * groups)
                                 for c in cfg["block_out_channels"]]
    return UNet2DConditionModel.from_config(cfg)


def make_router(cfg, d: dmd2.Distiller) -> dict:
    if cfg.router == "category":
        return {"type": "category", "groups": [list(g) for g in cfg.groups], "default": 0}
    if cfg.router == "embedding":
        source = dmd2.PromptSource(cfg.prompts, cfg.seed)
        return msd.fit_embedding_router(d.pipe, source.sample(512)[0], cfg.num_students)
    raise ValueError(f"unknown router {cfg.router!r}; allowed: category, embedding")


def tsm_folder(cfg, index: int) -> Path:
    """Where student `index`'s teacher-score-matching warm-up keeps its UNet."""
    return Path(cfg.run_dir) / f"tsm-{index}" / "unet"


def student_config(cfg, index: int) -> Dmd2Config:
    """Student `index`'s DMD2 run: its own run folder, its share of the prompts, its warm start (a smaller
    student's TSM warm-up, or the UNet of `student_init`); the GAN pool's latents are encoded once for all."""
    if cfg.width_mult < 1:
        init = str(tsm_folder(cfg, index))
    else:
        init = str(Path(cfg.student_init) / "unet") if cfg.student_init else ""
    return dataclasses.replace(_as_dmd2(cfg), run_dir=str(Path(cfg.run_dir) / f"student-{index}"),
                               route=str(Path(cfg.run_dir) / "model"), route_index=index, generator_init=init,
                               latents_cache=str(Path(cfg.run_dir) / "latents.safetensors"))


def tsm(cfg, d: dmd2.Distiller, index: int, router_dir: Path) -> Path:
    """Teacher score matching warm-up of a smaller student; returns its UNet folder."""
    out = tsm_folder(cfg, index)
    run_dir = out.parent
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(cfg.seed + index)
    student = smaller_unet(d.teacher, cfg.width_mult)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.tsm_lr)
    source = dmd2.PromptSource(cfg.prompts, cfg.seed + index, msd.read(router_dir)["router"], index, d.pipe)
    gen = torch.Generator().manual_seed(cfg.seed + index)
    shape = onestep.latent_shape(d.pipe, cfg.batch_size, d.height, d.width)
    rng = np.random.default_rng(cfg.seed + index)

    def x0_batch(texts, specs, cond):
        if specs:  # real data of the shapes world
            from shapes import render

            from ..common import to_tensor

            imgs = to_tensor(np.stack([render(s, int(rng.integers(2**31))) for s in specs]))
            with torch.no_grad():
                return d.pipe.vae.encode(imgs).latent_dist.sample(gen) * d.pipe.vae.config.scaling_factor
        with torch.no_grad():  # no data: the teacher's own one-step estimates from noise
            t = torch.full((cfg.batch_size,), d.num_t - 1, dtype=torch.long)
            return d.x0(d.teacher, torch.randn(shape, generator=gen), t, cond)

    def step(_):
        texts, specs = source.sample(cfg.batch_size)
        with torch.no_grad():
            cond = onestep.encode_prompt(d.pipe, texts, d.height, d.width)
        x0 = x0_batch(texts, specs, cond)
        t = torch.randint(0, d.num_t, (cfg.batch_size,), generator=gen)
        x_t = d.add_noise(x0, torch.randn(x0.shape, generator=gen), t)
        with torch.no_grad():
            target = d.raw(d.teacher, x_t, t, cond, adapters=False if d.fake is d.teacher else None)
        loss = F.mse_loss(d.raw(student, x_t, t, cond), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss_tsm": loss.item()}

    sub = dataclasses.replace(_as_dmd2(cfg), run_dir=str(run_dir), steps=cfg.tsm_steps, lr=cfg.tsm_lr,
                              min_lr_ratio=1.0)
    res = train_loop(sub, {"student": student}, {"student": opt}, step)
    if not res["finished"]:
        raise RuntimeError("teacher score matching stopped early; run again to resume")
    student.save_pretrained(out, safe_serialization=True)
    return out


def _as_dmd2(cfg) -> Dmd2Config:
    names = {f.name for f in dataclasses.fields(Dmd2Config)}
    return Dmd2Config(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in names} | {"method": "dmd2"})


def train(cfg) -> dict:
    """Train every student (resumable one by one) and assemble the MSD folder in run_dir/model."""
    if cfg.student_init and cfg.width_mult < 1:
        raise ValueError("student_init starts every student from a trained student; it cannot be combined with "
                         "width_mult < 1 (smaller students start from teacher score matching)")
    model_dir = Path(cfg.run_dir) / "model"
    probe = dmd2.Distiller(_as_dmd2(cfg), "cpu")
    router = make_router(cfg, probe)
    k = len(router["groups"]) if router["type"] == "category" else cfg.num_students
    students = [f"student-{i}" for i in range(k)]
    model_dir.mkdir(parents=True, exist_ok=True)
    meta = {"router": router, "students": students, "teacher": dmd2.teacher_name(cfg.teacher),
            "steps": len(cfg.timesteps), "timesteps": list(cfg.timesteps), "resolution": probe.height, "method": "msd"}
    (model_dir / msd.MSD_FILE).write_text(json.dumps(meta, indent=2))
    result: dict = {"finished": True, "students": k}
    lora_base = cfg.student_init if cfg.student_init and cfg.generator_lora_rank else None  # adapters alone
    for i, name in enumerate(students):
        if (model_dir / name / "model_index.json").is_file():
            continue
        if cfg.width_mult < 1:
            tsm(cfg, probe, i, model_dir)
        sub = student_config(cfg, i)
        res = dmd2.train(sub)
        result.update({f"{name}_{key}": v for key, v in res.items() if isinstance(v, float)})
        if not res["finished"]:
            return {**result, "finished": False, "step": res["step"]}
        dmd2.export(res, sub, model_dir / name, lora_base)
    result["step"] = cfg.steps
    result["model_dir"] = str(model_dir)
    return result


def export(result: dict, out_dir: str | Path) -> Path:
    """Copy the assembled MSD folder (msd.json + students) to out_dir; each copied student borrows the
    teacher's shared components from its new place."""
    shutil.copytree(result["model_dir"], out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("student-*"))
    for student in Path(result["model_dir"]).glob("student-*"):
        dmd2.copy_folder(student, Path(out_dir) / student.name)
    return Path(out_dir)
