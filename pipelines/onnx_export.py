"""Export a one- to four-step UNet student (SD or SDXL family) to ONNX graphs, verified against PyTorch.

`torch.onnx.export` with the TorchScript exporter (it runs offline and needs only the `onnx`
package), opset 17, batch, height and width dynamic, graph inputs and outputs always fp32 (weights
fp16 when traced on a GPU):

    text_encoder  input_ids (B, L) int64 [SDXL: + input_ids_2]  ->  prompt_embeds [SDXL: + text_embeds]
    unet          sample, timestep (B,) int64, prompt_embeds [SDXL: text_embeds, time_ids]  ->  x0
    unet_nasa     the same plus negative_embeds (1, L, D) and nasa_alpha ()  ->  x0
    vae_decoder   latents (as the UNet sees them)  ->  images in [-1, 1]

The UNet graphs return the clean-latent prediction of `onestep.predict_x0`,
x0 = f(eps | v | sample, x_t, abar_t), with the scheduler's alphas_cumprod baked in as a table indexed
by the timestep input, so one student step is one session run. `unet_nasa` is NASA (nasa.py) in every
cross-attention layer with the negative embedding and alpha as inputs: one graph serves every
negative prompt and strength.

Not exported: ControlNet / NCT adapters (the control model is chosen per request), the VAE encoder
(generation never encodes images), SANA and FLUX (no UNet), multi-student folders as a whole.

Every graph is run on the same inputs as PyTorch right after export (batch 2, real prompts, seeded
noise); the max abs difference per graph goes to `export-report.json` and the manifest, and an export
above TOLERANCE is refused. The folder is written beside its destination and renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import torch

from . import loading, msd, nasa, onestep, registry
from .errors import first_line
from .registry import ModelSpec

OPSET = 17
EXPORTER = f"torch.onnx.export (TorchScript exporter), opset {OPSET}"
TOLERANCE = {"float32": 1e-3, "float16": 5e-2}  # max abs difference ORT vs PyTorch per graph output
NOT_EXPORTED = {
    "controlnet/nct": "control models are picked per request; control images run on PyTorch",
    "vae_encoder": "generation never encodes images",
}



class _TextEncoder(torch.nn.Module):
    """Token ids -> the embeddings `onestep.encode_prompt` gives (SDXL: penultimate states of both towers + pooled)."""

    def __init__(self, pipe):
        super().__init__()
        self.te = pipe.text_encoder
        self.te2 = getattr(pipe, "text_encoder_2", None)

    def forward(self, input_ids, input_ids_2=None):
        if self.te2 is None:
            return self.te(input_ids)[0].float()
        a = self.te(input_ids, output_hidden_states=True)
        b = self.te2(input_ids_2, output_hidden_states=True)
        return torch.cat([a.hidden_states[-2], b.hidden_states[-2]], dim=-1).float(), b[0].float()


class _Denoiser(torch.nn.Module):
    """One UNet call and the clean-latent prediction of `onestep.predict_x0`, per-sample timesteps."""

    def __init__(self, unet, alphas_cumprod: torch.Tensor, prediction_type: str, sdxl: bool):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction type {prediction_type!r} is not supported; allowed: epsilon, v_prediction, sample")
        self.unet, self.ptype, self.sdxl = unet, prediction_type, sdxl
        self.register_buffer("alphas", alphas_cumprod.float().to(unet.device), persistent=False)

    def x0(self, sample, timestep, prompt_embeds, text_embeds=None, time_ids=None):
        dt = self.unet.dtype
        extra = {"text_embeds": text_embeds.to(dt), "time_ids": time_ids.to(dt)} if self.sdxl else None
        out = self.unet(sample.to(dt), timestep, encoder_hidden_states=prompt_embeds.to(dt),
                        added_cond_kwargs=extra).sample.float()
        return onestep.x0_from(self.alphas[timestep].view(-1, 1, 1, 1), out, sample.to(dt).float(), self.ptype)

    def forward(self, sample, timestep, prompt_embeds, text_embeds=None, time_ids=None):
        return self.x0(sample, timestep, prompt_embeds, text_embeds, time_ids)


class _NasaDenoiser(_Denoiser):
    """NASA with alpha as a graph input: traced with a non-zero example, so the subtraction stays in."""

    def forward(self, sample, timestep, prompt_embeds, negative_embeds, nasa_alpha, text_embeds=None, time_ids=None):
        dt = self.unet.dtype
        with nasa.applied(self.unet, negative_embeds.to(dt), nasa_alpha.to(dt)):
            return self.x0(sample, timestep, prompt_embeds, text_embeds, time_ids)


class _Decoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return onestep.decode(self, latents)  # `self.vae`, as a pipeline has it


# ----------------------------------------------------------------------------------------- export

def check_exportable(spec: ModelSpec) -> None:
    """One-line ValueError unless `spec` is a single UNet student."""
    if spec.role != "student":
        raise ValueError(f"{spec.id} is a {spec.role}; the ONNX engine serves one- to four-step students")
    if spec.family not in registry.UNET_FAMILIES:
        raise ValueError(f"{spec.id} is a {spec.family.upper()} model; ONNX export covers UNet students "
                         f"(families: {', '.join(registry.UNET_FAMILIES)})")
    if spec.is_local and msd.is_msd(spec.path):
        raise ValueError(f"{spec.id} is a multi-student folder; export each student folder inside it")


def export(model_id: str, out: str | Path, *, device: str | None = None, nasa_graph: bool = True,
           tiny_decoder: bool = True, progress=None) -> dict:
    """Export, verify against PyTorch and write an ONNX folder for a student; returns its manifest.

    `tiny_decoder`: also export the model's AutoencoderTiny decoder (registry.tiny_decoder_source) as
    the `tiny_decoder` graph when it is on this machine (its weights are part of `source_fingerprint`).

    The folder is written beside `out` and renamed into place when complete, so a crash never leaves a
    half export where the engine would find it. Raises ValueError (one line) when the model cannot be
    exported or an exported graph differs from PyTorch beyond TOLERANCE."""
    say = progress or (lambda msg: None)
    spec = registry.get(model_id)
    check_exportable(spec)
    out = _check_out(Path(out).expanduser())
    folder = loading.model_folder(spec)
    fingerprint = source_fingerprint(spec)
    t_start = time.perf_counter()
    # trace where the graphs will run: on the GPU (fp16) only when ONNX Runtime has the CUDA provider
    device = device or ("cuda" if "CUDAExecutionProvider" in loading.onnx_providers() else "cpu")
    pipe = loading.load_pipeline(model_id, device=device, cache=False)  # a private copy: export swaps processors
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if m is not None:
            m.eval().requires_grad_(False)
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    dtype = "float16" if pipe.unet.dtype == torch.float16 else "float32"
    timesteps = onestep.resolve_timesteps(spec, spec.steps, None, pipe.scheduler.config.num_train_timesteps)
    tmp = _staging(out)
    try:
        inputs = _sample_inputs(pipe, spec, timesteps)
        graphs = _graphs(pipe, pipe.scheduler.config.prediction_type, sdxl, nasa_graph, inputs)
        tiny, tiny_note = _tiny_decoder(spec, pipe, device) if tiny_decoder else (None, "not asked for")
        if tiny is not None:
            graphs["tiny_decoder"] = (_Decoder(tiny["vae"]), *graphs["vae_decoder"][1:])
        for name, (module, args, in_names, out_names, dyn) in graphs.items():
            say(f"exporting {name}")
            _export_one(module, args, tmp / f"{name}.onnx", in_names, out_names, dyn)
        say("verifying against PyTorch")
        report = _verify(tmp, graphs, dtype)
        tokenizers = ["tokenizer", "tokenizer_2"] if sdxl else ["tokenizer"]
        for sub in tokenizers:
            getattr(pipe, sub).save_pretrained(str(tmp / sub))
        manifest = {
            "format": loading.ONNX_FORMAT, "model": spec.id, "family": spec.family, "source": str(folder),
            "source_fingerprint": fingerprint, **_describe(pipe, spec, timesteps), "tokenizers": tokenizers,
            "graphs": {name: {**file_entry(tmp / f"{name}.onnx"), "inputs": g[2], "outputs": g[3]}
                       for name, g in graphs.items()},
            "verification": report, "not_exported": {**NOT_EXPORTED, **({} if nasa_graph else {"unet_nasa": "--no-nasa"}),
                                                     **({} if tiny else {"tiny_decoder": tiny_note})},
            **({"tiny_decoder": {"source": tiny["source"]}} if tiny else {}),
            "seconds": round(time.perf_counter() - t_start, 2),
        }
        (tmp / "export-report.json").write_text(json.dumps(
            {k: manifest[k] for k in ("model", "source_fingerprint", "exporter", "dtype", "device", "verification",
                                      "not_exported", "seconds")}, indent=2))
        (tmp / loading.ONNX_MANIFEST).write_text(json.dumps(manifest, indent=1))
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def source_fingerprint(spec: ModelSpec) -> str:
    """What an export is made from: the model folder's weights, and its tiny decoder's when that is on this
    machine -- so retraining either makes the export stale (and names another cache folder)."""
    fingerprint = loading.weights_fingerprint(loading.model_folder(spec))
    source = registry.tiny_decoder_source(spec)
    try:
        tiny = loading.local_folder(source) if source else None
    except (ValueError, OSError):
        tiny = None  # a hub tiny decoder that is not cached
    if tiny is None or not tiny.is_dir():
        return fingerprint
    return hashlib.sha256(f"{fingerprint}:{loading.weights_fingerprint(tiny)}".encode()).hexdigest()[:16]


def _tiny_decoder(spec: ModelSpec, pipe, device) -> tuple[dict | None, str]:
    """({"vae", "source"}, "") for the model's tiny decoder, or (None, why not)."""
    from . import speed

    try:
        vae = speed.tiny_decoder(spec, pipe, True, device, pipe.unet.dtype).eval().requires_grad_(False)
    except (ValueError, OSError) as e:
        return None, first_line(e, 200)
    return {"vae": vae, "source": str(registry.tiny_decoder_source(spec))}, ""


def _check_out(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not (out / loading.ONNX_MANIFEST).is_file():
        raise ValueError(f"--out {out} is a folder that holds other files; give a new or empty folder "
                         "(an earlier ONNX export there is replaced)")
    return out


def _staging(out: Path) -> Path:
    """An empty folder beside `out` to export into (stale ones of dead processes are removed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _describe(pipe, spec: ModelSpec, timesteps: list[int]) -> dict:
    """What serving needs besides the graphs: the scheduler's table, shapes, versions."""
    import onnxruntime

    return {
        "exporter": EXPORTER, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "dtype": "float16" if pipe.unet.dtype == torch.float16 else "float32", "device": str(pipe.unet.device),
        "prediction_type": pipe.scheduler.config.prediction_type,
        "num_train_timesteps": pipe.scheduler.config.num_train_timesteps,
        "alphas_cumprod": [float(a) for a in pipe.scheduler.alphas_cumprod],
        "steps": spec.steps, "timesteps": timesteps, "resolution": spec.resolution,
        "latent_channels": pipe.unet.config.in_channels, "vae_scale_factor": pipe.vae_scale_factor,
        # traced without diffusers' odd-size upsampling branch: sizes must halve cleanly in the UNet
        "size_multiple": pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1),
    }


def _sample_inputs(pipe, spec: ModelSpec, timesteps: list[int]) -> dict:
    """Realistic verification inputs at batch 2: two prompts, seeded noise, a negative prompt."""
    res = spec.resolution
    ids = [token_ids(tok, ["a red circle", "two blue squares"]) for tok in _tokenizers(pipe)]
    neg_ids = [token_ids(tok, ["green"]) for tok in _tokenizers(pipe)]
    with torch.no_grad():
        te = _TextEncoder(pipe)
        to = pipe.text_encoder.device
        emb = te(*[torch.from_numpy(i).to(to) for i in ids])
        neg = te(*[torch.from_numpy(i).to(to) for i in neg_ids])
    emb, pooled = (emb if isinstance(emb, tuple) else (emb, None))
    neg = neg[0] if isinstance(neg, tuple) else neg
    noise = onestep.seeded_noise([0, 1], onestep.latent_shape(pipe, 1, res, res)).to(pipe.unet.device)
    t = torch.full((2,), timesteps[0], dtype=torch.long, device=pipe.unet.device)
    extra = ()
    if pooled is not None:
        ids_t = torch.tensor([[res, res, 0, 0, res, res]] * 2, dtype=torch.float32, device=pipe.unet.device)
        extra = (pooled, ids_t)
    return {"ids": [torch.from_numpy(i).to(to) for i in ids], "emb": emb, "neg": neg, "noise": noise, "t": t,
            "extra": extra}


def _graphs(pipe, ptype: str, sdxl: bool, nasa_graph: bool, x: dict) -> dict:
    """name -> (module, example args, input names, output names, dynamic axes)."""
    alphas = pipe.scheduler.alphas_cumprod
    b, hw = {0: "batch"}, {0: "batch", 2: "height", 3: "width"}
    extra_names = ["text_embeds", "time_ids"] if sdxl else []
    extra_dyn = {"text_embeds": b, "time_ids": b} if sdxl else {}
    te_in = ["input_ids", "input_ids_2"] if sdxl else ["input_ids"]
    te_out = ["prompt_embeds", "text_embeds"] if sdxl else ["prompt_embeds"]
    graphs = {
        "text_encoder": (_TextEncoder(pipe), tuple(x["ids"]), te_in, te_out, {n: b for n in te_in + te_out}),
        "unet": (_Denoiser(pipe.unet, alphas, ptype, sdxl), (x["noise"], x["t"], x["emb"], *x["extra"]),
                 ["sample", "timestep", "prompt_embeds", *extra_names], ["x0"],
                 {"sample": hw, "timestep": b, "prompt_embeds": b, "x0": hw, **extra_dyn}),
    }
    if nasa_graph:
        alpha = torch.tensor(0.5, dtype=torch.float32, device=pipe.unet.device)
        graphs["unet_nasa"] = (_NasaDenoiser(pipe.unet, alphas, ptype, sdxl),
                               (x["noise"], x["t"], x["emb"], x["neg"], alpha, *x["extra"]),
                               ["sample", "timestep", "prompt_embeds", "negative_embeds", "nasa_alpha", *extra_names],
                               ["x0"], {"sample": hw, "timestep": b, "prompt_embeds": b, "x0": hw, **extra_dyn})
    graphs["vae_decoder"] = (_Decoder(pipe.vae), (x["noise"],), ["latents"], ["images"],
                             {"latents": hw, "images": {0: "batch", 2: "image_height", 3: "image_width"}})
    return graphs


def _export_one(module, args, path: Path, in_names, out_names, dynamic_axes) -> None:
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        # the TorchScript exporter warns about its own deprecation and about traced python branches
        # (NASA's alpha != 0 test: alpha is an input, the subtraction is kept); neither matters here
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, args, str(path), dynamo=False, input_names=in_names, output_names=out_names,
                              dynamic_axes=dynamic_axes, opset_version=OPSET, do_constant_folding=True)
        except Exception as e:
            first = first_line(e, 300)
            raise ValueError(f"ONNX export of {path.stem} failed: {first}") from None


def _verify(folder: Path, graphs: dict, dtype: str) -> dict:
    """Run every exported graph on its example inputs; max abs difference to PyTorch per graph."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    report = {}
    for name, (module, args, in_names, out_names, _) in graphs.items():
        sess = ort.InferenceSession(str(folder / f"{name}.onnx"), opts, providers=loading.onnx_providers())
        feeds = {n: a.detach().cpu().numpy() for n, a in zip(in_names, args)}
        got = sess.run(None, {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}})
        with torch.no_grad():
            ref = module(*args)
        ref = [r.float().cpu().numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
        diff = max(float(np.abs(g - r).max()) for g, r in zip(got, ref))
        scale = max(float(np.abs(r).max()) for r in ref)
        tol = TOLERANCE[dtype] * max(1.0, scale)
        report[name] = {"max_abs_diff": diff, "max_abs_value": scale, "tolerance": tol,
                        "inputs": {n: list(a.shape) for n, a in zip(in_names, args)}}
        if not diff <= tol:
            raise ValueError(f"ONNX export failed verification: {name} differs from PyTorch by up to {diff:.3g} "
                             f"(tolerance {tol:.3g})")
    return report


def file_entry(path: Path) -> dict:
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": loading.file_sha256(path)}


def _replace(tmp: Path, out: Path) -> None:
    """Move a finished export into place; an existing export there is replaced."""
    if out.is_dir():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{threading.get_ident()}"
        out.rename(old)
        try:
            tmp.rename(out)
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            tmp.rename(out)
        except OSError:  # another process finished the same export first: theirs is as good
            if not (out / loading.ONNX_MANIFEST).is_file():
                raise


def _tokenizers(pipe) -> list:
    return [pipe.tokenizer, pipe.tokenizer_2] if getattr(pipe, "text_encoder_2", None) is not None else [pipe.tokenizer]


def token_ids(tokenizer, prompts: list[str]) -> np.ndarray:
    """Token ids exactly as diffusers' encode_prompt makes them (padded to the model's max length)."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="np").input_ids.astype(np.int64)
