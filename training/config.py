"""Training configs: frozen dataclasses, saved as JSON beside every run.

Every method has one config class; `TrainConfig` holds the fields all of them share. Unknown keys in
a JSON file or a `--set key=value` override are an error naming the allowed keys.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TrainConfig:
    method: str = ""
    run_dir: str = ""  # checkpoints, metrics and samples go here
    steps: int = 1000  # total optimizer steps
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 50  # linear warm-up steps (from init_step), then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    decay_start: int = 0  # > warmup: the LR holds until this step, then the cosine decay runs to `steps`
    weight_decay: float = 0.0
    seed: int = 0
    save_every: int = 200
    keep: int = 2  # complete checkpoints kept
    log_every: int = 20
    threads: int = 0  # torch threads; 0 keeps torch's default
    max_seconds: float = 0.0  # stop (with a checkpoint) after this wall time; 0 = no limit
    data_size: int = 20000  # pre-rendered (image, prompt) pairs in the cached pool
    init_step: int = 0  # a warm start's step (from a partial export): steps and LR schedule continue from it
    # accelerate's autocast: "auto" = bf16 on a GPU that has it (weights, EMA and optimizer stay fp32), none on a
    # CPU; or "no" | "bf16" | "fp16"
    mixed_precision: str = "auto"


@dataclass(frozen=True)
class ClipConfig(TrainConfig):
    method: str = "clip"
    tokenizer_dir: str = ""
    hidden_size: int = 128
    layers: int = 3
    heads: int = 4
    patch_size: int = 8
    projection_dim: int = 128
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.05
    hard_negative_prob: float = 0.5  # fraction of the batch built as pairs differing in one attribute
    steps: int = 2000
    save_every: int = 500
    init_from: str = ""  # continue from an exported CLIP folder: its text tower is kept
    freeze_text: bool = False  # keep the text transformer fixed (the UNets are conditioned on it)
    text_from: str = ""  # a CLIPTextModel folder whose weights become the text transformer (the teacher's, when
    # its training moved it), also over a resumed checkpoint's: the image tower then aligns to it


@dataclass(frozen=True)
class VaeConfig(TrainConfig):
    method: str = "vae"
    block_out_channels: tuple = (32, 64, 128)  # 3 levels: 64x64 -> 16x16
    latent_channels: int = 8  # 4 could not keep triangle tips and star points (ShapeEval 0.64 at 1000 steps)
    layers_per_block: int = 1
    kl_weight: float = 1e-6
    crop: int = 32  # random crop size for training; evaluation uses whole 64x64 images
    edge_weight: float = 0.0  # extra loss weight on pixels at shape edges (sharper corners and points)
    init_from: str = ""  # continue from an exported AutoencoderKL folder
    decoder_only: bool = False  # train only the decoder: latents (and every UNet trained on them) stay valid
    batch_size: int = 32
    lr: float = 1e-3
    steps: int = 4000
    save_every: int = 500


@dataclass(frozen=True)
class TinyDecoderConfig(TrainConfig):
    """A TAESD-style AutoencoderTiny decoder distilled from a trained AutoencoderKL's decoder."""

    method: str = "tiny_decoder"
    vae_dir: str = ""  # the AutoencoderKL whose decoder is distilled (its latents, its scaling_factor)
    channels: int = 32  # DecoderTiny width (diffusers needs one width for every level)
    num_blocks: tuple = (2, 2, 0)  # AutoencoderTinyBlocks per level, 16x16 / 32x32 / 64x64 for shapes-64
    # the export's scaling_factor: onestep.decode feeds it latents / scaling_factor. 1.0 (as TAESD): it sees
    # the unit-variance latents the UNet makes; 0 = the KL VAE's: it sees the KL decoder's unscaled input
    scaling_factor: float = 1.0
    num_latents: int = 2048  # pool images encoded (and decoded by the KL VAE) once per run
    perturb_fraction: float = 0.25  # share of those latents moved off the encoder's outputs (student latents are)
    perturb_sigma: float = 0.3  # max noise std added to them, in unit-variance (scaled) latent units
    edge_weight: float = 1.0  # extra loss weight on pixels at edges of the target (shape outlines)
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 0.0
    steps: int = 2000
    save_every: int = 500


@dataclass(frozen=True)
class TeacherConfig(TrainConfig):
    method: str = "teacher"
    clip_dir: str = ""  # trained CLIPModel + tokenizer (its text tower conditions the UNet)
    vae_dir: str = ""
    block_out_channels: tuple = (32, 96, 160)
    layers_per_block: int = 1
    cross_attention_levels: int = 2  # attention at the innermost levels (2: 8x8 and 4x4; 3: 16x16 too)
    attention_head_dim: int = 4
    uncond_prob: float = 0.1  # prompt dropout, so CFG and negative prompts have something to use
    snr_gamma: float = 5.0  # min-SNR loss weighting
    snr_shift: float = 1.0  # multiply every timestep's SNR (teacher.schedule): 16 suits 16x16 latents
    ema_decay: float = 0.999
    num_train_timesteps: int = 1000
    data_size: int = 40000  # pre-rendered pairs, encoded to latents once per run
    eval_images: int = 48  # quick ShapeEval at each checkpoint (0: none)
    init_unet: str = ""  # warm start (no checkpoint in run_dir): a UNet folder, e.g. a partial export
    # > 0: the text encoder trains with the UNet at this LR (its EMA ships as the teacher's text encoder), so the
    # diffusion loss can pull apart words the contrastive CLIP left close (circle, square and heart were)
    text_lr: float = 0.0
    init_text_encoder: str = ""  # warm start of the text encoder: a CLIPTextModel folder (default: clip_dir's tower)
    # The shipped run used batch 64 (12,000 steps planned) up to step 4,361, then batch 32 over a 40,000-step
    # schedule: on 2 CPU cores twice the updates per hour did more than the larger batch (samples at 4,000
    # steps were still blobs, quick ShapeEval 0.08-0.25 from step 1,500 to 4,000).
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 200
    steps: int = 40000
    save_every: int = 1000


@dataclass(frozen=True)
class Dmd2Config(TrainConfig):
    method: str = "dmd2"
    teacher: str = ""  # registry id or diffusers folder of the (SD/SDXL-family) teacher
    prompts: str = "shapes"  # "shapes" (the world's sampler) or a text file, one prompt per line
    timesteps: tuple = (999,)  # generator timesteps: (999,) one step, (999, 749, 499, 249) four steps
    real_guidance: float = 4.0  # CFG scale of the real (teacher) score
    ratio: int = 5  # two time-scale rule: generator updated every `ratio` steps, fake score every step
    min_t: int = 20  # distribution-matching loss timesteps
    max_t: int = 980
    generator_lora_rank: int = 0  # 0: full copy of the teacher; r > 0: peft LoRA of rank r
    fake_lora_rank: int = 0  # 0: full trainable copy; r > 0: LoRA on the shared frozen teacher
    lora_alpha: float = 8.0
    gan_weight: float = 0.0  # generator's non-saturating GAN weight (DMD2: 1e-3 SD1.5, 5e-3 SDXL); 0 = no GAN
    gan_disc_weight: float = 1e-2
    guidance_lr: float = 0.0  # fake score + discriminator LR; 0 = same as lr
    height: int = 0  # 0: the teacher's native size
    width: int = 0
    mixed_precision: str = "no"  # fp32 by default: the students' recipe was tuned so
    route: str = ""  # MSD: train only on prompts the router in this msd.json folder sends to `route_index`
    route_index: int = -1
    generator_init: str = ""  # a UNet folder to start the generator from (e.g. a smaller TSM student)
    # steps at the run's start (from init_step on a warm start) that train only the fake score (and GAN head) on the
    # generator's samples: a generator that starts trained (generator_init) needs a fake score fitted to it before its
    # gradient means much
    fake_warmup: int = 0
    latents_cache: str = ""  # the GAN pool's latents file (default: in run_dir); MSD's students share one
    eval_images: int = 0  # ShapeEval of N student images at each checkpoint (shapes-world teachers)
    # NASA-T (SNOOPI section 5.3): on a share of the generator updates the student runs NASA with a negative prompt
    # at alpha ~ U(0, nasa_alpha_max) and the teacher's CFG steers away from that negative instead of from "".
    # "colors": a shapes-world color the prompt does not name; else a text file of negatives, one per line
    nasa_negatives: str = ""
    nasa_prob: float = 0.5
    nasa_alpha_max: float = 1.0
    # the teacher's CFG negative made from the student's: "{}" the same text; "{0}, on a {0} background" names a
    # shapes-world color in both of its grammar slots (the teacher reads a bare color as the objects' only)
    nasa_teacher_negative: str = "{}"
    batch_size: int = 16
    lr: float = 1e-5
    warmup: int = 100
    min_lr_ratio: float = 1.0  # DMD2 uses a constant LR after warm-up
    weight_decay: float = 0.01


@dataclass(frozen=True)
class MsdConfig(Dmd2Config):
    method: str = "msd"
    router: str = "category"  # "category" (shapes grammar) or "embedding" (pooled text embedding quadrants)
    groups: tuple = (("single_object", "colors"), ("two_object", "color_attr"), ("counting", "position"))
    num_students: int = 4  # for the embedding router: 2 or 4
    width_mult: float = 1.0  # < 1: smaller students (channels scaled), warmed up by teacher score matching
    tsm_steps: int = 200  # teacher-score-matching warm-up steps for smaller students
    tsm_lr: float = 1e-4
    # a trained one-step student folder every student starts from (its UNet); with generator_lora_rank > 0 each
    # student is a LoRA on it, stored as its adapter alone (the folder borrows the base student's UNet)
    student_init: str = ""


@dataclass(frozen=True)
class ControlNetConfig(TrainConfig):
    """ControlNet for a (multi-step) teacher, trained with the teacher's own diffusion loss."""

    method: str = "controlnet"
    teacher: str = ""  # registry id or diffusers folder of the SD/SDXL-family teacher (frozen)
    preprocessor: str = "canny"  # control maps made from the training images (pipelines/control.py)
    images: str = "shapes"  # "shapes" (the renderer's pool) or a folder of images with same-name .txt captions
    uncond_prob: float = 0.5  # prompts dropped so the ControlNet learns from the map alone (as in its paper)
    snr_gamma: float = 5.0  # min-SNR weighting
    data_size: int = 20000
    batch_size: int = 32
    lr: float = 2e-4
    warmup: int = 100
    steps: int = 2000
    save_every: int = 250


@dataclass(frozen=True)
class NctConfig(TrainConfig):
    """NCT adapter (ControlNet architecture) for a frozen one-step student: no images, no teacher."""

    method: str = "nct"
    student: str = ""  # registry id or folder of the frozen one-step student
    preprocessor: str = "canny"  # the condition extractor applied to the student's own outputs
    prompts: str = "shapes"  # "shapes" (the world's sampler) or a text file, one prompt per line
    levels: int = 8  # noise levels sigma_k = k / levels in the noise-space VP diffusion
    boundary_target: float = 0.01  # xi: the boundary loss (latent MSE to the frozen output) is kept below this
    dual_lr: float = 1.0  # eta: lambda <- max(0, lambda + eta (L_bound - xi))
    lambda_init: float = 1.0
    init_adapter: str = ""  # warm start (no checkpoint in run_dir): a ControlNetModel folder, e.g. a partial export
    batch_size: int = 16
    lr: float = 2e-4
    warmup: int = 100
    steps: int = 2000
    save_every: int = 250


CONFIGS = {c.method: c for c in (ClipConfig(), VaeConfig(), TinyDecoderConfig(), TeacherConfig(), Dmd2Config(),
                                 MsdConfig(), ControlNetConfig(), NctConfig())}


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def from_dict(data: dict):
    """Build the config of data['method'] from a dict, rejecting unknown keys."""
    method = data.get("method", "")
    if method not in CONFIGS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(sorted(CONFIGS))}")
    cls = type(CONFIGS[method])
    allowed = set(field_names(cls))
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"unknown config keys {unknown} for method {method!r}; allowed: {sorted(allowed)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**kwargs)


def parse_value(raw: str):
    """An override's value: JSON when it parses (numbers, lists, true), else the text itself."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def with_overrides(cfg, pairs: list[str]):
    """Apply `key=value` strings; the value is parsed as JSON when it can be, else kept as text."""
    changes = {}
    allowed = set(field_names(type(cfg)))
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in allowed:
            raise ValueError(f"bad override {pair!r}: expected key=value with key one of {sorted(allowed)}")
        value = parse_value(raw)
        changes[key] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(cfg, **changes)


def save_json(cfg, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(dataclasses.asdict(cfg), indent=2))


def load_json(path: str | Path):
    return from_dict(json.loads(Path(path).read_text()))
