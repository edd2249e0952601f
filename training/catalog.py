"""What the job manager offers: the trainable methods with their per-method defaults, the checks a job
passes before anything starts (config keys and values, names, paths, memory), and exporting a run's
latest complete checkpoint to a model folder while the run may still be going.

Adding a method is one `Method(...)` entry in `_ENTRIES`; an entry whose config class is not in
`training.config.CONFIGS` or whose method file does not exist yet is left out of `METHODS`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipelines import loading, registry

from . import checkpoint
from .config import CONFIGS, field_names, from_dict, parse_value

ROOT = registry.ROOT
SHAPES = ROOT / registry.SHAPES_DIR
BUILTIN_PROMPTS = ROOT / "assets" / "prompts"  # built-in prompt lists, one prompt a line
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit, no '..'"
# fields that name a model folder (or, for the base fields, a registry id) and a data file or folder
MODEL_FIELDS = ("teacher", "student", "clip_dir", "vae_dir", "tokenizer_dir", "init_from", "init_unet",
                "generator_init", "route")
DATA_FIELDS = ("prompts", "images", "nasa_negatives")
TEXT_FILE_FIELDS = ("prompts", "nasa_negatives")  # data fields that name a text file, one prompt a line
POSITIVE = ("steps", "batch_size", "save_every", "log_every", "data_size")
NON_NEGATIVE = ("warmup", "keep", "eval_images", "max_seconds", "threads", "weight_decay", "gan_weight", "tsm_steps")
RESERVED = {"method": "the method is chosen with --method (or the Method menu)",
            "run_dir": "run_dir is set by the job manager (runs/<job>); give the job a name instead"}


def check_name(name: str, what: str = "job name") -> str:
    """A name that is safe as one path component and in any log line: no '/', '..', spaces or shell characters."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise ValueError(f"{what} {str(name)[:80]!r} is not allowed; allowed: {NAME_RULE}")
    return name


# --- exporting a checkpoint ---------------------------------------------------------------------------------
def latest_complete(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run, or a one-line error saying when the first will come."""
    ckpt = checkpoint.latest(run_dir)
    if ckpt is None:
        raise ValueError(f"run {run_dir.name} has no complete checkpoint yet; wait for its first save "
                         f"(every {json.loads((run_dir / 'config.json').read_text()).get('save_every', '?')} steps)"
                         if (run_dir / "config.json").is_file() else f"run {run_dir.name} has no complete checkpoint yet")
    return ckpt


def _export_dmd2(cfg, run_dir: Path, out: Path) -> Path:
    from .methods import dmd2

    return dmd2.export_checkpoint(cfg, latest_complete(run_dir), out)


def _export_msd(cfg, run_dir: Path, out: Path) -> Path:
    """Finished students are copied; the one in training is exported from its latest checkpoint."""
    from pipelines import msd as msd_serving

    from .methods import dmd2, msd

    model_dir = run_dir / "model"
    if not (model_dir / msd_serving.MSD_FILE).is_file():
        raise ValueError(f"run {run_dir.name} has not written its router yet; try again in a moment")
    meta = msd_serving.read(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(meta["students"]):
        if (model_dir / name / "model_index.json").is_file():
            shutil.copytree(model_dir / name, out / name, dirs_exist_ok=True)
            continue
        sub = msd.student_config(dataclasses.replace(cfg, run_dir=str(run_dir)), i)
        if checkpoint.latest(run_dir / name) is None:
            raise ValueError(f"MSD {name} (of {len(meta['students'])}) has no checkpoint yet; students train one "
                             "after another, try again after its first save")
        dmd2.export_checkpoint(sub, checkpoint.latest(run_dir / name), out / name)
    shutil.copy2(model_dir / msd_serving.MSD_FILE, out / msd_serving.MSD_FILE)
    return out


def _export_teacher(cfg, run_dir: Path, out: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPModel, CLIPTokenizer

    from .methods import teacher

    ckpt = latest_complete(run_dir)
    text_encoder = teacher.text_encoder_from_clip(CLIPModel.from_pretrained(cfg.clip_dir, use_safetensors=True))
    vae = AutoencoderKL.from_pretrained(cfg.vae_dir, use_safetensors=True, dtype=torch.float32)
    unet = teacher.build_unet(cfg, text_encoder.config.hidden_size, vae.config.latent_channels)
    unet.load_state_dict(loading.load_state_dict(ckpt / "model-ema.safetensors"))  # the EMA is what ships
    teacher.export(unet, vae, text_encoder, CLIPTokenizer.from_pretrained(cfg.clip_dir), out, cfg.snr_shift)
    return out


def _export_vae(cfg, run_dir: Path, out: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL

    from .methods import vae

    ckpt = latest_complete(run_dir)
    model = (AutoencoderKL.from_pretrained(cfg.init_from, use_safetensors=True, dtype=torch.float32)
             if cfg.init_from else vae.build_model(cfg))
    model.load_state_dict(loading.load_state_dict(ckpt / "model-vae.safetensors"))
    model.eval()
    if not cfg.decoder_only:  # as at the end of training: unit-variance latents on the same renders
        vae.set_scaling_factor(model, vae.held_out(cfg))
    vae.export(model, out)
    return out


def _export_clip(cfg, run_dir: Path, out: Path) -> Path:
    from transformers import CLIPTokenizer

    from .methods import clip

    ckpt = latest_complete(run_dir)
    tokenizer = CLIPTokenizer.from_pretrained(cfg.tokenizer_dir)
    model = clip.build_model(cfg, tokenizer)
    model.load_state_dict(loading.load_state_dict(ckpt / "model-clip.safetensors"))
    clip.export(model, tokenizer, out)
    return out


def _export_adapter(name: str, base_field: str, module_key: str) -> Callable:
    """ControlNet / NCT adapter: a ControlNetModel folder rebuilt on the base's UNet, weights from the checkpoint."""

    def export(cfg, run_dir: Path, out: Path) -> Path:
        import torch

        from .methods import controlnet

        ckpt = latest_complete(run_dir)
        pipe = loading.load_pipeline(getattr(cfg, base_field), device="cpu", dtype=torch.float32, cache=False)
        net = controlnet.new_controlnet(pipe.unet, pipe.vae_scale_factor)
        net.load_state_dict(loading.load_state_dict(ckpt / f"model-{module_key}.safetensors"))
        return controlnet.export(net, out)

    export.__name__ = f"_export_{name}"
    return export


# --- the method table ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    name: str  # what --method takes
    config: str  # key of training.config.CONFIGS
    label: str
    export: Callable  # (cfg, run_dir, out_dir) -> model folder of the run's latest complete checkpoint
    base_field: str | None = None  # the config field --base fills ("teacher" / "student")
    default_base: str = ""
    makes_images: bool = False  # its export is a text-to-image model ("Try in playground")
    multi_process: bool = False  # uses accelerate: 1..N processes; others train in one process
    defaults: dict = field(default_factory=dict)  # per-method defaults over the config class's

    def config_class(self):
        return type(CONFIGS[self.config])


# CPU-sized defaults for the embedded world (a few minutes to an hour on 2 cores); hub teachers want more.
_STUDENT = dict(prompts="shapes", steps=1000, batch_size=8, lr=5e-5, guidance_lr=5e-5, real_guidance=5.0,
                save_every=100, log_every=5, eval_images=16)
_ENTRIES = [
    Method("dmd2", "dmd2", "DMD2 one-step student", _export_dmd2, "teacher", "shapes-64-teacher", True, True,
           dict(_STUDENT, timesteps=(999,))),
    Method("dmd2-4step", "dmd2", "DMD2 four-step student (backward simulation)", _export_dmd2, "teacher",
           "shapes-64-teacher", True, True, dict(_STUDENT, timesteps=(999, 749, 499, 249))),
    Method("msd", "msd", "MSD: multi-student DMD2 (router by prompt category)", _export_msd, "teacher",
           "shapes-64-teacher", True, True, dict(_STUDENT, steps=300, eval_images=8)),
    Method("nct", "nct", "NCT adapter for a one-step student (control)", _export_adapter("nct", "student", "adapter"), "student",
           "shapes-64", False, False, dict(steps=1000, save_every=100, log_every=5)),
    Method("controlnet", "controlnet", "ControlNet for a teacher (control)", _export_adapter("controlnet", "teacher", "controlnet"),
           "teacher", "shapes-64-teacher", False, False, dict(steps=1000, save_every=100, log_every=5)),
    Method("teacher", "teacher", "shapes-64 recipe: teacher UNet", _export_teacher, None, "", True, False,
           dict(clip_dir=str(SHAPES / "clip"), vae_dir=str(SHAPES / "vae"), steps=2000, save_every=250,
                log_every=10, eval_images=16)),
    Method("clip", "clip", "shapes-64 recipe: tiny CLIP", _export_clip, None, "", False, False,
           dict(tokenizer_dir=str(SHAPES / "clip"), steps=500, save_every=100, log_every=10)),
    Method("vae", "vae", "shapes-64 recipe: tiny VAE", _export_vae, None, "", False, False,
           dict(steps=1000, save_every=250, log_every=10)),
]


def _available(m: Method) -> bool:
    if m.config not in CONFIGS:
        return False
    return importlib.util.find_spec(f"training.methods.{m.config}") is not None


METHODS: dict[str, Method] = {m.name: m for m in _ENTRIES if _available(m)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {str(name)[:60]!r}; allowed: {', '.join(METHODS)}")
    return METHODS[name]


# --- validation ---------------------------------------------------------------------------------------------
def parse_overrides(pairs) -> dict:
    """['steps=10', 'timesteps=[999, 499]'] (or a dict) -> {key: value}; values are JSON when they parse."""
    if isinstance(pairs, dict):
        return dict(pairs)
    out = {}
    for pair in pairs or []:
        key, sep, raw = str(pair).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"setting {str(pair)[:80]!r} is not key=value; e.g. steps=500")
        out[key.strip()] = parse_value(raw)
    return out


def _check_value(key: str, value, default):
    """The override's type must match the field's default (an int field takes no '12abc')."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {str(value)[:40]!r}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be a whole number, got {str(value)[:40]!r}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {str(value)[:40]!r}")
        value = float(value)
    elif isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list like {json.dumps(list(default))[:60]}, got {str(value)[:40]!r}")
        value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    elif isinstance(default, str) and not isinstance(value, str):
        value = str(value)
    return value


def _under(path: Path, roots) -> bool:
    real = path.resolve()
    return any(real == r.resolve() or r.resolve() in real.parents for r in roots)


def build_config(method: Method, base: str | None, overrides: dict, run_dir: Path, data_roots,
                 prompts_file: Path | None = None) -> object:
    """Per-method defaults <- base <- overrides, every value checked; raises ValueError with one line.
    `prompts_file`: an uploaded prompt list that will be written there (it replaces any prompts setting)."""
    cls = method.config_class()
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    allowed = sorted(set(field_names(cls)) - set(RESERVED))
    values = dict(method.defaults)
    for key, value in overrides.items():
        if key in RESERVED:
            raise ValueError(f"{key} cannot be set: {RESERVED[key]}")
        if key not in defaults:
            raise ValueError(f"unknown config key {str(key)[:40]!r} for {method.name}; allowed: {', '.join(allowed)}")
        values[key] = _check_value(key, value, defaults[key])
    if method.base_field:
        chosen = base or values.get(method.base_field) or method.default_base
        values[method.base_field] = check_base(chosen, method)
    elif base:
        raise ValueError(f"the {method.name} stage trains from nothing and takes no base model; "
                         f"set its inputs with --set (e.g. {', '.join(k for k in MODEL_FIELDS if k in defaults)})")
    for key in POSITIVE:
        if key in values and values[key] <= 0:
            raise ValueError(f"{key} must be a positive whole number, got {values[key]}")
    for key in NON_NEGATIVE:
        if key in values and values[key] < 0:
            raise ValueError(f"{key} must be 0 or more, got {values[key]}")
    for key in ("lr", "guidance_lr", "tsm_lr"):
        if key in values and not values[key] > 0 and not (key == "guidance_lr" and values[key] == 0):
            raise ValueError(f"{key} must be a positive number, got {values[key]}")
    if "timesteps" in values and not (1 <= len(values["timesteps"]) <= 4 and all(
            isinstance(t, int) and 0 <= t < 1000 for t in values["timesteps"])):
        raise ValueError(f"timesteps {list(values['timesteps'])} must be 1 to 4 whole numbers in 0..999, "
                         "e.g. [999] or [999, 749, 499, 249]")
    if values.get("mixed_precision", "no") not in ("no", "fp16", "bf16"):
        raise ValueError(f"mixed_precision {values['mixed_precision']!r} is not allowed; allowed: no, fp16, bf16")
    if prompts_file is not None:
        if "prompts" not in defaults:
            raise ValueError(f"the {method.name} method takes no prompt file")
        values["prompts"] = str(prompts_file)
    if values.get("gan_weight", 0) > 0 and values.get("prompts", "shapes") != "shapes":
        raise ValueError("gan_weight > 0 needs real images: use prompts=shapes or gan_weight=0")
    for key in MODEL_FIELDS:
        if key != method.base_field and values.get(key):
            check_model_folder(key, Path(values[key]))
    for key in DATA_FIELDS:
        if key in values and not (key == "prompts" and prompts_file is not None):  # written after the checks
            values[key] = check_data_path(key, values[key], data_roots)
    return from_dict({**values, "method": method.config, "run_dir": str(run_dir)})


def check_base(model: str, method: Method) -> str:
    """A registry id or a local diffusers folder that is on this machine (hub models: prefetched)."""
    try:
        spec = registry.get(model)
        loading.model_folder(spec)  # not installed / not loadable: the message names the command that fixes it
    except (registry.UnknownModelError, loading.LoadError) as e:
        raise ValueError(f"base model: {e}") from None
    want = "student" if method.base_field == "student" else "teacher"
    if spec.family not in registry.UNET_FAMILIES:
        raise ValueError(f"{method.name} needs an SD/SDXL-family {want}; {model} is {spec.family.upper()}")
    # a plain local pipeline folder does not say what it is; the registry and onestep.json/msd.json do
    said = model in registry.MODELS or any((spec.path / f).is_file() for f in ("onestep.json", "msd.json"))
    if said and spec.role != want:
        raise ValueError(f"{method.name} needs a {'multi-step teacher' if want == 'teacher' else 'one-step student'} "
                         f"as its base; {model} is a {spec.role}"
                         + (f" (its teacher: {spec.teacher})" if spec.teacher else ""))
    return model


def check_model_folder(key: str, path: Path) -> None:
    """An input model folder (CLIP, VAE, UNet, tokenizer, MSD router) that holds what its field needs."""
    if not path.is_dir():
        raise ValueError(f"{key} folder {str(path)[:120]} does not exist")
    need = {"tokenizer_dir": ("tokenizer.json", "vocab.json"), "route": ("msd.json",)}.get(key, ("config.json",))
    if not any((path / f).is_file() for f in need):
        raise ValueError(f"{key} {str(path)[:120]} is not the folder it needs (no {' or '.join(need)})")


def check_data_path(key: str, value: str, data_roots) -> str:
    """'shapes' (the procedural world; for nasa_negatives '' = off or 'colors') or a file/folder inside one of
    the data roots."""
    if value == "shapes" or (key == "nasa_negatives" and value in ("", "colors")):
        return value
    path = Path(str(value))
    if not path.is_absolute():
        path = ROOT / path
    roots = list(data_roots)
    if not _under(path, roots):
        raise ValueError(f"{key} path {str(value)[:120]} is outside the data roots; allowed: 'shapes' or a path "
                         f"under {', '.join(str(r) for r in roots)}")
    if not path.exists():
        raise ValueError(f"{key} path {str(value)[:120]} does not exist")
    if key in TEXT_FILE_FIELDS and not path.is_file():
        raise ValueError(f"{key} {str(value)[:120]} is not a text file; one prompt a line")
    if key in TEXT_FILE_FIELDS and not any(ln.strip() for ln in path.read_text(errors="replace").splitlines()):
        raise ValueError(f"prompt file {path.name} holds no prompts; one prompt a line")
    return str(path.resolve())


def builtin_prompt_lists() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BUILTIN_PROMPTS.glob("*.txt"))}


# --- memory preflight ---------------------------------------------------------------------------------------
def safetensors_params(folder: Path) -> int:
    """Parameter count of every .safetensors file under `folder`, read from the headers only."""
    total = 0
    for f in Path(folder).rglob("*.safetensors"):
        for k, v in loading.safetensors_header(f).items():
            if k != "__metadata__":
                count = 1
                for d in v["shape"]:
                    count *= d
                total += count
    return total


def _activations(batch: int, pixels: int, channels: int, half: bool) -> int:
    # ~48 stored fp32 tensors the size of each level's feature map per sample (resnets, norms, attention)
    return int(batch * pixels * channels * 48 * (2 if half else 4))


def estimate_memory(method: Method, cfg) -> dict:
    """Rough bytes one training process needs: frozen weights, trainable copies with their gradient and
    AdamW state (16 bytes a parameter), and activations. Good to a factor of ~2: enough to refuse a job
    that cannot fit before it spends minutes loading."""
    half = getattr(cfg, "mixed_precision", "no") in ("fp16", "bf16")
    parts = {}
    if method.base_field:
        folder = loading.model_folder(registry.get(getattr(cfg, method.base_field)))
        unet = safetensors_params(folder / "unet")
        allp = safetensors_params(folder)
        ucfg = json.loads((folder / "unet" / "config.json").read_text())
        vcfg = json.loads((folder / "vae" / "config.json").read_text())
        scale = 2 ** (len(vcfg["block_out_channels"]) - 1)
        size = getattr(cfg, "height", 0) or registry.get(getattr(cfg, method.base_field)).resolution
        pixels = (size // scale) ** 2
        chans = sum(ucfg["block_out_channels"])
        if method.config in ("dmd2", "msd"):
            lora = 0.03  # a LoRA's parameters relative to the UNet's, at the usual ranks
            gen = unet * (lora if cfg.generator_lora_rank else 1)
            fake = unet * (lora if cfg.fake_lora_rank else 1)
            copies = 2 if method.config == "msd" else 1  # MSD keeps a probe distiller beside each student's
            parts["frozen weights"] = 4 * allp * copies + 4 * (gen if not cfg.generator_lora_rank else 0)
            parts["trainable copies + optimizer"] = 16 * (gen + fake)
            parts["activations"] = 2 * _activations(cfg.batch_size, pixels, chans, half)
        else:  # adapters (ControlNet architecture): about half a UNet trains beside the frozen model
            parts["frozen weights"] = 4 * allp
            parts["trainable copies + optimizer"] = 16 * unet // 2
            parts["activations"] = _activations(cfg.batch_size, pixels, chans, half)
    else:
        params = _stage_params(method, cfg)
        parts["frozen weights"] = 4 * params["frozen"] + (4 * params["trainable"] if method.config == "teacher" else 0)
        parts["trainable copies + optimizer"] = 16 * params["trainable"]
        pixels = (getattr(cfg, "crop", 64) if method.config == "vae" else 64 // (4 if method.config == "teacher" else 1)) ** 2
        chans = sum(getattr(cfg, "block_out_channels", (getattr(cfg, "hidden_size", 128),)))
        parts["activations"] = _activations(cfg.batch_size, pixels, chans, half)
    parts = {k: int(v) for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def _stage_params(method: Method, cfg) -> dict:
    """Parameters of a recipe stage's model, built on the meta device (no memory, no weights)."""
    import torch

    frozen = 0
    with torch.device("meta"):
        if method.config == "vae":
            from .methods import vae

            model = vae.build_model(cfg)
        elif method.config == "teacher":
            from .methods import teacher

            clip_cfg = json.loads((Path(cfg.clip_dir) / "config.json").read_text())
            vae_cfg = json.loads((Path(cfg.vae_dir) / "config.json").read_text())
            model = teacher.build_unet(cfg, clip_cfg["text_config"]["hidden_size"], vae_cfg["latent_channels"])
            frozen = safetensors_params(Path(cfg.clip_dir)) + safetensors_params(Path(cfg.vae_dir))
        else:
            from transformers import CLIPTokenizer

            from .methods import clip

            model = clip.build_model(cfg, CLIPTokenizer.from_pretrained(cfg.tokenizer_dir))
    return {"trainable": sum(p.numel() for p in model.parameters()), "frozen": frozen}


def gb(n: float) -> str:
    """Bytes for a person: MB below a gigabyte, GB above."""
    if n < 2**30:
        return f"{n / 2**20:.0f} MB"
    return f"{n / 2**30:.1f} GB" if n < 2**40 else f"{n / 2**30:,.0f} GB"
