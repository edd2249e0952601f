"""One entry for "make images with model X": students go through `onestep`, teachers through
`teacher`. Also PNG files that carry their full settings, and reading them back."""
from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image, PngImagePlugin

from . import control, loading, msd, onestep, teacher
from .errors import first_line
from .registry import get

SETTINGS_KEY = "onestep-settings"
ENGINES = ("auto", "torch", "onnx")


def generate(model_id: str, prompt: str, *, negative_prompt: str = "", steps: int | None = None, seed: int = 0,
             batch_size: int = 1, height: int | None = None, width: int | None = None,
             guidance_scale: float | None = None, device: str | None = None, noise=None,
             negative_mode: str = "nasa", nasa_alpha: float | None = None, control_image=None,
             preprocessor: str = "canny", control_model: str = "auto", control_scale: float = 1.0,
             control_settings: dict | None = None, engine: str | None = None, torch_options=None,
             prompt_cache: bool = True) -> onestep.GenerationResult:
    """Load (cached) and run a registry model or local folder; raises ValueError/LoadError with one line.
    `noise` (batch, C, h, w) replaces the seeded initial noise (e.g. a ReNO export). A student's
    negative prompt uses `negative_mode`: "nasa" at `nasa_alpha` (None: the model's default) or the
    "cfg" baseline at `guidance_scale`; a teacher's always uses CFG.

    `control_image` (an upload: path, PIL or array) pins the layout: it becomes a `preprocessor` map
    and drives `control_model` ("auto": a student's NCT adapter, else its teacher's ControlNet;
    "nct"; "controlnet"; or a ControlNet folder/repo) at `control_scale`.

    `engine` (None: $ONESTEP_ENGINE, else "auto"): a student runs on its ONNX Runtime export when
    one is present ("auto"; any problem with it falls back to PyTorch and says why in `res.notice`),
    always on PyTorch ("torch", with `torch_options`: a speed.TorchOptions, whose tiny_decoder=True also picks
    the ONNX export's tiny decoder graph), or only on ONNX ("onnx":
    exported into the cache first if missing; errors are raised). Teachers always run on PyTorch."""
    onestep.check_negative(negative_mode, nasa_alpha)
    engine = check_engine(engine)
    spec = get(model_id)
    student_guidance = 2.0 if guidance_scale is None else guidance_scale  # the CFG-baseline negative's scale
    if spec.is_local and msd.is_msd(spec.path):
        if control_image is not None:
            raise ValueError("control images are not available for multi-student (MSD) models; use one student")
        return _generate_msd(spec, prompt, negative_prompt=negative_prompt, steps=steps, seed=seed,
                             batch_size=batch_size, height=height, width=width, guidance_scale=guidance_scale,
                             device=device, noise=noise, negative_mode=negative_mode, nasa_alpha=nasa_alpha,
                             engine=engine, torch_options=torch_options, prompt_cache=prompt_cache)
    notice = ""
    tiny = torch_options.tiny_decoder if torch_options is not None else False
    # a given noise is usually a ReNO export, optimized through PyTorch: "auto" replays it there, bit for bit
    if spec.role != "teacher" and engine != "torch" and not (noise is not None and engine == "auto"):
        if control_image is not None:
            if engine == "onnx":
                raise ValueError("control images run on the PyTorch engine only (the ONNX export has no ControlNet "
                                 "graphs); use engine auto or torch")
        elif isinstance(tiny, str):  # a tiny decoder folder of the user's: the export holds only the model's own
            if engine == "onnx":
                raise ValueError("a tiny decoder folder runs on the PyTorch engine only; use engine auto or torch, "
                                 "or the model's own tiny decoder (true)")
        else:
            res, notice = _generate_onnx(spec, engine, prompt, dict(
                negative_prompt=negative_prompt, steps=steps, seed=seed, batch_size=batch_size, height=height,
                width=width, noise=noise, guidance_scale=student_guidance,
                negative_mode=negative_mode, nasa_alpha=nasa_alpha, prompt_cache=prompt_cache, tiny_decoder=tiny))
            if res is not None:
                return res
    elif engine == "onnx":
        raise ValueError(f"{spec.id} is a teacher; the ONNX engine serves one- to four-step students (use auto or torch)")
    from . import speed

    pipe = speed.pipeline(model_id, torch_options, device=device)
    ctl, ctl_settings = None, None
    if control_image is not None:
        ctl, ctl_settings = _control(spec, pipe, control_image, preprocessor, control_model, control_scale,
                                     control_settings or {}, batch_size, height or spec.resolution,
                                     width or spec.resolution)
    if spec.role == "teacher":
        res = teacher.sample(pipe, spec, prompt, negative_prompt=negative_prompt, steps=steps,
                             guidance_scale=guidance_scale, seed=seed, batch_size=batch_size, height=height,
                             width=width, noise=noise, control=ctl)
    else:
        res = onestep.generate(pipe, spec, prompt, negative_prompt=negative_prompt, steps=steps, seed=seed,
                               batch_size=batch_size, height=height, width=width, noise=noise,
                               guidance_scale=student_guidance,
                               negative_mode=negative_mode, nasa_alpha=nasa_alpha, control=ctl,
                               prompt_cache=prompt_cache)
    if ctl_settings:
        res.settings["control"] = ctl_settings
    res.notice = notice
    res.info.setdefault("engine", "torch")
    res.info.setdefault("decoder", "tiny" if tiny else "vae")
    if tiny:  # the image's settings reproduce it: say which decoder drew it
        res.settings["decoder"] = "tiny" if tiny is True else str(tiny)
    return res


def check_engine(engine: str | None) -> str:
    engine = engine or os.environ.get("ONESTEP_ENGINE") or "auto"
    if engine not in ENGINES:
        raise ValueError(f"engine {str(engine)[:40]!r} is not supported; allowed: {', '.join(ENGINES)}")
    return engine


def _generate_onnx(spec, engine: str, prompt: str, kwargs: dict):
    """(result, "") on the ONNX engine, or (None, notice) when PyTorch must serve ("auto" only; with
    "onnx" every problem is raised)."""
    from . import onnx_engine

    try:
        onnx_engine.check_exportable(spec)
    except ValueError:
        if engine == "onnx":
            raise
        return None, ""  # SANA / FLUX: PyTorch is their only engine
    try:
        eng, notice = onnx_engine.engine_for(spec, build="now" if engine == "onnx" else "auto")
        if eng is None:
            if engine == "onnx":
                raise loading.LoadError(notice or f"no ONNX export of {spec.id}")
            return None, notice
        why = eng.unsupported(spec, kwargs["negative_prompt"], kwargs["negative_mode"], kwargs["nasa_alpha"],
                              kwargs["height"], kwargs["width"], kwargs["tiny_decoder"])
        if why:
            if engine == "onnx":
                raise ValueError(why)
            return None, f"{why}; using PyTorch"
        return onnx_engine.generate(eng, spec, prompt, **kwargs), ""
    except (loading.LoadError, ImportError) as e:  # corrupt or stale graphs, onnxruntime missing
        if engine == "onnx":
            raise
        return None, f"ONNX engine unavailable ({first_line(e)}); using PyTorch"


def _control(spec, pipe, image, preprocessor, kind, scale, settings, batch, height, width):
    """A control.Control for this call, and what to record about it in the image's settings."""
    scale = control.check_scale(scale)
    control_map = control.make_map(image, preprocessor, height, width, **settings)
    source, kind = control.resolve(spec, preprocessor, kind)
    device, dtype = onestep.placement(pipe.unet)
    model = loading.load_controlnet(source, device=str(device), dtype=dtype)
    if model.config.in_channels != pipe.unet.config.in_channels:
        raise ValueError(f"control model {source} takes {model.config.in_channels}-channel latents; {spec.id} makes "
                         f"{pipe.unet.config.in_channels}-channel ones: pick a control model made for it")
    ctl = control.Control(model, control.map_tensor(control_map, batch, device, dtype), scale)
    return ctl, {"preprocessor": preprocessor, "model": source, "kind": kind, "scale": scale, **settings}


def free_memory() -> None:
    """Drop every model, reward, engine and prompt embedding this process holds (a training job is
    about to take the GPU)."""
    from . import onnx_engine, rewards, speed

    loading.clear_cache()
    rewards.clear()
    speed.clear()
    onnx_engine.clear()
    onestep.PROMPT_CACHE.clear()


def routed(model_id: str, prompt: str, device=None) -> tuple[str, int | None]:
    """(the model that serves `prompt`, its student index): for a multi-student (MSD) folder the folder
    of the student its router picks, else (model_id, None)."""
    spec = get(model_id)
    if not (spec.is_local and msd.is_msd(spec.path)):
        return model_id, None
    meta = msd.read(spec.path)
    first = loading.load_pipeline(str(spec.path / meta["students"][0]), device=device)
    index = msd.route(meta["router"], [prompt], pipe=first)[0]
    return str(spec.path / meta["students"][index]), index


def _generate_msd(spec, prompt: str, device=None, **kwargs) -> onestep.GenerationResult:
    """Route the prompt to one student of a multi-student folder and run that student."""
    student, index = routed(spec.id, prompt, device)
    res = generate(student, prompt, device=device, **kwargs)
    res.settings.update(model=spec.id, student=index)
    return res


def save_png(image: Image.Image, path: str | Path, settings: dict) -> Path:
    """Write a PNG whose text chunk holds the settings that reproduce it."""
    info = PngImagePlugin.PngInfo()
    info.add_text(SETTINGS_KEY, json.dumps(settings))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)
    return path


def read_settings(path_or_image) -> dict:
    """Settings stored by save_png; ValueError if the PNG carries none."""
    img = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    raw = getattr(img, "text", {}).get(SETTINGS_KEY) or img.info.get(SETTINGS_KEY)
    if not raw:
        raise ValueError("this image carries no OneStep Studio settings; only PNGs saved by the app or CLI do")
    return json.loads(raw)


def image_settings(settings: dict, index: int) -> dict:
    """Settings of image `index` of a batch: its own seed, batch size 1."""
    return {**settings, "seed": settings["seed"] + index, "batch_size": 1}
