"""The only code that reads model weights.

Rules, each enforced before any weight byte is deserialized:
- safetensors only: pickles (.bin/.ckpt/.pt/.pth/.pkl) are refused, never opened; every .safetensors
  file's header is checked against its size, so a truncated or corrupt file is a clear error;
- the pipeline class and every component class named in model_index.json must be on an allowlist;
  no remote code, no custom pipelines;
- a hub model that is not in the local cache while the network is unavailable (or HF_HUB_OFFLINE=1)
  gives one message naming `python -m pipelines prefetch <id>`.
Loaded pipelines are cached per (model, device, dtype); a failed load leaves the cache untouched,
so the app keeps serving what it had.
"""
from __future__ import annotations

import importlib
import json
import os
import struct
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from .errors import first_line
from .registry import (LORA_FILE, REWARD_MODELS, SHAPES_RECIPE, SHARED_COMPONENTS, TINY_DECODERS, ModelSpec,
                       component_folder, get, install_hint)

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
ALLOWED_PIPELINES = {
    "StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
    "SanaSprintPipeline": "sana", "SanaPipeline": "sana", "FluxPipeline": "flux",
}
ALLOWED_COMPONENTS = {
    "diffusers": {
        "UNet2DConditionModel", "AutoencoderKL", "AutoencoderTiny", "AutoencoderDC", "ControlNetModel",
        "FluxTransformer2DModel", "SanaTransformer2DModel",
        "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LCMScheduler", "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "FlowMatchEulerDiscreteScheduler",
        "SCMScheduler", "TCDScheduler",
    },
    "transformers": {
        "CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTokenizer", "CLIPTokenizerFast", "T5EncoderModel",
        "T5TokenizerFast", "Gemma2Model", "GemmaTokenizer", "GemmaTokenizerFast",
    },
}
# optional parts of SD pipelines that the app never uses; they are not loaded at all
SKIPPED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")
WEIGHTLESS = ("tokenizer", "tokenizer_2", "scheduler")
WEIGHT_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors"]
MAX_HEADER = 100 * 1024 * 1024


class LoadError(ValueError):
    """A model that cannot be loaded safely; the message says why and what is allowed."""


class ModelNotAvailable(LoadError):
    """A hub model that is not on this machine."""


def prefetch_hint(model_id: str) -> str:
    return f"python -m pipelines prefetch {model_id}"


def check_safetensors(path: Path) -> None:
    """Validate a .safetensors file's header against its size without loading tensors."""
    safetensors_header(path)


def safetensors_header(path: Path) -> dict:
    """A .safetensors file's header (tensor names, dtypes, shapes, offsets), checked against the file's size."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise LoadError(f"corrupt safetensors file {path}: shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > min(MAX_HEADER, size - 8):
                raise LoadError(f"corrupt or truncated safetensors file {path}: header of {n} bytes "
                                f"does not fit in a {size}-byte file")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"corrupt safetensors file {path}: unreadable header ({e.__class__.__name__})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise LoadError(f"truncated or corrupt safetensors file {path}: header describes {8 + n + end} bytes, "
                        f"file has {size}; re-download or re-export it")
    return header


def check_folder(path: Path) -> str:
    """Validate a diffusers pipeline folder; return its pipeline class name."""
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise LoadError(f"{path} is not a diffusers model folder (no model_index.json)")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as e:
        raise LoadError(f"{index_file} is not valid JSON ({e.msg})") from None
    cls = index.get("_class_name")
    if cls not in ALLOWED_PIPELINES:
        raise LoadError(f"pipeline class {cls!r} in {index_file} is not allowed; allowed: "
                        f"{', '.join(sorted(ALLOWED_PIPELINES))}")
    for name, value in index.items():
        if name.startswith("_") or name in SKIPPED_COMPONENTS or not isinstance(value, list):
            continue
        lib, comp = (value + [None, None])[:2]
        if lib is None and comp is None:
            continue
        if comp not in ALLOWED_COMPONENTS.get(lib, ()):
            raise LoadError(f"component {name!r} has class {lib}.{comp}, which is not allowed; allowed: "
                            f"{', '.join(sorted(ALLOWED_COMPONENTS['diffusers'] | ALLOWED_COMPONENTS['transformers']))}")
        sub = component_folder(path, name)
        if name in WEIGHTLESS or not sub.is_dir():
            continue
        tensors = sorted(sub.glob("*.safetensors"))
        if not tensors:
            pickles = [p.name for p in sub.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                raise LoadError(f"{sub} holds only pickle weights ({', '.join(pickles)}); OneStep Studio loads "
                                ".safetensors only (pickles can run code when opened)")
            raise LoadError(f"{sub} has no .safetensors weights")
        for t in tensors:
            check_safetensors(t)
    return cls


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


_SNAPSHOTS: dict[str, Path] = {}  # repo -> its cached snapshot: the lookup is slow, and asked per request


def hub_snapshot(repo: str, download: bool = False) -> Path:
    """Local folder of a hub repo's safetensors snapshot; downloads only when `download`. A found local
    snapshot is remembered (a download, `prefetch` or `clear_cache` looks again)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if not download and repo in _SNAPSHOTS and _SNAPSHOTS[repo].is_dir():
        return _SNAPSHOTS[repo]
    try:
        path = Path(snapshot_download(repo, allow_patterns=WEIGHT_PATTERNS, ignore_patterns=["*.fp16.*", "*non_ema*"],
                                      local_files_only=not download))
        _SNAPSHOTS[repo] = path
        return path
    except LocalEntryNotFoundError:
        raise ModelNotAvailable(f"model {repo} is not on this machine and cannot be downloaded now; "
                                f"fetch it with: {prefetch_hint(repo)}") from None
    except Exception as e:  # network errors surface as many classes; say what to do, once
        raise ModelNotAvailable(f"could not fetch {repo} ({e.__class__.__name__}); check the network, then run: "
                                f"{prefetch_hint(repo)}") from None


def hub_file(repo: str, filename: str, download: bool = False) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if not filename.endswith(".safetensors"):
        raise LoadError(f"{repo}/{filename} is a pickle; OneStep Studio loads .safetensors only "
                        "(convert it to safetensors yourself and give the folder as --model)")
    try:
        return Path(hf_hub_download(repo, filename, local_files_only=not download))
    except LocalEntryNotFoundError:
        raise ModelNotAvailable(f"{repo}/{filename} is not on this machine; fetch it with: "
                                f"{prefetch_hint(repo)}") from None


def hub_cached(spec: ModelSpec) -> bool:
    try:
        hub_snapshot(spec.source)
        if spec.lora:
            hub_file(*spec.lora)
        return spec.unet is None
    except LoadError:
        return False


def prefetch(model_id: str) -> list[Path]:
    """Download a hub model's safetensors (with progress); return the local folders/files."""
    if model_id in REWARD_MODELS.values() or model_id in TINY_DECODERS.values():
        return [hub_snapshot(model_id, download=True)]
    spec = get(model_id)
    if spec.is_local:
        check_folder(spec.path)
        return [spec.path]
    if spec.unet:  # refuse before downloading gigabytes we will not load
        hub_file(*spec.unet)
    got = [hub_snapshot(spec.source, download=True)]
    if spec.lora:
        got.append(hub_file(*spec.lora, download=True))
    return got


def model_folder(spec: ModelSpec) -> Path:
    """Resolve and validate the folder a spec loads from."""
    if spec.is_local:
        path = spec.path
        if path.is_file():
            kind = "a pickle" if path.suffix in PICKLE_SUFFIXES else "a single file"
            raise LoadError(f"{path} is {kind}; give a diffusers folder with .safetensors weights "
                            "(single-file and pickle checkpoints are not loaded)")
        if not path.is_dir():
            raise ModelNotAvailable(f"model folder {path} does not exist; build it with: {install_hint(spec)}")
    else:
        path = hub_snapshot(spec.source)
    if spec.unet:
        hub_file(*spec.unet)  # raises: the only published UNet is a pickle
    check_folder(path)
    return path


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    return torch.float16 if str(device).startswith("cuda") else torch.float32


def load_pipeline(model_id: str, device: str | None = None, dtype: torch.dtype | None = None, cache: bool = True):
    """Load (or return the cached) diffusers pipeline of a registry id or local folder.

    `cache=False` loads a private copy (training mutates its pipeline: adapters, requires_grad)."""
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    key = (model_id, str(device), str(dtype))
    with _LOCK:
        if cache and key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    spec = get(model_id)
    path = model_folder(spec)
    pipe = _from_folder(path, spec, dtype).to(device)
    vae = getattr(pipe, "vae", None)
    if vae is not None and dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)  # SD/SDXL VAEs overflow in fp16; onestep.decode casts latents to the VAE's dtype
    if spec.lora:
        pipe.load_lora_weights(str(_checked(hub_file(*spec.lora))))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    if spec.is_local and (path / LORA_FILE).is_file():  # a LoRA student on a borrowed UNet (unet_from): UNet keys only
        _checked(path / LORA_FILE)
        pipe.unet.load_lora_adapter(str(path), weight_name=LORA_FILE, prefix="unet", adapter_name="student")
        pipe.unet.fuse_lora()
        pipe.unet.unload_lora()
    pipe.set_progress_bar_config(disable=True)
    if not cache:
        return pipe
    with _LOCK:
        _CACHE[key] = pipe
        while len(_CACHE) > MAX_LOADED:
            _CACHE.popitem(last=False)
    return pipe


def _checked(path: Path) -> Path:
    check_safetensors(path)
    return path


def _from_folder(path: Path, spec: ModelSpec, dtype: torch.dtype):
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()  # e.g. "image processor falls back to PIL" notices
    cls_name = check_folder(path)
    cls = getattr(diffusers, cls_name)
    index = json.loads((path / "model_index.json").read_text())
    kwargs = {name: None for name in SKIPPED_COMPONENTS if name in index}
    if cls_name == "StableDiffusionPipeline":
        kwargs["requires_safety_checker"] = False
    try:
        with _READ_LOCK:
            for name, value in index.items():  # components borrowed from another folder (component_folder)
                sub = component_folder(path, name)
                if isinstance(value, list) and None not in value and sub != path / name and sub.is_dir():
                    part = getattr(importlib.import_module(value[0]), value[1])
                    extra = {} if name in WEIGHTLESS else dict(dtype=dtype, use_safetensors=True)
                    kwargs[name] = part.from_pretrained(str(sub), local_files_only=True, **extra)
            return cls.from_pretrained(str(path), dtype=dtype, use_safetensors=True, local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        first = first_line(e, 300)
        raise LoadError(f"could not load {spec.id}: {first}") from None


_CONTROL_CACHE: OrderedDict = OrderedDict()


def load_controlnet(source: str | Path, device: str | None = None, dtype: torch.dtype | None = None):
    """A diffusers ControlNetModel folder (a ControlNet or an NCT adapter) or cached hub repo,
    safetensors only; cached per (source, device, dtype, weights' mtimes): retrained in place, reloaded."""
    from diffusers import ControlNetModel

    device = device or default_device()
    dtype = dtype or default_dtype(device)
    path = local_folder(source)
    stamp = tuple((p.name, p.stat().st_mtime_ns) for p in sorted(path.glob("*.safetensors"))) if path.is_dir() else ()
    key = (str(source), str(device), str(dtype), stamp)
    with _LOCK:
        if key in _CONTROL_CACHE:
            _CONTROL_CACHE.move_to_end(key)
            return _CONTROL_CACHE[key]
    cfg = _weights_folder(path, source, "ControlNet", f"control model {source} does not exist" + (
        f"; the embedded ones are built by: {SHAPES_RECIPE}"
        if "shapes-64" in str(source) else ""))
    if cfg.get("_class_name") != "ControlNetModel":
        raise LoadError(f"{source} is not a ControlNet folder (config class {cfg.get('_class_name')!r}; "
                        "allowed: 'ControlNetModel')")
    try:
        with _READ_LOCK:
            model = ControlNetModel.from_pretrained(str(path), use_safetensors=True, local_files_only=True,
                                                    dtype=dtype)
        model = model.to(device).eval()
    except (OSError, ValueError, RuntimeError) as e:
        raise LoadError(f"could not load control model {source}: {first_line(e)}") from None
    with _LOCK:
        _CONTROL_CACHE[key] = model
        while len(_CONTROL_CACHE) > MAX_LOADED:
            _CONTROL_CACHE.popitem(last=False)
    return model


def load_clip(path: str | Path, device: str | None = None, tokenizer_path: str | Path | None = None):
    """A CLIPModel + CLIPTokenizer folder (the CLIP-score / reward model), safetensors only.

    `path` may also be a hub repo id (from the local cache only: `prefetch` fetches it); the tokenizer
    comes from `tokenizer_path` when the weights' repo has none (PickScore uses the LAION CLIP's)."""
    from transformers import CLIPModel, CLIPTokenizer

    source, path = path, local_folder(path)
    cfg = _weights_folder(path, source, "CLIP", f"CLIP model folder {path} does not exist")
    if cfg.get("model_type") != "clip":
        raise LoadError(f"{path} is not a CLIP model folder (config model_type {cfg.get('model_type')!r}; allowed: 'clip')")
    with _READ_LOCK:
        model = CLIPModel.from_pretrained(str(path), use_safetensors=True, local_files_only=True).eval()
    tok = CLIPTokenizer.from_pretrained(str(local_folder(tokenizer_path) if tokenizer_path else path), local_files_only=True)
    return model.to(device or default_device()), tok


def _weights_folder(path: Path, source, what: str, missing: str) -> dict:
    """The checks every single-model loader makes before loading: the folder exists (else `missing`), it
    holds .safetensors weights (pickles are named, never loaded), each header fits its file. Returns
    the folder's config.json (empty when absent)."""
    if not path.is_dir():
        raise ModelNotAvailable(missing)
    tensors = sorted(path.glob("*.safetensors"))
    if not tensors:
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        fetch = f"; fetch them with: {prefetch_hint(str(source))}" if not Path(source).exists() else ""
        raise LoadError(f"{source} holds no .safetensors {what} weights" + (
            f" (only pickles: {', '.join(pickles)}, which are not loaded)" if pickles else fetch))
    for t in tensors:
        check_safetensors(t)
    return json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}


def check_clip_available(source: str | Path, weights: bool = True) -> None:
    """Raise LoadError (what is missing, how to fetch it) unless a CLIP folder or cached repo is here."""
    path = local_folder(source)
    if not path.is_dir():
        raise ModelNotAvailable(f"CLIP model folder {path} does not exist")
    if weights and not any(path.glob("*.safetensors")):
        raise LoadError(f"{source} has no .safetensors weights here; fetch them with: {prefetch_hint(str(source))}")


def local_folder(source: str | Path) -> Path:
    """A folder as is, or a hub repo id resolved to its cached snapshot (never downloads)."""
    path = Path(source)
    if path.exists() or not _looks_like_repo(str(source)):
        return path
    return hub_snapshot(str(source))


def _looks_like_repo(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


def load_state_dict(path: str | Path) -> dict:
    """Tensors of one .safetensors file, header checked first (reward heads, converted checkpoints)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise LoadError(f"{path} is a pickle; OneStep Studio loads .safetensors only")
    if not path.is_file():
        raise ModelNotAvailable(f"{path} does not exist")
    check_safetensors(path)
    return load_file(str(path))


def load_noise(path: str | Path) -> tuple[torch.Tensor, dict]:
    """An initial-noise file written by ReNO: the tensor and the settings in its metadata."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path.name} is not a .safetensors noise file; allowed: files exported by Refine")
    check_safetensors(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if "noise" not in f.keys():
            raise ValueError(f"{path.name} holds no 'noise' tensor; allowed: files exported by Refine")
        noise = f.get_tensor("noise")
    return noise, json.loads(meta.get("onestep-settings", "{}"))


def weights_fingerprint(folder: str | Path) -> str:
    """A short hash of a model folder's weights and configs (what an ONNX export was made from).

    Files up to 64 MB are hashed whole; larger ones by size and safetensors header (hashing gigabytes
    on every start would cost seconds). The `onnx/` subfolder is not part of it. Memoized per file
    (path, size, mtime), so a rewritten checkpoint is hashed again."""
    import hashlib

    folder = Path(folder)
    h = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".txt")
                   and p.relative_to(folder).parts[0] != "onnx" and not p.name.startswith("."))
    roots = {p: folder for p in files}
    for name in (*SHARED_COMPONENTS, "unet"):  # borrowed components count as the folder's own
        sub = component_folder(folder, name)
        if sub != folder / name and sub.is_dir():
            roots.update({p: sub.parent for p in sorted(sub.rglob("*")) if p.is_file()})
    for p, root in roots.items():
        st = p.stat()
        key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _FINGERPRINTS:
            _FINGERPRINTS[key] = _file_digest(p, st.st_size)
        h.update(f"{p.relative_to(root).as_posix()}:{st.st_size}:{_FINGERPRINTS[key]};".encode())
    return h.hexdigest()[:16]


def _file_digest(path: Path, size: int) -> str:
    if size <= 64 * 1024 * 1024:
        return file_sha256(path)
    import hashlib

    with open(path, "rb") as f:  # size + safetensors header: names, shapes, dtypes and offsets of every tensor
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 and path.suffix == ".safetensors" else 0
        return hashlib.sha256(head + f.read(min(n, MAX_HEADER))).hexdigest()


_DIGESTS: dict = {}


def file_sha256(path: Path) -> str:
    """sha256 of a whole file, remembered per (path, size, mtime): a rewritten file is hashed again."""
    import hashlib

    st = Path(path).stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


ONNX_MANIFEST = "onestep-onnx.json"
ONNX_FORMAT = 1
ONNX_REEXPORT = "re-export it with: python -m pipelines export-onnx --model ID --out DIR"


def onnx_providers() -> list[str]:
    """CUDA when onnxruntime-gpu and a GPU are here, else the CPU provider."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def read_onnx_manifest(folder: str | Path) -> dict:
    """The manifest of an ONNX export folder (written by onnx_export.export), checked for format."""
    path = Path(folder) / ONNX_MANIFEST
    if not path.is_file():
        raise ModelNotAvailable(f"{folder} is not an ONNX export of OneStep Studio (no {ONNX_MANIFEST}); "
                                f"make one with: python -m pipelines export-onnx --model ID --out DIR")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"corrupt ONNX manifest {path}: not valid JSON ({e.__class__.__name__}); {ONNX_REEXPORT}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ONNX_FORMAT or not isinstance(manifest.get("graphs"), dict):
        raise LoadError(f"{path} is not a format-{ONNX_FORMAT} OneStep ONNX manifest; {ONNX_REEXPORT}")
    return manifest


def check_onnx_file(folder: Path, entry: dict) -> Path:
    """An exported graph file, checked against the size and sha256 its manifest recorded."""
    name = str(entry.get("file", ""))
    if not name.endswith(".onnx") or Path(name).name != name:
        raise LoadError(f"ONNX manifest in {folder} names {name[:80]!r}; allowed: a .onnx file in that folder")
    path = folder / name
    if not path.is_file():
        raise LoadError(f"ONNX graph {path} is missing; {ONNX_REEXPORT}")
    size = path.stat().st_size
    if size != entry.get("bytes"):
        raise LoadError(f"corrupt or truncated ONNX graph {path}: {size} bytes where the export wrote "
                        f"{entry.get('bytes')}; {ONNX_REEXPORT}")
    if file_sha256(path) != entry.get("sha256"):
        raise LoadError(f"corrupt ONNX graph {path}: its checksum differs from the export's; {ONNX_REEXPORT}")
    return path


def load_onnx(folder: str | Path, threads: int | None = None, providers: list[str] | None = None):
    """ONNX Runtime sessions of an export folder: (manifest, {graph: InferenceSession}, [tokenizers]).

    Every graph file is checked against the manifest's size and sha256 before ONNX Runtime parses it,
    so a corrupt or truncated file is a LoadError that says so. Graphs come only from this project's
    own export (never downloaded); the tokenizers are the model's, copied beside them."""
    import onnxruntime as ort
    from transformers import CLIPTokenizer

    folder = Path(folder)
    manifest = read_onnx_manifest(folder)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    # no busy-waiting between ops: spinning ORT threads fight PyTorch's own threads (noise, images) for the
    # cores; measured on 2 cores: 19.6 -> 41.7 images/s at batch 1 (tiny decoder: 44 -> 96)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3  # warnings about unused initializers are noise here
    sessions = {}
    for name, entry in manifest["graphs"].items():
        path = check_onnx_file(folder, entry)
        try:
            sessions[name] = ort.InferenceSession(str(path), opts, providers=providers or onnx_providers())
        except Exception as e:  # onnxruntime raises its own exception classes for a bad graph
            first = first_line(e, 200)
            raise LoadError(f"corrupt ONNX graph {path}: ONNX Runtime cannot load it ({first}); {ONNX_REEXPORT}") from None
    tokenizers = []
    for sub in manifest.get("tokenizers", []):
        if Path(sub).name != sub or not (folder / sub).is_dir():
            raise LoadError(f"ONNX export {folder} lacks its tokenizer folder {str(sub)[:80]!r}; {ONNX_REEXPORT}")
        tokenizers.append(CLIPTokenizer.from_pretrained(str(folder / sub), local_files_only=True))
    return manifest, sessions, tokenizers


def load_tiny_decoder(source: str | Path, device: str | None = None, dtype: torch.dtype | None = None):
    """A diffusers AutoencoderTiny (TAESD, TAESDXL) from a local folder or a cached hub repo; safetensors only."""
    from diffusers import AutoencoderTiny

    path = local_folder(source)
    cfg = _weights_folder(path, source, "tiny-decoder", f"tiny decoder folder {path} does not exist")
    if cfg.get("_class_name") != "AutoencoderTiny":
        raise LoadError(f"{path} is not an AutoencoderTiny folder (class {cfg.get('_class_name')!r}; allowed: AutoencoderTiny)")
    device = device or default_device()
    with _READ_LOCK:
        vae = AutoencoderTiny.from_pretrained(str(path), dtype=dtype or default_dtype(device), use_safetensors=True,
                                              local_files_only=True)
    return vae.to(device).eval()


def loaded() -> list[tuple[str, str, str]]:
    with _LOCK:
        return list(_CACHE)


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()
        _CONTROL_CACHE.clear()
        _SNAPSHOTS.clear()


MAX_LOADED = 4
_LOCK = threading.Lock()
# one model construction at a time: diffusers builds models under accelerate's init_empty_weights, which
# patches torch.nn.Module for the whole process, so a load in another thread (the background ONNX
# build beside a request) could get parameters left on the meta device
_READ_LOCK = threading.RLock()
_CACHE: OrderedDict = OrderedDict()
_FINGERPRINTS: dict = {}
