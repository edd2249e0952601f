"""ONNX Runtime engine for one- to four-step UNet students: find an export, serve it.

The fastest published one-step stacks (StreamDiffusion, ONNX Runtime / TensorRT for SD-Turbo) win by
removing per-operation framework overhead. The graphs come from `onnx_export.py` (text encoder, UNet
returning the clean latent, a NASA UNet, VAE decoder, the model's tiny decoder when there is one);
`generate` here is `onestep.generate` on them:
same arguments, checks, seeded noise (and re-noising of few-step students), settings and timings, so
an image matches PyTorch within one 8-bit level. The CFG-style negative mode runs `unet` twice and
extrapolates x0 outside the graph. CUDA execution provider when onnxruntime-gpu and a GPU are there,
CPU provider otherwise.

A model's export is found, in order: the spec's `onnx` folder, `<model folder>/onnx/`, the cache
`~/.cache/onestep/onnx/<model>-<weights hash>` (`$ONESTEP_CACHE` moves it). An export whose weights
hash differs from the model's is stale and not used. A spec with onnx="build" (shapes-64) is exported
into the cache on first use, in the background, while PyTorch serves. Graph files are checked against
their recorded size and sha256 before ONNX Runtime opens them (loading.load_onnx).
"""
from __future__ import annotations

import os
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from . import loading, onestep, onnx_export, registry
from .errors import first_line
from .onnx_export import check_exportable, token_ids
from .registry import ModelSpec


class EngineError(loading.LoadError):
    """ONNX Runtime failed while running a graph (Generate falls back to PyTorch with a notice)."""


def export(model_id: str, out: str | Path, **kwargs) -> dict:
    """onnx_export.export, then forget engines and lookups made before it."""
    manifest = onnx_export.export(model_id, out, **kwargs)
    _ENGINES.clear()
    _FOUND.clear()
    return manifest


def cache_root() -> Path:
    return registry.cache_root() / "onnx"


def _slug(model_id: str) -> str:
    name = Path(model_id).name if ("/" in model_id and Path(model_id).exists()) else model_id
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[-60:] or "model"


def cache_folder(spec: ModelSpec, fingerprint: str | None = None) -> Path:
    """Where `export-onnx` without --out and the first-use build put this model's graphs (named by the
    fingerprint of its current weights; pass it when it is at hand)."""
    return cache_root() / f"{_slug(spec.id)}-{fingerprint or _fingerprint(spec)}"


def _fingerprint(spec: ModelSpec) -> str:
    return onnx_export.source_fingerprint(spec)


FIND_TTL = 2.0  # seconds a lookup is reused: live typing asks many times a second
_FOUND: dict = {}


def find(spec: ModelSpec, fresh: bool = False) -> tuple[Path | None, str]:
    """(ONNX folder, "") for a student whose export is present and made from its current weights;
    (None, why) otherwise ("" when there is simply no export). Reused for FIND_TTL seconds."""
    now = time.monotonic()
    hit = _FOUND.get(spec)
    if not fresh and hit is not None and now - hit[0] < FIND_TTL:
        return hit[1]
    found = _find(spec)
    _FOUND[spec] = (now, found)
    return found


def _find(spec: ModelSpec) -> tuple[Path | None, str]:
    if spec.onnx and spec.onnx != "build":
        p = Path(spec.onnx).expanduser()
        candidates = [p if p.is_absolute() else registry.ROOT / p]
    else:
        candidates = [spec.path / "onnx"] if spec.is_local else []
    try:
        current = _fingerprint(spec)
    except loading.LoadError:
        return None, ""
    candidates.append(cache_folder(spec, current))
    for folder in candidates:
        if not (folder / loading.ONNX_MANIFEST).is_file():
            continue
        manifest = loading.read_onnx_manifest(folder)
        if manifest.get("source_fingerprint") != current:
            return None, (f"the ONNX export in {folder} was made from other weights than {spec.id}'s; "
                          f"re-export with: python -m pipelines export-onnx --model {spec.id} --out {folder}")
        return folder, ""
    return None, ""


_BUILDS: dict[str, threading.Thread] = {}
_BUILD_ERRORS: dict[str, str] = {}
_BUILD_LOCK = threading.Lock()


def build_in_background(spec: ModelSpec) -> str:
    """Start (once per process) exporting `spec` into its cache folder; returns the notice to show."""
    target = cache_folder(spec)
    key = str(target)
    with _BUILD_LOCK:
        if key in _BUILD_ERRORS:
            return f"ONNX engine unavailable ({_BUILD_ERRORS[key]}); using PyTorch"
        thread = _BUILDS.get(key)
        if thread is None or not thread.is_alive():  # never started, or finished and its export is gone since
            def run():
                try:
                    export(spec.id, target)
                except Exception as e:  # reported on the next request's notice, not lost
                    _BUILD_ERRORS[key] = first_line(e, 200)

            thread = threading.Thread(target=run, name=f"onnx-export-{_slug(spec.id)}", daemon=True)
            _BUILDS[key] = thread
            thread.start()
    return "building the ONNX Runtime engine in the background (first use); PyTorch meanwhile"


def wait_for_builds(timeout: float | None = None) -> None:
    for thread in list(_BUILDS.values()):
        thread.join(timeout)


# ----------------------------------------------------------------------------------------- serving

class Engine:
    """The sessions of one export folder and everything `generate` needs besides them."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        self.folder = Path(folder)
        self.manifest, self.sessions, self.tokenizers = loading.load_onnx(self.folder, threads=threads)
        m = self.manifest
        self.sdxl = len(self.tokenizers) == 2
        self.alphas = torch.tensor(m["alphas_cumprod"], dtype=torch.float32)
        self.channels, self.scale = int(m["latent_channels"]), int(m["vae_scale_factor"])
        self.prompts = onestep.PromptCache(256)  # dies with the engine: a re-export is a new engine
        self.text_encoder_runs = 0

    def encode(self, prompt: str, height: int, width: int, use_cache: bool = True) -> tuple[dict, str]:
        """Conditioning feeds of one prompt (batch 1): (feeds, "hit" | "miss" | "off")."""
        key = (self.manifest["model"], prompt, height, width)
        if use_cache:
            hit = self.prompts.get(key, self)
            if hit is not None:
                return hit, "hit"
        ids = [token_ids(tok, [prompt]) for tok in self.tokenizers]
        outs = self.run("text_encoder", dict(zip(("input_ids", "input_ids_2"), ids)))
        self.text_encoder_runs += 1
        feeds = {"prompt_embeds": outs[0]}
        if self.sdxl:
            feeds.update(text_embeds=outs[1], time_ids=np.array([[height, width, 0, 0, height, width]], np.float32))
        if use_cache:
            self.prompts.put(key, self, feeds)
        return feeds, ("miss" if use_cache else "off")

    def unsupported(self, spec: ModelSpec, negative_prompt: str, negative_mode: str, nasa_alpha, height=None,
                    width=None, tiny_decoder: bool = False) -> str:
        """Why this export cannot serve a request ("" when it can)."""
        if tiny_decoder and "tiny_decoder" not in self.sessions:
            why = self.manifest.get("not_exported", {}).get("tiny_decoder", "exported before it had one")
            return f"this ONNX export has no tiny decoder graph ({why})"
        alpha = spec.nasa_alpha if nasa_alpha is None else nasa_alpha
        multiple = int(self.manifest.get("size_multiple", 1))
        h, w = height or spec.resolution, width or spec.resolution
        if h % multiple or w % multiple:
            return f"the ONNX graphs take sizes that are multiples of {multiple}, not {h}x{w}"
        if negative_prompt and negative_mode == "nasa" and alpha != 0 and "unet_nasa" not in self.sessions:
            return "this ONNX export has no NASA graph (exported with --no-nasa)"
        if negative_prompt and negative_mode == "nasa" and alpha != 0 and spec.nasa_words_only:
            return (f"{spec.id} steers with the negative prompt's own words (nasa_words_only); the ONNX NASA graph "
                    "attends to all its tokens")
        return ""

    def unet(self, x: np.ndarray, t: int, cond: dict, negative: dict | None = None, alpha: float = 0.0) -> np.ndarray:
        feeds = {"sample": x, "timestep": np.full((x.shape[0],), t, np.int64), **cond}
        if negative is not None and alpha != 0:
            feeds.update(negative_embeds=negative["prompt_embeds"], nasa_alpha=np.array(alpha, np.float32))
            return self.run("unet_nasa", feeds)[0]
        return self.run("unet", feeds)[0]

    def run(self, graph: str, feeds: dict) -> list:
        try:
            return self.sessions[graph].run(None, feeds)
        except Exception as e:  # onnxruntime's own exception classes (Fail, InvalidArgument, ...)
            first = first_line(e, 200)
            raise EngineError(f"ONNX Runtime failed running {graph} ({first})") from None

    def denoise(self, cond: dict, noise: torch.Tensor, timesteps: list[int], generator: torch.Generator | None = None,
                negative: dict | None = None, guidance_scale: float = 1.0, negative_mode: str = "nasa",
                nasa_alpha: float = 0.0) -> np.ndarray:
        """`onestep.denoise` on the graphs: the same x0 chain and the same re-noising draws."""
        batch = noise.shape[0]
        cond_b = _repeat(cond, batch)
        neg_b = _repeat(negative, batch) if negative is not None and negative_mode == "cfg" else None
        x = noise.float().numpy()
        x0 = x
        for k, t in enumerate(timesteps):
            if negative is not None and negative_mode == "nasa":
                x0 = self.unet(x, t, cond_b, negative, nasa_alpha)
            else:
                x0 = self.unet(x, t, cond_b)
            if neg_b is not None:
                x0_neg = self.unet(x, t, neg_b)
                x0 = x0_neg + guidance_scale * (x0 - x0_neg)
            if k + 1 < len(timesteps):
                abar = self.alphas[timesteps[k + 1]]
                eps = torch.randn(tuple(x.shape), generator=generator)
                x = (abar.sqrt() * torch.from_numpy(x0) + (1 - abar).sqrt() * eps).numpy()
        return x0

    def decode(self, latents: np.ndarray, tiny: bool = False) -> np.ndarray:
        graph = "tiny_decoder" if tiny else "vae_decoder"
        return self.run(graph, {"latents": np.ascontiguousarray(latents, np.float32)})[0]


def _repeat(cond: dict, n: int) -> dict:
    return {k: np.repeat(v, n, axis=0) if v.shape[0] != n else v for k, v in cond.items()}


_ENGINES: OrderedDict = OrderedDict()
_ENGINE_LOCK = threading.Lock()


def load_engine(folder: str | Path, threads: int | None = None) -> Engine:
    """The engine of an export folder, cached per (folder, manifest time, threads)."""
    folder = Path(folder)
    manifest = folder / loading.ONNX_MANIFEST
    key = (str(folder.resolve()), manifest.stat().st_mtime_ns if manifest.is_file() else 0,
           threads or torch.get_num_threads())
    with _ENGINE_LOCK:
        if key in _ENGINES:
            _ENGINES.move_to_end(key)
            return _ENGINES[key]
    engine = Engine(folder, threads)
    with _ENGINE_LOCK:
        _ENGINES[key] = engine
        while len(_ENGINES) > 4:
            _ENGINES.popitem(last=False)
    return engine


def engine_for(spec: ModelSpec, build: str = "auto") -> tuple[Engine | None, str]:
    """(engine, notice) for a student. `build`: "now" exports into the cache when no export is found
    (and raises on failure); "auto" starts a background export for onnx="build" specs (unless
    ONESTEP_ONNX_BUILD=0) and serves None meanwhile; "never" only looks."""
    check_exportable(spec)
    folder, why = find(spec)
    if folder is None and not why and build == "now":
        folder, why = find(spec, fresh=True)  # a lookup of a moment ago may predate an export
    if folder is None and not why:
        if build == "now":
            folder = cache_folder(spec)
            export(spec.id, folder)
        elif build == "auto" and spec.onnx == "build" and os.environ.get("ONESTEP_ONNX_BUILD", "1") != "0":
            return None, build_in_background(spec)
        else:
            return None, ""
    if folder is None:
        return None, why
    return load_engine(folder), ""


def generate(engine: Engine, spec: ModelSpec, prompt: str, *, negative_prompt: str = "", guidance_scale: float = 2.0,
             steps: int | None = None, seed: int = 0, batch_size: int = 1, height: int | None = None,
             width: int | None = None, timesteps=None, noise: torch.Tensor | None = None,
             prediction_type: str | None = None, negative_mode: str = "nasa", nasa_alpha: float | None = None,
             prompt_cache: bool = True, tiny_decoder: bool = False) -> onestep.GenerationResult:
    """`onestep.generate` on ONNX Runtime: same arguments, checks, noise, settings and timings;
    `tiny_decoder` decodes with the export's AutoencoderTiny graph."""
    m = engine.manifest
    steps, height, width, nasa_alpha = onestep.resolve_request(spec, prompt, negative_prompt, steps, seed, batch_size,
                                                               height, width, negative_mode, nasa_alpha)
    if prediction_type not in (None, m["prediction_type"]):
        raise ValueError(f"the ONNX graphs predict {m['prediction_type']}; prediction type {prediction_type!r} "
                         "needs the PyTorch engine")
    why = engine.unsupported(spec, negative_prompt, negative_mode, nasa_alpha, height, width, tiny_decoder)
    if why:
        raise ValueError(f"{why}; use the PyTorch engine")
    seeds = [(seed + i) % (onestep.MAX_SEED + 1) for i in range(batch_size)]
    shape = (batch_size, engine.channels, height // engine.scale, width // engine.scale)
    t0 = time.perf_counter()
    cond, cache_state = engine.encode(prompt, height, width, prompt_cache)
    negative = engine.encode(negative_prompt, height, width, prompt_cache)[0] if negative_prompt else None
    t1 = time.perf_counter()
    if noise is None:
        noise = onestep.seeded_noise(seeds, (1, *shape[1:]))
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}; expected {shape}")
    ts = onestep.resolve_timesteps(spec, steps, timesteps, int(m["num_train_timesteps"]))
    gen = torch.Generator().manual_seed(seeds[0] + 1)
    latents = engine.denoise(cond, noise.detach().cpu(), ts, gen, negative, guidance_scale, negative_mode, nasa_alpha)
    t2 = time.perf_counter()
    images = engine.decode(latents, tiny_decoder)
    t3 = time.perf_counter()
    timings = {"text_encoding": t1 - t0, "denoising": t2 - t1, "decoding": t3 - t2, "total": t3 - t0}
    settings = onestep.request_settings(spec, prompt, negative_prompt, steps, seed, batch_size, height, width, ts,
                                        negative_mode, nasa_alpha, guidance_scale)
    if tiny_decoder:
        settings["decoder"] = "tiny"
    return onestep.GenerationResult(onestep.to_pil(torch.from_numpy(images)), timings, settings,
                                    {"engine": "onnx", "prompt_cache": cache_state,
                                     "decoder": "tiny" if tiny_decoder else "vae"})


def clear() -> None:
    """Forget every loaded engine (their sessions hold the graphs' memory)."""
    with _ENGINE_LOCK:
        _ENGINES.clear()
