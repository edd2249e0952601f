"""DMD2: Improved Distribution Matching Distillation (Yin et al., NeurIPS 2024, arXiv 2405.14867).

A one- or few-step generator G is trained so its samples' distribution matches the teacher's. At a
random t, with x = G(z) and x_t = a_t x + s_t eps, the reverse-KL gradient is the difference of two
denoised estimates, the frozen teacher's ("real score", with CFG) and an online "fake score" fitted
to G's own samples:

    g = (x0_fake(x_t) - x0_real(x_t)) / mean_CHW |x - x0_real(x_t)|,   L_DM = 1/2 || x - sg(x - g) ||^2.

The fake score is trained every step with the teacher's denoising loss on detached samples; the
generator only every `ratio` steps (two time-scale rule). Optional diffusion GAN: a head on the fake
score's mid-block features tells noised real latents from noised generated ones
(D: softplus(D(fake)) + softplus(-D(real)); G: softplus(-D(G(z)))). Few-step students use backward
simulation: the training input at step k is made by running the current generator k steps from noise.

NASA-T (SNOOPI, Nguyen et al., arXiv 2412.02687, v3 section 5.3; `nasa_negatives`): on a share of the
generator updates the student samples with NASA (pipelines/nasa.py) for a negative prompt y- at
alpha ~ U(0, alpha_max), and the real score's CFG extrapolates from y- instead of the empty prompt,
x0_real = x0(y-) + w (x0(y) - x0(y-)), so the student learns to honour NASA at one step. The teacher's y- may
name more than the student's (`nasa_teacher_negative`): a teacher reads a bare color as its objects' only,
so "red" alone leaves (even adds) red backgrounds, while "red, on a red background" clears both. The fake score
keeps the positive prompt only (the paper found that better); those updates also skip the GAN term,
whose real images do not avoid y-.

The generator and the fake score are each a full trainable copy or a peft LoRA; a LoRA fake score
lives on the frozen teacher itself (adapters off = real score, on = fake score). Runs on 1..N
processes through accelerate (`accelerate launch -m training.run --config CONFIG.json`).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipelines import loading, nasa, onestep, registry

from ..common import drop_local_paths, make_accelerator, save_grid, train_loop

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj"]


class Discriminator(nn.Module):
    """GAN head on the fake score's mid-block features (any spatial size): convs, pooling, one logit."""

    def __init__(self, channels: int):
        super().__init__()
        groups = 32 if channels % 32 == 0 else 8 if channels % 8 == 0 else 1
        self.net = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels), nn.SiLU(),
                                 nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.GroupNorm(groups, channels),
                                 nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(1)


def add_lora(unet, rank: int, alpha: float, name: str) -> None:
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS, init_lora_weights="gaussian"),
                     adapter_name=name)


class MidFeatures:
    """Captures a UNet's mid-block output during a forward pass."""

    def __init__(self, unet):
        self.value = None
        unet.mid_block.register_forward_hook(self._hook)

    def _hook(self, _module, _inputs, output):
        self.value = output[0] if isinstance(output, tuple) else output


def _noise_like(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=gen).to(x.device, x.dtype)


def build_generator(cfg, teacher_unet):
    """The student generator as training starts: a copy of the teacher UNet, or `generator_init` (e.g. a
    smaller student warmed up by teacher score matching, MSD); with a peft LoRA when asked."""
    if cfg.generator_init:
        from diffusers import UNet2DConditionModel

        generator = UNet2DConditionModel.from_pretrained(cfg.generator_init, use_safetensors=True, dtype=torch.float32)
    else:
        generator = copy.deepcopy(teacher_unet)
    if cfg.generator_lora_rank:
        add_lora(generator, cfg.generator_lora_rank, cfg.lora_alpha, "generator")
    return generator


class Distiller:
    """Holds the teacher pipeline, the generator, the fake score and their math."""

    def __init__(self, cfg, device):
        self.cfg = cfg
        self.pipe = loading.load_pipeline(cfg.teacher, device=str(device), dtype=torch.float32, cache=False)
        spec = registry.get(cfg.teacher)
        self.height = cfg.height or spec.resolution
        self.width = cfg.width or spec.resolution
        self.teacher = self.pipe.unet.requires_grad_(False)
        for part in ("vae", "text_encoder", "text_encoder_2"):
            if getattr(self.pipe, part, None) is not None:
                getattr(self.pipe, part).requires_grad_(False)
        self.ptype = self.pipe.scheduler.config.prediction_type
        self.abar = self.pipe.scheduler.alphas_cumprod.to(device, torch.float32)
        self.num_t = len(self.abar)
        torch.manual_seed(cfg.seed)
        self.generator = build_generator(cfg, self.teacher).to(device)
        if not cfg.generator_lora_rank:
            self.generator.requires_grad_(True)
        if cfg.fake_lora_rank:  # fake score = adapter on the frozen teacher; adapters off = real score
            add_lora(self.teacher, cfg.fake_lora_rank, cfg.lora_alpha, "fake")
            self.fake = self.teacher
        else:
            self.fake = copy.deepcopy(self.teacher).requires_grad_(True)
        self.features = MidFeatures(self.fake)
        self.disc = Discriminator(self.fake.config.block_out_channels[-1]) if cfg.gan_weight > 0 else None

    # --- scores -----------------------------------------------------------------------------
    def raw(self, unet, x_t, t, cond, adapters: bool | None = None) -> torch.Tensor:
        """The UNet's output in the teacher's parameterisation (adapters on/off for a LoRA fake score)."""
        if adapters is not None and getattr(unet, "_hf_peft_config_loaded", False):
            unet.enable_adapters() if adapters else unet.disable_adapters()
        return unet(x_t, t, encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=cond.added_cond_kwargs).sample

    def x0(self, unet, x_t, t, cond, adapters: bool | None = None):
        return self._to_x0(self.raw(unet, x_t, t, cond, adapters).float(), x_t.float(), t)

    def _to_x0(self, out, x_t, t):
        a = self.abar[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - self.abar[t]).sqrt().view(-1, 1, 1, 1)
        if self.ptype == "epsilon":
            return (x_t - s * out) / a.clamp_min(1e-4)
        if self.ptype == "v_prediction":
            return a * x_t - s * out
        return out

    def add_noise(self, x, eps, t):
        a = self.abar[t].sqrt().view(-1, 1, 1, 1)
        return a * x + (1 - self.abar[t]).sqrt().view(-1, 1, 1, 1) * eps

    def target(self, x0, eps, t):
        """What the teacher's parameterisation predicts at (x_t, t)."""
        a = self.abar[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - self.abar[t]).sqrt().view(-1, 1, 1, 1)
        return {"epsilon": eps, "v_prediction": a * eps - s * x0}.get(self.ptype, x0)

    @torch.no_grad()
    def real_x0(self, x_t, t, cond, uncond):
        lora_fake = self.fake is self.teacher
        both = onestep.Conditioning(torch.cat([uncond.prompt_embeds, cond.prompt_embeds]),
                                    {k: torch.cat([uncond.added_cond_kwargs[k], v]) for k, v in
                                     cond.added_cond_kwargs.items()} if cond.added_cond_kwargs else None)
        x0u, x0c = self.x0(self.teacher, torch.cat([x_t, x_t]), torch.cat([t, t]), both,
                           adapters=False if lora_fake else None).chunk(2)
        return x0u + self.cfg.real_guidance * (x0c - x0u)

    def dm_loss(self, x, cond, uncond, gen):
        """Distribution-matching loss; its gradient reaches x only (both scores are evaluated without grad)."""
        with torch.no_grad():
            t = torch.randint(self.cfg.min_t, self.cfg.max_t + 1, (x.shape[0],), generator=gen).to(x.device)
            x_t = self.add_noise(x.detach().float(), _noise_like(x, gen).float(), t)
            x0_real = self.real_x0(x_t, t, cond, uncond)
            x0_fake = self.x0(self.fake, x_t, t, cond, adapters=True if self.fake is self.teacher else None)
            p_real = x.detach().float() - x0_real
            grad = (x0_fake - x0_real) / p_real.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
            grad = torch.nan_to_num(grad)
        return 0.5 * F.mse_loss(x.float(), (x.detach().float() - grad))

    def generate_x0(self, unet, noise, cond, k: int, gen):
        """Backward simulation: run the generator k steps without grad, then step k (caller's grad mode)."""
        ts = list(self.cfg.timesteps)
        x = noise
        with torch.no_grad():
            for j in range(k):
                tj = torch.full((x.shape[0],), ts[j], device=x.device, dtype=torch.long)
                x0 = self.x0(unet, x, tj, cond)
                tn = torch.full_like(tj, ts[j + 1])
                x = self.add_noise(x0, _noise_like(x0, gen), tn)
        tk = torch.full((x.shape[0],), ts[k], device=x.device, dtype=torch.long)
        return self.x0(unet, x.to(noise.dtype), tk, cond)

    def disc_logits(self, unet, disc, latents, cond, gen):
        """Noise latents at a random t, run the fake score, classify its mid-block features."""
        t = torch.randint(0, self.num_t, (latents.shape[0],), generator=gen).to(latents.device)
        x_t = self.add_noise(latents.float(), _noise_like(latents, gen).float(), t)
        if self.fake is self.teacher:
            self.teacher.enable_adapters()
        unet(x_t, t, encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=cond.added_cond_kwargs)
        return disc(self.features.value.float())


def read_lines(spec: str, field: str, alternative: str) -> list[str]:
    """The non-empty lines of the text file a config `field` names (its other allowed value: `alternative`)."""
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"{field} {spec!r} is neither {alternative!r} nor a text file")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


class PromptSource:
    """Training prompts: the shapes sampler or a file; with a router, only one student's share."""

    def __init__(self, spec: str, seed: int, router: dict | None = None, route_index: int = -1, pipe=None):
        self.rng = np.random.default_rng(seed)
        self.router, self.route_index, self.pipe = router, route_index, pipe
        if spec == "shapes":
            self.lines = None
        else:
            self.lines = read_lines(spec, "prompts", "shapes")
            if self.router is not None:  # a fixed file is filtered once
                from pipelines import msd

                keep = msd.route(self.router, self.lines, pipe=self.pipe)
                self.lines = [p for p, r in zip(self.lines, keep) if r == self.route_index]
            if not self.lines:
                raise ValueError(f"prompt file {spec} has no prompts for this run")

    def sample(self, n: int) -> tuple[list[str], list]:
        if self.lines is not None:
            return [self.lines[i] for i in self.rng.integers(len(self.lines), size=n)], []
        from shapes import sample_spec, to_prompt

        specs = []
        while len(specs) < n:
            spec = sample_spec(self.rng)
            if self.router is None or self._mine(to_prompt(spec)):
                specs.append(spec)
        return [to_prompt(s) for s in specs], specs

    def _mine(self, prompt: str) -> bool:
        from pipelines import msd

        return msd.route(self.router, [prompt], pipe=self.pipe)[0] == self.route_index


class NegativeSource:
    """NASA-T's negative prompts: "colors" draws a shapes-world color word the prompt does not name (so
    it never contradicts the prompt); anything else is a text file of negatives, one per line."""

    def __init__(self, spec: str, seed: int):
        self.rng = np.random.default_rng(seed)
        self.lines = None
        if spec != "colors":
            self.lines = read_lines(spec, "nasa_negatives", "colors")
            if not self.lines:
                raise ValueError(f"negative prompt file {spec} is empty")

    def sample(self, prompts: list[str]) -> list[str]:
        if self.lines is not None:
            return [self.lines[i] for i in self.rng.integers(len(self.lines), size=len(prompts))]
        from shapes import COLORS

        out = []
        for prompt in prompts:
            free = [c for c in COLORS if c not in prompt.split()]
            out.append(free[self.rng.integers(len(free))])
        return out

    def draw(self, prob: float, alpha_max: float) -> float:
        """0 (this update runs without a negative) or this update's alpha."""
        return float(self.rng.uniform(0, alpha_max)) if self.rng.random() < prob else 0.0


class PoolSource:
    """Shapes-world prompts drawn from a cached pool together with their images' latents (encoded once
    per run), for the GAN head: its real latents match the batch's prompts with no rendering per step.
    With a router, only this student's share of the pool."""

    def __init__(self, cfg, seed: int, pipe, router: dict | None = None, route_index: int = -1):
        from ..data import pool
        from .teacher import cached_latents

        images, prompts = pool(cfg.data_size, seed=cfg.seed + 13)
        keep = np.arange(len(prompts))
        if router is not None:
            from pipelines import msd

            keep = np.flatnonzero(np.asarray(msd.route(router, prompts, pipe=pipe)) == route_index)
            if not len(keep):
                raise ValueError("the router sends none of the pool's prompts to this student")
        self.prompts = [prompts[i] for i in keep]
        # the whole pool is encoded (and cached) whatever the route, so routed runs can share one cache
        cache = Path(cfg.latents_cache) if cfg.latents_cache else Path(cfg.run_dir) / "latents.safetensors"
        self.latents = cached_latents(pipe.vae, images, cache)[torch.from_numpy(keep)]
        self.rng = np.random.default_rng(seed)

    def sample(self, n: int) -> tuple[list[str], np.ndarray]:
        idx = self.rng.integers(len(self.prompts), size=n)
        return [self.prompts[i] for i in idx], idx


def _update(acc, loss, params, opt, *also_zero) -> None:
    """Backward, clip to 10 (DMD2's norm), step; zero this optimizer's grads and any others'."""
    acc.backward(loss)
    acc.clip_grad_norm_(params, 10.0)
    opt.step()
    for o in (opt, *also_zero):
        o.zero_grad(set_to_none=True)


def train(cfg) -> dict:
    from accelerate.utils import DistributedDataParallelKwargs

    if not cfg.teacher:
        raise ValueError("dmd2 needs `teacher`: a registry id or a diffusers folder")
    if len(cfg.timesteps) not in (1, 2, 3, 4):
        raise ValueError(f"timesteps {cfg.timesteps} must hold 1 to 4 values")
    if cfg.gan_weight > 0 and cfg.prompts != "shapes":
        raise ValueError("the GAN term needs real images: use prompts='shapes' or gan_weight=0")
    negatives = None
    if cfg.nasa_negatives:
        if not 0 <= cfg.nasa_prob <= 1:
            raise ValueError(f"nasa_prob {cfg.nasa_prob} is out of range; allowed: 0 to 1")
        nasa.check_alpha(cfg.nasa_alpha_max)
        try:
            cfg.nasa_teacher_negative.format("red")
        except (IndexError, KeyError, ValueError):
            raise ValueError(f"nasa_teacher_negative {cfg.nasa_teacher_negative!r} must be a text with {{}} or {{0}} "
                             "where the student's negative goes") from None
        negatives = NegativeSource(cfg.nasa_negatives, cfg.seed + 3)
    acc = make_accelerator(cfg, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    d = Distiller(cfg, acc.device)
    gen_params = [p for p in d.generator.parameters() if p.requires_grad]
    fake_params = [p for p in d.fake.parameters() if p.requires_grad] + (list(d.disc.parameters()) if d.disc else [])
    opt_g = torch.optim.AdamW(gen_params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    opt_f = torch.optim.AdamW(fake_params, lr=cfg.guidance_lr or cfg.lr, weight_decay=cfg.weight_decay)
    gen_w, fake_w, opt_g, opt_f = acc.prepare(d.generator, d.fake, opt_g, opt_f)
    disc_w = acc.prepare(d.disc) if d.disc is not None else None
    router = None
    if cfg.route:
        from pipelines import msd

        router = msd.read(cfg.route)["router"]
    if cfg.gan_weight > 0:  # prompts with real images: the pool's
        prompts = PoolSource(cfg, cfg.seed + 1000 * acc.process_index, d.pipe, router, cfg.route_index)
    else:
        prompts = PromptSource(cfg.prompts, cfg.seed + 1000 * acc.process_index, router, cfg.route_index, d.pipe)
    tgen = torch.Generator().manual_seed(cfg.seed + 7919 * acc.process_index)
    shared = np.random.default_rng(cfg.seed)  # same on every process: the backward-simulation step k
    with torch.no_grad():
        uncond1 = onestep.encode_prompt(d.pipe, [""], d.height, d.width)
    shape = onestep.latent_shape(d.pipe, cfg.batch_size, d.height, d.width)

    def encode(texts):
        with torch.no_grad():
            return onestep.encode_prompt(d.pipe, texts, d.height, d.width)

    def real_latents(idx):
        return prompts.latents[torch.from_numpy(idx)].to(acc.device)

    gen_metrics = {}  # the generator's latest losses, in every logged line (it updates every `ratio` steps)

    def step(i):
        texts, picked = prompts.sample(cfg.batch_size)
        cond, uncond = encode(texts), uncond1.repeat(cfg.batch_size)
        noise = torch.randn(shape, generator=tgen).to(acc.device)
        k = int(shared.integers(len(cfg.timesteps)))
        gen_step = i % cfg.ratio == 0 and i >= cfg.init_step + cfg.fake_warmup
        alpha = negatives.draw(cfg.nasa_prob, cfg.nasa_alpha_max) if gen_step and negatives else 0.0
        steer = nullcontext()
        if alpha:  # NASA-T: the student steers away from y- in cross-attention, the teacher's CFG from y-
            negative = negatives.sample(texts)
            uncond = encode(negative)
            steer = nasa.applied(acc.unwrap_model(gen_w), uncond.prompt_embeds, alpha)
            if cfg.nasa_teacher_negative != "{}":
                uncond = encode([cfg.nasa_teacher_negative.format(n) for n in negative])
        metrics = {}
        with acc.autocast():
            with nullcontext() if gen_step else torch.no_grad(), steer:
                x = d.generate_x0(gen_w, noise, cond, k, tgen)
            if gen_step:
                loss_g = d.dm_loss(x, cond, uncond, tgen)
                gen_metrics["loss_dm"] = loss_g.item()
                if negatives:
                    gen_metrics["nasa_alpha"] = alpha
                if disc_w is not None and not alpha:
                    for p in fake_params:
                        p.requires_grad_(False)
                    gan_g = F.softplus(-d.disc_logits(acc.unwrap_model(fake_w), acc.unwrap_model(disc_w), x, cond,
                                                      tgen)).mean()
                    for p in fake_params:
                        p.requires_grad_(True)
                    loss_g = loss_g + cfg.gan_weight * gan_g
                    gen_metrics["loss_gan_g"] = gan_g.item()
                _update(acc, loss_g, gen_params, opt_g, opt_f)
            xd = x.detach().float()
            t = torch.randint(0, d.num_t, (xd.shape[0],), generator=tgen).to(acc.device)
            eps = _noise_like(xd, tgen)
            # the fake score learns G's distribution with the teacher's own denoising loss
            out = d.raw(fake_w, d.add_noise(xd, eps, t), t, cond, adapters=True if d.fake is d.teacher else None)
            loss_f = F.mse_loss(out.float(), d.target(xd, eps, t))
            loss = loss_f
            if disc_w is not None:
                logits_fake = d.disc_logits(fake_w, disc_w, xd, cond, tgen)
                logits_real = d.disc_logits(fake_w, disc_w, real_latents(picked), cond, tgen)
                loss_d = (F.softplus(logits_fake) + F.softplus(-logits_real)).mean()
                loss = loss + cfg.gan_disc_weight * loss_d
                metrics["loss_d"] = loss_d.item()
        _update(acc, loss, fake_params, opt_f)
        return {**gen_metrics, **metrics, "loss_fake": loss_f.item(), "lr": opt_g.param_groups[0]["lr"]}

    modules = {"generator": d.generator, "fake": d.fake}
    if d.disc is not None:
        modules["disc"] = d.disc
    sample = _shapes_eval(cfg, d) if cfg.eval_images else None
    result = train_loop(cfg, modules, {"generator": opt_g, "fake": opt_f}, step, sample_fn=sample, accelerator=acc)
    result.update(distiller=d, accelerator=acc)
    return result


def _shapes_eval(cfg, d):
    router = None
    if cfg.route:  # an MSD student is judged on its own share of the prompts
        from pipelines import msd

        router = msd.read(cfg.route)["router"]

    def sample(folder: Path, at_step: int):
        from shapes import judge, to_prompt

        specs = PromptSource("shapes", at_step, router, cfg.route_index, d.pipe).sample(cfg.eval_images)[1]
        with torch.no_grad():
            cond = onestep.encode_prompt(d.pipe, [to_prompt(s) for s in specs], d.height, d.width)
            noise = onestep.make_noise(d.pipe, list(range(len(specs))), d.height, d.width).to(d.abar.device)
            # all steps = backward simulation up to the last one
            x0 = d.generate_x0(d.generator, noise, cond, len(cfg.timesteps) - 1, torch.Generator().manual_seed(at_step))
            imgs = onestep.to_pil(onestep.decode(d.pipe, x0))
        acc = float(np.mean([judge(s, np.asarray(im))[0] for s, im in zip(specs, imgs)]))
        save_grid(imgs, folder / f"step-{at_step:08d}.png")  # the Train tab shows the newest grid
        with open(Path(cfg.run_dir) / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": at_step, "sample_shapeeval": round(acc, 4)}) + "\n")
    return sample


def export(result: dict, cfg, out_dir: str | Path, lora_base: str | Path | None = None) -> Path:
    """Write the student as a diffusers folder (teacher's components, generator UNet with any LoRA merged,
    or the LoRA alone on `lora_base`'s UNet: see save_student) plus onestep.json, so the registry serves it
    like any model."""
    d = result["distiller"]
    generator = copy.deepcopy(result["accelerator"].unwrap_model(d.generator))  # the live one keeps training
    return save_student(d.pipe, generator, cfg, d.height, out_dir, lora_base)


def save_student(pipe, unet, cfg, resolution: int, out_dir: str | Path, lora_base: str | Path | None = None) -> Path:
    """The teacher pipeline `pipe` with `unet` (made fp16, LoRA fused: it is changed) in place of its UNet,
    plus onestep.json. With `lora_base` (the student folder whose UNet the LoRA generator was trained on),
    only the adapter is written (diffusers' LoRA file) and the folder borrows that UNet ("unet_from")."""
    out_dir = Path(out_dir)
    teacher_unet = pipe.unet
    if lora_base is None:  # the whole UNet, any LoRA merged into it
        if getattr(unet, "_hf_peft_config_loaded", False):
            unet.fuse_lora()
            unet.unload_lora()
        pipe.unet = unet.to(torch.float16)  # half the bytes; loading casts to the run's dtype
    try:
        pipe.save_pretrained(out_dir, safe_serialization=True)  # (with the teacher's UNet folder when lora_base)
    finally:
        pipe.unet = teacher_unet
    if lora_base is not None:  # the adapter alone: the UNet is lora_base's
        shutil.rmtree(out_dir / "unet")
        _save_adapter(pipe, unet, out_dir)
    drop_local_paths(out_dir)
    teacher = registry.get(cfg.teacher)
    meta = {"role": "student", "teacher": teacher_name(cfg.teacher), "steps": len(cfg.timesteps),
            "timesteps": list(cfg.timesteps), "resolution": resolution, "method": "dmd2"}
    meta_path = out_dir / "onestep.json"
    old = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if "nct" in old:  # re-exporting a student keeps its NCT adapters (the recipe's nct stage follows)
        meta["nct"] = old["nct"]
    meta_path.write_text(json.dumps(meta, indent=2))
    if lora_base is not None:
        borrow(out_dir, "unet_from", lora_base)
    if teacher.is_local:  # its VAE, text encoder and tokenizer are the teacher's: borrow them, don't copy
        share_components(out_dir, teacher.path)
    return out_dir


def _save_adapter(pipe, unet, out_dir: Path) -> None:
    """The generator's LoRA as diffusers' LoRA file (registry.LORA_FILE), fp16 like full students, with peft's
    key names (diffusers' older names lose the attention layers on reload) and its rank and alpha."""
    from peft.utils import get_peft_model_state_dict

    config = unet.peft_config["generator"]
    layers = get_peft_model_state_dict(unet, adapter_name="generator")
    type(pipe).save_lora_weights(out_dir, unet_lora_layers={k: v.to(torch.float16) for k, v in layers.items()},
                                 unet_lora_adapter_metadata={"r": config.r, "lora_alpha": config.lora_alpha,
                                                             "target_modules": sorted(config.target_modules)},
                                 weight_name=registry.LORA_FILE, safe_serialization=True)


def teacher_name(teacher: str) -> str:
    """How a student records its teacher: a folder that is a registry model by its id (valid from any
    working directory), anything else as given."""
    spec = registry.get(teacher)
    return next((m.id for m in registry.MODELS.values() if m.is_local and spec.is_local
                 and m.path.resolve() == spec.path.resolve()), teacher)


def share_components(folder: str | Path, source: str | Path) -> None:
    """Drop `folder`'s copies of the components it shares with the model folder `source` and record
    "components_from" (relative) in its onestep.json, so loading takes them from `source`
    (registry.component_folder). Also re-points a folder that was copied elsewhere (`source` resolved)."""
    folder = Path(folder)
    for name in registry.SHARED_COMPONENTS:
        if (Path(source) / name).is_dir():
            shutil.rmtree(folder / name, ignore_errors=True)
    borrow(folder, "components_from", source)


def borrow(folder: str | Path, key: str, source: str | Path) -> None:
    """Record in `folder`'s onestep.json that `key` ("components_from", "unet_from") is the folder `source`,
    as a path relative to `folder` (see registry.component_folder)."""
    meta_path = Path(folder) / "onestep.json"
    meta = json.loads(meta_path.read_text())
    meta[key] = os.path.relpath(Path(source).resolve(), Path(folder).resolve())
    meta_path.write_text(json.dumps(meta, indent=2))


def copy_folder(src: str | Path, dst: str | Path) -> Path:
    """Copy a model folder; a student that borrows its teacher's components (or another student's UNet)
    keeps borrowing them."""
    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    source = registry.component_folder(src, "vae").parent
    if source != src:
        share_components(dst, source)
    base = registry.component_folder(src, "unet").parent
    if base != src:
        borrow(dst, "unet_from", base)
    return dst


def export_checkpoint(cfg, ckpt: str | Path, out_dir: str | Path) -> Path:
    """Export the generator of a (complete) checkpoint while its run may still be going: the teacher's
    components are loaded afresh on the CPU and the generator is rebuilt exactly as `Distiller` builds it."""

    pipe = loading.load_pipeline(cfg.teacher, device="cpu", dtype=torch.float32, cache=False)
    generator = build_generator(cfg, pipe.unet)
    generator.load_state_dict(loading.load_state_dict(Path(ckpt) / "model-generator.safetensors"))
    return save_student(pipe, generator, cfg, cfg.height or registry.get(cfg.teacher).resolution, out_dir)
