"""Model registry as data: one ModelSpec per model the app knows.

Nothing here loads weights (that is `loading.py`); this module only says where a model lives,
what family it is, its defaults, and who its teacher is.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets" / "models"

# NASA strength for a student that names none: the paper's training-free default for SD2.1-family
# students (0.1 for SD1.5, 0.5 for PixArt); SDXL has no published value, 0.2 sits between.
DEFAULT_NASA_ALPHA = 0.2

def cache_root() -> Path:
    """The project's cache outside the work tree: $ONESTEP_CACHE, else ~/.cache/onestep (data pools, run
    checkpoints, ONNX exports, converted reward weights)."""
    return Path(os.environ.get("ONESTEP_CACHE") or Path.home() / ".cache" / "onestep").expanduser()


FAMILIES = ("sd", "sdxl", "sana", "flux")
UNET_FAMILIES = ("sd", "sdxl")  # every feature; SANA and FLUX get plain generation


@dataclass(frozen=True)
class ModelSpec:
    id: str
    family: str  # one of FAMILIES
    role: str  # "student" (1-4 steps) or "teacher" (many steps + CFG)
    source: str  # hub repo id, or a folder (relative paths are under the repo root)
    teacher: str | None = None  # registry id of the teacher, for Compare
    resolution: int = 512
    steps: int = 1  # default number of inference steps
    timesteps: tuple[int, ...] | None = None  # explicit student timesteps per step count, if trained so
    guidance_scale: float = 0.0
    guidance_rescale: float = 0.0
    nasa_alpha: float = 0.0  # default NASA strength for negative prompts (0 for teachers: they use CFG)
    nasa_alpha_max: float = 4.0  # the top of the NASA alpha sliders (any alpha up to nasa.MAX_ALPHA is accepted)
    # NASA's negative branch attends to the negative prompt's own tokens only (nasa.words_mask), not to every token
    nasa_words_only: bool = False
    licence: str = ""
    memory_gb: float = 0.0  # rough peak memory in fp16 at default size (fp32 on CPU: about double)
    lora: tuple[str, str] | None = None  # (repo, file) of a safetensors LoRA fused into the base
    unet: tuple[str, str] | None = None  # (repo, file) of a replacement UNet checkpoint
    controlnets: tuple[tuple[str, str], ...] = ()  # (preprocessor, ControlNet folder or repo) for this model
    nct: tuple[tuple[str, str], ...] = ()  # (preprocessor, NCT adapter folder) trained on this one-step student
    description: str = ""
    # ONNX Runtime graphs of a student (pipelines/onnx_engine.py): "" = found by convention only
    # (`<model folder>/onnx/`, or the export cache), "build" = also exported into the cache on first
    # use, anything else = that folder (relative paths are under the repo root)
    onnx: str = ""

    @property
    def is_local(self) -> bool:
        return not _looks_like_hub_id(self.source)

    @property
    def path(self) -> Path:
        p = Path(self.source)
        return p if p.is_absolute() else ROOT / p

    @property
    def offered_nasa_alpha(self) -> float:
        """The NASA alpha a negative-prompt control starts at: the model's own, else the default."""
        return self.nasa_alpha or DEFAULT_NASA_ALPHA

    def control_source(self, preprocessor: str, kind: str) -> str | None:
        """The folder/repo of this model's own "controlnet" or "nct" adapter for `preprocessor`
        (relative folders are under the repo root)."""
        src = dict(self.controlnets if kind == "controlnet" else self.nct).get(preprocessor)
        if src and not _looks_like_hub_id(src) and not Path(src).is_absolute():
            return str(ROOT / src)
        return src

    def timesteps_for(self, steps: int) -> list[int] | None:
        """The trained timesteps for `steps` steps, when the spec pins them."""
        if self.timesteps and len(self.timesteps) == steps:
            return list(self.timesteps)
        return None


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and not source.startswith((".", "/")) and not (ROOT / source).exists()


SHAPES_DIR = "assets/models/shapes-64"
SHAPES_CLIP = ROOT / SHAPES_DIR / "clip"  # CLIP score / reward model of the embedded world

MODELS: dict[str, ModelSpec] = {m.id: m for m in [
    # shapes-64's NASA (`python -m bench.nasa`): the negative's own words only (0.54 -> 0.96 removed at alpha 10,
    # ShapeEval 0.154 against 0.152 with no negative; 0.83 at 4, 0.99 at 16 with ShapeEval 0.137)
    ModelSpec("shapes-64", "sd", "student", f"{SHAPES_DIR}/student", teacher="shapes-64-teacher", resolution=64,
              steps=1, timesteps=(999,), nasa_alpha=10.0, nasa_alpha_max=16.0, nasa_words_only=True,
              licence="Apache-2.0 (trained by this project)", memory_gb=0.1,
              nct=(("canny", f"{SHAPES_DIR}/nct-canny"),), onnx="build",
              description="embedded one-step DMD2 student of the shapes world (CPU real time)"),
    ModelSpec("shapes-64-teacher", "sd", "teacher", f"{SHAPES_DIR}/teacher", resolution=64, steps=25,
              guidance_scale=5.0, guidance_rescale=0.7, licence="Apache-2.0 (trained by this project)",
              memory_gb=0.1, controlnets=(("canny", f"{SHAPES_DIR}/controlnet-canny"),),
              description="embedded multi-step teacher of the shapes world (v-prediction, zero SNR)"),
    ModelSpec("shapes-64-4step", "sd", "student", f"{SHAPES_DIR}/student-4step", teacher="shapes-64-teacher",
              resolution=64, steps=4, timesteps=(999, 749, 499, 249), nasa_alpha=0.5,
              licence="Apache-2.0 (trained by this project)", memory_gb=0.1, onnx="build",
              description="embedded four-step DMD2 student (backward simulation)"),
    ModelSpec("shapes-64-msd", "sd", "student", f"{SHAPES_DIR}/msd", teacher="shapes-64-teacher", resolution=64,
              steps=1, timesteps=(999,), nasa_alpha=0.5, licence="Apache-2.0 (trained by this project)",
              memory_gb=0.1, description="embedded multi-student (MSD) one-step model, routed by prompt category"),
    ModelSpec("stabilityai/sd-turbo", "sd", "student", "stabilityai/sd-turbo",
              teacher="stabilityai/stable-diffusion-2-1-base", steps=1, timesteps=(999,), nasa_alpha=0.2,
              licence="Stability AI Non-Commercial Research Community License", memory_gb=3.0,
              description="ADD-distilled SD 2.1, 512px"),
    ModelSpec("stabilityai/stable-diffusion-2-1-base", "sd", "teacher", "stabilityai/stable-diffusion-2-1-base",
              steps=25, guidance_scale=7.5, licence="CreativeML Open RAIL++-M", memory_gb=3.5,
              controlnets=(("canny", "thibaud/controlnet-sd21-canny-diffusers"),),
              description="SD 2.1 base (teacher of SD-Turbo)"),
    ModelSpec("stabilityai/sdxl-turbo", "sdxl", "student", "stabilityai/sdxl-turbo",
              teacher="stabilityai/stable-diffusion-xl-base-1.0", steps=1, timesteps=(999,), nasa_alpha=0.2,
              licence="Stability AI Non-Commercial Research Community License", memory_gb=8.0,
              description="ADD-distilled SDXL, 512px"),
    ModelSpec("stabilityai/stable-diffusion-xl-base-1.0", "sdxl", "teacher",
              "stabilityai/stable-diffusion-xl-base-1.0", resolution=1024, steps=30, guidance_scale=7.0,
              licence="CreativeML Open RAIL++-M", memory_gb=10.0,
              controlnets=(("canny", "diffusers/controlnet-canny-sdxl-1.0"),), description="SDXL base 1.0"),
    ModelSpec("tianweiy/DMD2-sdxl-1step", "sdxl", "student", "stabilityai/stable-diffusion-xl-base-1.0",
              teacher="stabilityai/stable-diffusion-xl-base-1.0", resolution=1024, steps=1, timesteps=(399,),
              nasa_alpha=0.2, licence="CC-BY-NC-4.0", memory_gb=10.0,
              unet=("tianweiy/DMD2", "dmd2_sdxl_1step_unet_fp16.bin"),
              description="DMD2 one-step SDXL UNet (published only as a pickle: refused, see loading.py)"),
    ModelSpec("tianweiy/DMD2-sdxl-4step", "sdxl", "student", "stabilityai/stable-diffusion-xl-base-1.0",
              teacher="stabilityai/stable-diffusion-xl-base-1.0", resolution=1024, steps=4,
              timesteps=(999, 749, 499, 249), nasa_alpha=0.2, licence="CC-BY-NC-4.0", memory_gb=10.0,
              lora=("tianweiy/DMD2", "dmd2_sdxl_4step_lora_fp16.safetensors"),
              description="DMD2 four-step SDXL (LoRA fused into SDXL base)"),
    ModelSpec("Efficient-Large-Model/Sana_Sprint_0.6B_1024px_diffusers", "sana", "student",
              "Efficient-Large-Model/Sana_Sprint_0.6B_1024px_diffusers", resolution=1024, steps=2,
              guidance_scale=4.5, licence="NVIDIA Open Model License", memory_gb=6.0,
              description="SANA-Sprint 0.6B (sCM + LADD), plain generation"),
    ModelSpec("black-forest-labs/FLUX.1-schnell", "flux", "student", "black-forest-labs/FLUX.1-schnell",
              resolution=1024, steps=4, licence="Apache-2.0", memory_gb=34.0,
              description="FLUX.1 schnell (timestep-distilled), plain generation"),
]}

DEFAULT_MODEL = "shapes-64"

# reward models for ReNO on hub models (CLIPModel folders in hub layout; `prefetch` fetches them)
REWARD_MODELS = {"clip": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "pickscore": "yuvalkirstain/PickScore_v1"}
# tiny decoders (diffusers AutoencoderTiny, safetensors) per family, for the --tiny-decoder option
TINY_DECODERS = {"sd": "madebyollin/taesd", "sdxl": "madebyollin/taesdxl"}
# the embedded world's own (training/methods/tiny_decoder.py): its VAE's 8-channel latents, not SD's
SHAPES_TINY_DECODER = f"{SHAPES_DIR}/tiny-decoder"


SHAPES_RECIPE = f"python -m training.recipes.shapes --out {SHAPES_DIR}"
_SHAPES_STAGES = {"shapes-64": "student", "shapes-64-teacher": "teacher", "shapes-64-4step": "student_4step",
                  "shapes-64-msd": "msd"}


def install_hint(spec: ModelSpec) -> str:
    """The command that puts a missing model on this machine: the recipe stage that builds an embedded
    model, else the hub prefetch."""
    if spec.is_local:
        stage = _SHAPES_STAGES.get(spec.id)
        return f"{SHAPES_RECIPE} --stages {stage}" if stage else SHAPES_RECIPE
    return f"python -m pipelines prefetch {spec.id}"


def tiny_decoder_source(spec: ModelSpec) -> str | None:
    """The AutoencoderTiny a plain `--tiny-decoder` uses for a model: the shapes-64 one for models of the
    embedded world (as a path under the repo root), else the family's TAESD repo, else None."""
    if in_shapes_world(spec):
        return str(ROOT / SHAPES_TINY_DECODER)
    return TINY_DECODERS.get(spec.family)


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; ours is a sentence
        return self.args[0]


def get(model_id: str) -> ModelSpec:
    """The spec of a registry id, or of a local model folder given by path."""
    if model_id in MODELS:
        return MODELS[model_id]
    path = Path(str(model_id)[:4096]).expanduser()
    if path.is_dir() and ((path / "model_index.json").is_file() or (path / "msd.json").is_file()):
        return local_spec(path)
    if path.exists():  # a file or a bare folder: loading.py says exactly what is wrong with it
        return ModelSpec(str(model_id), "sd", "student", str(path.resolve()), description="local path")
    raise UnknownModelError(f"unknown model {str(model_id)[:100]!r}; allowed: {', '.join(MODELS)} "
                            "or a local folder holding a model_index.json")


def local_spec(path: Path, role: str = "student") -> ModelSpec:
    """A spec for a diffusers folder outside the registry (family read from its model_index.json)."""
    import json

    if (Path(path) / "msd.json").is_file():  # a multi-student model: its students share one spec
        meta = json.loads((Path(path) / "msd.json").read_text())
        return ModelSpec(str(path), "sd", "student", str(Path(path).resolve()), teacher=meta.get("teacher"),
                         resolution=meta.get("resolution", 512), steps=meta.get("steps", 1),
                         timesteps=tuple(meta["timesteps"]) if meta.get("timesteps") else None,
                         nasa_alpha=meta.get("nasa_alpha", DEFAULT_NASA_ALPHA),
                         description="local multi-student (MSD) folder")
    index = json.loads((Path(path) / "model_index.json").read_text())
    cls = index.get("_class_name", "")
    family = "sdxl" if "XL" in cls else "flux" if "Flux" in cls else "sana" if "Sana" in cls else "sd"
    extras = dict(json.loads((Path(path) / "onestep.json").read_text())) if (Path(path) / "onestep.json").is_file() else {}
    role = extras.get("role", role)
    return ModelSpec(str(path), family, role, str(Path(path).resolve()),
                     teacher=extras.get("teacher"), resolution=extras.get("resolution", _native_size(Path(path))),
                     steps=extras.get("steps", 1), timesteps=tuple(extras["timesteps"]) if extras.get("timesteps") else None,
                     guidance_scale=extras.get("guidance_scale", 0.0),
                     guidance_rescale=extras.get("guidance_rescale", 0.0),
                     nasa_alpha=extras.get("nasa_alpha", DEFAULT_NASA_ALPHA if role == "student" else 0.0),
                     controlnets=_adapters(path, extras.get("controlnets")), nct=_adapters(path, extras.get("nct")),
                     description=f"local {cls} folder")


def _adapters(folder: Path, entries: dict | None) -> tuple[tuple[str, str], ...]:
    """onestep.json's {"canny": "nct-canny"} -> (("canny", "<folder>/nct-canny"),); relative to the folder."""
    return tuple((k, str(Path(folder) / v) if not Path(v).is_absolute() and (Path(folder) / v).exists() else v)
                 for k, v in (entries or {}).items())


def in_shapes_world(spec: ModelSpec) -> bool:
    """A model of the embedded world (scored by its tiny CLIP): a shapes-64 id, a folder under
    assets/models/shapes-64, or a student distilled from one of those."""
    shapes_root = (ROOT / SHAPES_DIR).resolve()
    for s in (spec, MODELS.get(spec.teacher or "") or (local_teacher(spec) if spec.teacher else None)):
        if s is None:
            continue
        if s.id.startswith("shapes-64") or (s.is_local and shapes_root in (s.path.resolve(), *s.path.resolve().parents)):
            return True
    return False


def local_teacher(spec: ModelSpec) -> ModelSpec | None:
    try:
        return get(spec.teacher)
    except UnknownModelError:
        return None


# components a distilled student never changes: saved once, in its teacher's folder (see component_folder)
SHARED_COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
LORA_FILE = "pytorch_lora_weights.safetensors"  # a LoRA student's adapter, beside its onestep.json (diffusers' name)


def component_folder(path: str | Path, name: str) -> Path:
    """Where a model folder's component `name` lives: its own subfolder, or else that of the folder its
    onestep.json names in "components_from" (relative to it) -- a student saved beside its local
    teacher keeps its own UNet and scheduler and borrows the VAE, text encoder and tokenizer. The UNet
    comes from "unet_from" when it names a folder: a LoRA student (its adapter in LORA_FILE) on another
    student's UNet, as MSD's students are."""
    import json

    own = Path(path) / name
    meta = Path(path) / "onestep.json"
    if own.is_dir() or not meta.is_file():
        return own
    data = json.loads(meta.read_text())
    source = (name == "unet" and data.get("unet_from")) or data.get("components_from")
    return (Path(path) / source / name).resolve() if source else own


def _native_size(path: Path) -> int:
    """UNet sample size x VAE scale factor, read from the configs (512 when they do not say)."""
    import json

    try:
        unet = json.loads((component_folder(path, "unet") / "config.json").read_text())
        vae = json.loads((component_folder(path, "vae") / "config.json").read_text())
        return max(64, int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1))
    except (OSError, KeyError, ValueError, TypeError):
        return 512


def installed(spec: ModelSpec) -> bool:
    """True when the model's weights are on this machine (local folder present, or hub files cached)."""
    if spec.is_local:
        return (spec.path / "model_index.json").is_file() or (spec.path / "msd.json").is_file()
    from .loading import hub_cached

    return hub_cached(spec)


def exports_root() -> Path:
    """Where the Train tab and `python -m training export` write model folders ($ONESTEP_RUNS/exports)."""
    import os

    return Path(os.environ.get("ONESTEP_RUNS", ROOT / "runs")) / "exports"


def local_models(root: str | Path | None = None) -> list[str]:
    """Model folders exported from training runs (newest first), as the paths the model boxes take."""
    folder = Path(root) if root is not None else exports_root()
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
             and ((p / "model_index.json").is_file() or (p / "msd.json").is_file())]
    return [str(p) for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]
