"""Knobs for the PyTorch path, each measured by `python -m bench` rather than assumed:

- channels_last: NHWC activations for the UNet and VAE (what oneDNN and tensor cores prefer);
- dtype: "auto" (fp16 on CUDA, fp32 on CPU), or float32 / bfloat16 / float16 asked for explicitly:
  on a CPU without native bf16 (AVX2 only) bf16 is several times slower, so auto keeps fp32 there;
- compile: torch.compile of the UNet and the VAE decode (off by default: the first call compiles for
  a while, and a failure says so in one line);
- tiny_decoder: diffusers AutoencoderTiny (TAESD for SD, TAESDXL for SDXL) in place of the full VAE
  decoder, when its safetensors are on this machine (`python -m pipelines prefetch madebyollin/taesd`);
  models of the embedded world get their own, shipped in assets/models/shapes-64/tiny-decoder.

The prompt-embedding cache lives in `onestep.PROMPT_CACHE` and is on by default for every engine.

channels_last changes the memory layout of the cached pipeline's modules in place (same numbers, every
user of that pipeline gets the layout). compile and the tiny decoder make a variant: a shallow copy of
the pipeline sharing every other module, cached per (model, device, dtype, options).
"""
from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from . import loading, onestep, registry
from .errors import first_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TorchOptions:
    channels_last: bool = False
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    compile: bool = False
    tiny_decoder: bool | str = False  # True: the model's own (shapes-64) or its family's TAESD; a str: a folder

    def check(self) -> "TorchOptions":
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype {str(self.dtype)[:20]!r} is not supported; allowed: auto, {', '.join(DTYPES)}")
        for name in ("channels_last", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false")
        if not isinstance(self.tiny_decoder, (bool, str)):
            raise ValueError("tiny decoder must be true, false or an AutoencoderTiny folder")
        return self


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return loading.default_dtype(device)
    if name == "float16" and not str(device).startswith("cuda"):
        raise ValueError("float16 needs a CUDA device; on CPU use float32 or bfloat16")
    return DTYPES[name]


def pipeline(model_id: str, options: TorchOptions | None = None, device: str | None = None):
    """The PyTorch pipeline of a model with these options applied (cached)."""
    options = (options or TorchOptions()).check()
    device = device or loading.default_device()
    dtype = resolve_dtype(options.dtype, device)
    pipe = loading.load_pipeline(model_id, device=device, dtype=dtype)
    if options.channels_last:
        for m in (pipe.unet, pipe.vae):
            m.to(memory_format=torch.channels_last)
    if not (options.compile or options.tiny_decoder):
        return pipe
    key = (model_id, str(device), str(dtype), options, id(pipe))
    with _LOCK:
        if key in _VARIANTS:
            _VARIANTS.move_to_end(key)
            return _VARIANTS[key]
    variant = copy.copy(pipe)  # a new pipeline object whose component attributes we may rebind
    spec = registry.get(model_id)
    if options.tiny_decoder:
        variant.vae = tiny_decoder(spec, pipe, options.tiny_decoder, device, dtype)
        if options.channels_last:
            variant.vae.to(memory_format=torch.channels_last)
    if options.compile:
        _compile(variant, spec)
    with _LOCK:
        _VARIANTS[key] = variant
        while len(_VARIANTS) > 4:
            _VARIANTS.popitem(last=False)
    return variant


def tiny_decoder(spec, pipe, source, device, dtype):
    """The AutoencoderTiny for `spec` (`source` True: the model's own or its family's; else a folder),
    checked against the pipeline's latents."""
    if source is True:
        source = registry.tiny_decoder_source(spec)
        # TAESD and TAESDXL decode 4-channel latents: say so before asking to fetch them
        if source is None or (source in registry.TINY_DECODERS.values() and pipe.unet.config.out_channels != 4):
            raise ValueError(f"no tiny decoder is known for {spec.id} ({pipe.unet.config.out_channels}-channel latents); "
                             "allowed: shapes-64 models, SD/SDXL hub models with madebyollin/taesd or taesdxl "
                             "fetched, or a folder")
    vae = loading.load_tiny_decoder(source, device=device, dtype=dtype)
    if vae.config.latent_channels != pipe.unet.config.out_channels:
        raise ValueError(f"tiny decoder {source} takes {vae.config.latent_channels}-channel latents; {spec.id} makes "
                         f"{pipe.unet.config.out_channels}")
    factor = vae.config.upsampling_scaling_factor ** (len(vae.config.decoder_block_out_channels) - 1)
    if factor != pipe.vae_scale_factor:
        raise ValueError(f"tiny decoder {source} upsamples {factor}x; {spec.id}'s latents need {pipe.vae_scale_factor}x")
    return vae


def _compile(variant, spec) -> None:
    """torch.compile the UNet and the VAE decode of a variant, then compile for real (one warm-up
    generation) so that a machine that cannot compile fails here, in one line."""
    vae = copy.copy(variant.vae)  # own __dict__: rebinding `decode` leaves the shared VAE alone
    try:
        variant.unet = torch.compile(variant.unet)
        vae.decode = torch.compile(variant.vae.decode)
        variant.vae = vae
        onestep.generate(variant, spec, "warm-up", prompt_cache=False)
    except Exception as e:  # inductor raises many classes (no compiler, unsupported op, ...)
        first = first_line(e, 200)
        raise ValueError(f"torch.compile does not work here ({e.__class__.__name__}: {first}); "
                         "run without --compile") from None


def clear() -> None:
    with _LOCK:
        _VARIANTS.clear()


_LOCK = threading.Lock()
_VARIANTS: OrderedDict = OrderedDict()
