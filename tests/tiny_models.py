"""Tiny random-weight SD- and SDXL-family pipelines in hub layout (save_pretrained), built offline:
real diffusers/transformers classes at toy sizes, a CLIPTokenizer from a local vocab file."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: F401

WORDS = ["a", "red", "blue", "green", "circle", "square", "cat", "dog", "photo", "of", "and", "on", "background"]


def tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    from training.methods.clip import word_tokenizer

    return word_tokenizer(folder, WORDS, max_length=16, chars="abcdefghijklmnopqrstuvwxyz")


def _text_config(tok, hidden=32, projection=None) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          projection_dim=projection or hidden)


def _vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, sample_size=32)


def make_tiny_sd(folder: Path, prediction_type: str = "epsilon") -> Path:
    """A 2-level SD-family pipeline (vae scale factor 2) saved in hub layout."""
    torch.manual_seed(0)
    tok = tiny_tokenizer(folder / "_tok")
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=2, norm_num_groups=4)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   prediction_type=prediction_type, timestep_spacing="trailing")
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=CLIPTextModel(_text_config(tok)), tokenizer=tok, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def make_tiny_sdxl(folder: Path) -> Path:
    """A 2-level SDXL-family pipeline: two text encoders, pooled embeddings, size ids."""
    torch.manual_seed(0)
    tok = tiny_tokenizer(folder / "_tok")
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=2, norm_num_groups=4, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
                                transformer_layers_per_block=1)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   timestep_spacing="trailing")
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=CLIPTextModel(_text_config(tok)),
                                     text_encoder_2=CLIPTextModelWithProjection(_text_config(tok, 32, 32)),
                                     tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=sched)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
