"""NCT, noise consistency training (Luo, Xue, Hu, Tang, 2025, arXiv 2506.19741): teach a frozen
one-step generator a new control with an adapter, using only prompts and a condition extractor --
no images, no teacher.

The generator f(z) maps noise to a clean latent. Training pairs are made on the fly: z ~ N(0, I),
x = f(z), c = extract(decode(x)). The adapter phi (ControlNet architecture, zero-initialised outputs,
so f_phi = f at the start) gets the noise through a variance-preserving diffusion in noise space,

    z_s = sqrt(1 - s^2) z + s eps,   s in {0, 1/K, ..., 1},

which keeps every z_s standard normal (the frozen generator still accepts it): at s = 0 the noise is
the one that made c, at s = 1 it is independent of c. Two losses:

    consistency  L_con = d(f_phi(z_{s_{k+1}}, c), stopgrad f_phi(z_{s_k}, c))   (same eps for both)
    boundary     L_bound = d(f_phi(z, c), f(z))

The less-coupled input is pulled toward what the more-coupled one produces, so along the chain the
adapter must read c to keep the output consistent with it; the boundary keeps f_phi on the
generator's output manifold. The constrained problem min L_con s.t. L_bound <= xi is solved
primal-dual: a step on phi with L_con + lambda L_bound, then lambda <- max(0, lambda + eta (L_bound - xi)).

Choices the paper leaves open, made here: K = `levels` (8) evenly spaced s_k = k / K, one k per sample
drawn uniformly from {0..K-1}; d = mean squared error in the generator's latent space (the space the
adapter acts in; no decoder in the loss); xi = `boundary_target` (0.01, about 1% of the latents'
variance; shapes-64's last phase allows 0.03, which made its adapter follow layouts better), eta =
`dual_lr` (1.0), lambda starts at 1; no EMA (the paper's 0.9999 needs far longer runs).
The boundary constraint keeps the adapter's residuals small, and at conditioning scale 1 it followed the
control less than at 2; so the export folds in a calibrated scale (`calibrate`: the best edge F1 on layouts
of prompts other than the held-out ones), recorded in the folder's nct.json and taken out again when a run
warm-starts from that export.
"""
from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipelines import control, loading, onestep, registry

from ..common import make_accelerator, optimize, train_loop
from .controlnet import new_controlnet  # the adapter is a ControlNet (saved by controlnet.export)
from .dmd2 import PromptSource


class Adapted:
    """The frozen one-step student and its adapter: f(z) and f_phi(z, c) as clean latents."""

    def __init__(self, pipe, spec):
        """`pipe` is a private copy (loading.load_pipeline(..., cache=False)): its weights are frozen here."""
        self.pipe, self.spec = pipe, spec
        for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
            if getattr(pipe, part, None) is not None:
                getattr(pipe, part).requires_grad_(False)
        self.t = onestep.resolve_timesteps(spec, 1, None, pipe.scheduler.config.num_train_timesteps)

    def x0(self, z: torch.Tensor, cond, ctl: control.Control | None) -> torch.Tensor:
        return onestep.denoise(self.pipe, cond, z, self.t, control=ctl)

    def conditions(self, latents: torch.Tensor, preprocessor: str) -> torch.Tensor:
        """The extractor on the generator's own images: (batch, 3, H, W) maps in [0, 1]."""
        with torch.no_grad():
            images = ((onestep.decode(self.pipe, latents).clamp(-1, 1) + 1) * 127.5).round().byte()
        maps = [control.detect(im, preprocessor) for im in images.permute(0, 2, 3, 1).cpu().numpy()]
        return torch.from_numpy(np.stack(maps)).permute(0, 3, 1, 2).float().div(255)


def losses(model: Adapted, net, z, eps, k, levels: int, cond, c, frozen: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_con, L_bound, f(z)) for one batch; k holds one level index per sample; `frozen` = f(z) when
    the caller already has it (it made c from it)."""
    s_lo = (k.float() / levels).view(-1, 1, 1, 1)
    s_hi = ((k + 1).float() / levels).view(-1, 1, 1, 1)
    z_lo = (1 - s_lo ** 2).sqrt() * z + s_lo * eps
    z_hi = (1 - s_hi ** 2).sqrt() * z + s_hi * eps
    with torch.no_grad():
        frozen = model.x0(z, cond, None) if frozen is None else frozen
        target = model.x0(z_lo, cond, control.Control(net, c))
    l_con = F.mse_loss(model.x0(z_hi, cond, control.Control(net, c)), target)
    l_bound = F.mse_loss(model.x0(z, cond, control.Control(net, c)), frozen)
    return l_con, l_bound, frozen


def train(cfg) -> dict:
    if not cfg.student:
        raise ValueError("nct needs `student`: a one-step student (registry id or folder)")
    if control.unavailable(cfg.preprocessor):
        raise ValueError(control.unavailable(cfg.preprocessor))
    if cfg.levels < 1:
        raise ValueError(f"levels {cfg.levels} must be at least 1")
    spec = registry.get(cfg.student)
    if spec.role != "student" or spec.steps != 1:
        raise ValueError(f"{cfg.student} is not a one-step student; NCT adapts a frozen one-step generator")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    acc = make_accelerator(cfg)  # a GPU when there is one; `accelerate launch` for several
    device = acc.device
    pipe = loading.load_pipeline(cfg.student, device=str(device), dtype=torch.float32, cache=False)
    model = Adapted(pipe, spec)
    torch.manual_seed(cfg.seed)
    net = new_controlnet(pipe.unet, pipe.vae_scale_factor)
    if cfg.init_adapter:  # warm start from an exported adapter (a checkpoint in run_dir still wins)
        saved = loading.load_controlnet(cfg.init_adapter, device="cpu", dtype=torch.float32)
        net.load_state_dict(fold_scale(saved, 1 / folded_scale(cfg.init_adapter)).state_dict())
    net = net.train().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    net_w, opt = acc.prepare(net, opt)
    prompts = PromptSource(cfg.prompts, cfg.seed + 1 + 1000 * acc.process_index)
    gen = torch.Generator().manual_seed(cfg.seed + 4 + 7919 * acc.process_index)
    size = spec.resolution
    shape = onestep.latent_shape(pipe, cfg.batch_size, size, size)
    state = {"lambda": float(cfg.lambda_init)}

    def step(i):
        texts, _ = prompts.sample(cfg.batch_size)
        with torch.no_grad():
            cond = onestep.encode_prompt(pipe, texts, size, size)
            z = torch.randn(shape, generator=gen).to(device)
            frozen = model.x0(z, cond, None)
            c = model.conditions(frozen, cfg.preprocessor).to(device)
        eps = torch.randn(shape, generator=gen).to(device)
        k = torch.randint(0, cfg.levels, (cfg.batch_size,), generator=gen).to(device)
        l_con, l_bound, _ = losses(model, net_w, z, eps, k, cfg.levels, cond, c, frozen)
        loss = l_con + state["lambda"] * l_bound
        optimize(opt, loss, net.parameters(), accelerator=acc)
        state["lambda"] = max(0.0, state["lambda"] + cfg.dual_lr * (l_bound.item() - cfg.boundary_target))
        return {"loss_con": l_con.item(), "loss_bound": l_bound.item(), "lambda": state["lambda"],
                "lr": opt.param_groups[0]["lr"]}

    result = train_loop(cfg, {"adapter": net}, {"adapter": opt}, step, extra_state=lambda: dict(state),
                        on_resume=lambda saved: state.update({"lambda": float(saved.get("lambda", cfg.lambda_init))}),
                        accelerator=acc)
    result.update(adapter=net.eval(), pipe=pipe)
    return result


FOLD_FILE = "nct.json"


def fold_scale(adapter, scale: float):
    """A copy of `adapter` whose residuals (the outputs of its zero-initialised 1x1 convolutions, which the UNet
    adds) are `scale` times larger: at conditioning scale 1 it gives what `adapter` gave at `scale`."""
    folded = copy.deepcopy(adapter)
    with torch.no_grad():
        for conv in [*folded.controlnet_down_blocks, folded.controlnet_mid_block]:
            conv.weight.mul_(scale)
            conv.bias.mul_(scale)
    return folded


def folded_scale(adapter_dir: str | Path) -> float:
    """The scale an exported adapter has folded in (1 when its folder does not say)."""
    path = Path(adapter_dir) / FOLD_FILE
    return float(json.loads(path.read_text()).get("folded_scale", 1.0)) if path.is_file() else 1.0


def calibrate(adapter, cfg, prompts: list[str], scales=(1.0, 1.5, 2.0, 2.5, 3.0), max_drop: float = 0.05) -> dict:
    """The scale (of `scales`) whose folded adapter gives the student the best edge F1 on one layout per prompt
    (shapes-world prompts: ShapeEval judges), among those whose ShapeEval is at most `max_drop` below the first
    scale's (1: the adapter as trained); with every scale's numbers."""
    from pipelines.evaluate import evaluate

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for s in scales:
            folder = export(fold_scale(adapter, s), cfg, Path(tmp) / f"scale-{s:g}", meta=False)
            res = evaluate(cfg.student, prompts, 1, control=cfg.preprocessor, control_model=str(folder))
            rows[s] = {**{k: res["control"][k] for k in control.EDGE_KEYS}, "shapeeval": res["overall"]}
    floor = rows[scales[0]]["shapeeval"] - max_drop
    best = max((s for s in scales if rows[s]["shapeeval"] >= floor), key=lambda s: rows[s]["edge_f1"])
    return {"scale": best, "scales": rows}


def export(adapter, cfg, out_dir: str | Path, scale: float = 1.0, meta: bool = True) -> Path:
    """The adapter, with `scale` folded in (see fold_scale), as a ControlNetModel folder beside nct.json; recorded
    in the student's onestep.json (when it has one and `meta`)."""
    from pipelines.registry import get

    from .controlnet import export as save

    out = save(fold_scale(adapter, scale) if scale != 1 else adapter, out_dir)
    (out / FOLD_FILE).write_text(json.dumps({"folded_scale": scale}))
    if meta:
        write_meta(get(cfg.student).path, cfg.preprocessor, out)
    return out


def write_meta(student_dir: str | Path, preprocessor: str, adapter_dir: str | Path) -> None:
    """Record the adapter in a local student's onestep.json, so the registry finds it."""
    import json
    import os

    meta_path = Path(student_dir) / "onestep.json"
    if not meta_path.is_file():
        return
    meta = json.loads(meta_path.read_text())
    rel = os.path.relpath(Path(adapter_dir).resolve(), Path(student_dir).resolve())  # e.g. "../nct-canny"
    meta.setdefault("nct", {})[preprocessor] = rel
    meta_path.write_text(json.dumps(meta, indent=2))
