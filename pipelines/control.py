"""Control images: read an upload safely, turn it into a control map, and apply a ControlNet-shaped
model (Zhang, Rao, Agrawala, 2023, "Adding Conditional Control to Text-to-Image Diffusion Models") to
a UNet call.

Two kinds of control model share one application path (diffusers `ControlNetModel`: its residuals are
added to the UNet's skip connections and middle block):
  - a ControlNet trained for the multi-step teacher, used by the teacher or plugged into its
    one-step student (same UNet architecture, so the residuals fit);
  - an NCT adapter (noise consistency training, Luo et al., 2025; training/methods/nct.py) of the same
    architecture, trained directly on the frozen one-step student.

Preprocessors (control maps are white structure on black, at the model's resolution):
  canny   OpenCV Canny edges (the same detector controlnet-aux's CannyDetector wraps)
  sketch  a drawing (dark strokes on light, or light on dark) binarised to white strokes on black
  none    the image is already a control map
controlnet-aux's detectors that need downloaded weights (HED, MiDaS, lineart, ...) are listed with what
they need: their published annotator weights are pickles (.pth), which this app does not load.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_UPLOAD_PIXELS = 4096 * 4096
PREPROCESSORS = ("canny", "sketch", "none")
KINDS = ("auto", "nct", "controlnet")  # which control model: see `resolve`
CANNY_DEFAULTS = {"low": 100, "high": 200}
# controlnet-aux detectors and why they are not offered here
NEEDS_WEIGHTS = {
    "hed": "HEDdetector needs lllyasviel/Annotators ControlNetHED.pth",
    "pidi": "PidiNetDetector needs lllyasviel/Annotators table5_pidinet.pth",
    "midas": "MidasDetector needs lllyasviel/Annotators dpt_hybrid-midas-501f0c75.pt",
    "lineart": "LineartDetector needs lllyasviel/Annotators sk_model.pth",
    "mlsd": "MLSDdetector needs lllyasviel/Annotators mlsd_large_512_fp32.pth",
    "normalbae": "NormalBaeDetector needs lllyasviel/Annotators scannet.pt",
    "openpose": "OpenposeDetector needs lllyasviel/Annotators body_pose_model.pth",
}


def unavailable(name: str) -> str | None:
    """Why preprocessor `name` cannot run here (None when it can)."""
    if name in PREPROCESSORS:
        return None
    if name in NEEDS_WEIGHTS:
        return (f"{NEEDS_WEIGHTS[name]}, published only as a pickle, which OneStep Studio does not load; "
                f"use one of: {', '.join(PREPROCESSORS)}")
    return f"unknown preprocessor {name!r}; allowed: {', '.join(PREPROCESSORS)}"


def read_image(src) -> Image.Image:
    """An upload (path, bytes, PIL image or uint8 array) as RGB; transparency over white; one-line errors."""
    if isinstance(src, np.ndarray):
        arr = src
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
            raise ValueError(f"control image array has shape {arr.shape} and dtype {arr.dtype}; allowed: uint8 "
                             "(H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
        img = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
    elif isinstance(src, Image.Image):
        img = src
    else:
        data = src if isinstance(src, bytes) else _read_file(Path(src))
        if len(data) > MAX_UPLOAD_BYTES:
            raise ValueError(f"control image is {len(data) / 2**20:.1f} MB; at most {MAX_UPLOAD_BYTES // 2**20} MB")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
                img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ValueError(f"control image is too large; at most {MAX_UPLOAD_PIXELS} pixels") from None
        except Exception as e:  # PIL raises many classes for broken files
            raise ValueError(f"could not read the control image ({e.__class__.__name__}); allowed: PNG, JPEG, WebP, "
                             "BMP or GIF files") from None
    if img.width * img.height > MAX_UPLOAD_PIXELS:
        raise ValueError(f"control image is {img.width}x{img.height}; at most {MAX_UPLOAD_PIXELS} pixels")
    if img.width < 8 or img.height < 8:
        raise ValueError(f"control image is {img.width}x{img.height}; at least 8x8 pixels")
    return _to_rgb(img)


def _read_file(path: Path) -> bytes:
    if not path.is_file():
        raise ValueError(f"control image {path} does not exist")
    if path.stat().st_size > MAX_UPLOAD_BYTES:
        raise ValueError(f"control image is {path.stat().st_size / 2**20:.1f} MB; at most {MAX_UPLOAD_BYTES // 2**20} MB")
    return path.read_bytes()


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit or float grayscale: scale to 8 bits
        arr = np.asarray(img, dtype=np.float64)
        span = arr.max() - arr.min()
        arr = (arr - arr.min()) / span * 255 if span > 0 else np.zeros_like(arr)
        img = Image.fromarray(arr.round().astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    return img.convert("RGB")


def fit(img: Image.Image, height: int, width: int) -> Image.Image:
    """Resize to cover height x width (keeping the aspect ratio), then center-crop; any input size."""
    scale = max(height / img.height, width / img.width)
    w, h = max(width, round(img.width * scale)), max(height, round(img.height * scale))
    img = img.resize((w, h), Image.Resampling.LANCZOS)
    left, top = (w - width) // 2, (h - height) // 2
    return img.crop((left, top, left + width, top + height))


def canny(rgb: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    import cv2

    if not (0 <= low <= 255 and 0 <= high <= 255 and low <= high):
        raise ValueError(f"canny thresholds {low}, {high}; allowed: 0 <= low <= high <= 255")
    # on the color image, as controlnet-aux's CannyDetector runs it: OpenCV takes each pixel's strongest channel
    # gradient, so an edge between two colors of one brightness (red on purple) is found, which a gray copy loses
    return cv2.Canny(np.ascontiguousarray(rgb), int(low), int(high))


def sketch(rgb: np.ndarray, threshold: int = 128) -> np.ndarray:
    gray = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    strokes = gray < threshold
    if strokes.mean() > 0.5:  # light strokes on a dark ground
        strokes = ~strokes
    return (strokes * 255).astype(np.uint8)


def detect(rgb: np.ndarray, preprocessor: str = "canny", **settings) -> np.ndarray:
    """uint8 (H, W, 3) image -> uint8 (H, W, 3) control map."""
    why = unavailable(preprocessor)
    if why:
        raise ValueError(why)
    if preprocessor == "none":
        return rgb
    if preprocessor == "canny":
        edges = canny(rgb, **{**CANNY_DEFAULTS, **{k: int(v) for k, v in settings.items() if k in CANNY_DEFAULTS}})
    else:
        edges = sketch(rgb, int(settings.get("threshold", 128)))
    return np.repeat(edges[..., None], 3, axis=2)


def make_map(src, preprocessor: str = "canny", height: int = 64, width: int = 64, **settings) -> Image.Image:
    """The control map (RGB, white structure on black) at height x width from any upload."""
    why = unavailable(preprocessor)
    if why:
        raise ValueError(why)
    return Image.fromarray(detect(np.asarray(fit(read_image(src), height, width)), preprocessor, **settings))


def map_tensor(control_map: Image.Image, batch: int, device, dtype) -> torch.Tensor:
    """A control map as ControlNet input: (batch, 3, H, W) in [0, 1]."""
    x = torch.from_numpy(np.asarray(control_map.convert("RGB"))).permute(2, 0, 1).float().div(255)
    return x[None].repeat(batch, 1, 1, 1).to(device, dtype)


@dataclass
class Control:
    """A ControlNet-shaped model, its conditioning image and scale, ready for UNet calls."""

    model: torch.nn.Module  # diffusers ControlNetModel (a ControlNet or an NCT adapter)
    image: torch.Tensor  # (batch, 3, H, W) in [0, 1]
    scale: float = 1.0

    def residuals(self, x: torch.Tensor, t: torch.Tensor, cond) -> dict:
        """Extra UNet kwargs: the ControlNet's skip and middle residuals for this call."""
        image = self.image if self.image.shape[0] == x.shape[0] else self.image[:1].expand(x.shape[0], -1, -1, -1)
        down, mid = self.model(x, t, encoder_hidden_states=cond.prompt_embeds, controlnet_cond=image.to(x.dtype),
                               conditioning_scale=self.scale, added_cond_kwargs=cond.added_cond_kwargs,
                               return_dict=False)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale <= 2:
        raise ValueError(f"control scale {str(scale)[:20]!r} is out of range; allowed: 0 to 2")
    return float(scale)


def edge_match(reference: np.ndarray, output: np.ndarray, tolerance: int = 1) -> dict[str, float]:
    """How well an output's edges (binary maps) follow the control's, with a `tolerance`-pixel match
    radius: precision (the output's edges that lie on the control's), recall (the control's edges the
    output drew) and their F1. 1 = every edge matched both ways."""
    import cv2

    ref, out = reference > 127, output > 127
    if not ref.any() or not out.any():
        same = float(not ref.any() and not out.any())
        return {"precision": same, "recall": same, "f1": same}
    kernel = np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8)
    ref_near = cv2.dilate(ref.astype(np.uint8), kernel) > 0
    out_near = cv2.dilate(out.astype(np.uint8), kernel) > 0
    precision = float((out & ref_near).sum() / out.sum())
    recall = float((ref & out_near).sum() / ref.sum())
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1}


EDGE_KEYS = ("edge_f1", "edge_precision", "edge_recall")  # what `follow` reports, as evaluate --control names them


def follow(source, output: np.ndarray, preprocessor: str = "canny", **settings) -> tuple[np.ndarray, np.ndarray, dict]:
    """How well a generated image (uint8 H x W x 3) follows its control source: the source's map at the
    output's size, the output's own map (same preprocessor and settings), and `edge_match` of the two as
    {"edge_f1", "edge_precision", "edge_recall"}."""
    ref = np.asarray(make_map(source, preprocessor, *output.shape[:2], **settings))
    out = detect(output, preprocessor, **settings)
    return ref, out, {f"edge_{k}": v for k, v in edge_match(ref[..., 0], out[..., 0]).items()}


def resolve(spec, preprocessor: str, kind: str = "auto") -> tuple[str, str]:
    """(source, kind) of the control model for `spec`: a student's own NCT adapter, its teacher's
    ControlNet, or a teacher's ControlNet. `kind` may also be a ControlNet folder or hub repo."""
    from .registry import get

    if kind not in KINDS:
        return kind, "controlnet"
    if spec.role == "teacher":
        if kind == "nct":
            raise ValueError(f"{spec.id} is a teacher; NCT adapters belong to one-step students (use controlnet)")
        own = spec.control_source(preprocessor, "controlnet")
        if not own:
            raise ValueError(f"{spec.id} has no ControlNet for {preprocessor}; give a ControlNet folder or repo")
        return own, "controlnet"
    nct = spec.control_source(preprocessor, "nct")
    teacher = get(spec.teacher) if spec.teacher else None
    cn = teacher.control_source(preprocessor, "controlnet") if teacher else None
    if kind == "nct" or (kind == "auto" and nct and (Path(nct).is_dir() or not cn)):
        if not nct:
            raise ValueError(f"{spec.id} has no NCT adapter for {preprocessor}; use controlnet, or train one "
                             "(python -m training.recipes.shapes --stages nct for shapes-64)")
        return nct, "nct"
    if not cn:
        raise ValueError(f"neither {spec.id} nor its teacher has a ControlNet for {preprocessor}")
    return cn, "controlnet"

