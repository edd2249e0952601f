"""Tiny CLIP for the shapes world (Radford et al., 2021, "Learning Transferable Visual Models From
Natural Language Supervision"): symmetric InfoNCE over image-text pairs,

    L = 1/2 [ CE(s * I T^T, Y) + CE(s * T I^T, Y) ],  I, T unit-normalised embeddings, s = exp(logit_scale),

with Y the (row-normalised) matrix of identical captions, so repeated prompts in a batch are not
counted as negatives. Half of each batch is pairs that differ in one attribute (hard negatives),
which teaches the towers to bind colors to shapes and to read relations.

The text tower (a `CLIPTextModel`) conditions the UNets; both towers make the CLIP-score reward.
Images enter as [-1, 1] tensors, which is what the saved `CLIPImageProcessor` (mean = std = 0.5)
produces from uint8 pixels.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextModel, CLIPTokenizer

from shapes import COLORS, SHAPES
from shapes.grammar import NUMBERS, PLURALS

from ..common import make_accelerator, optimize, to_tensor, train_loop
from ..data import pool

MAX_TOKENS = 24  # bos + 22 content tokens + eos
WORDS = sorted({"a", "and", "on", "background", "left", "right", "of", "above", "below", *NUMBERS,
                *SHAPES, *PLURALS.values(), *COLORS})


def word_tokenizer(folder: str | Path, words, max_length: int,
                   chars: str = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'-") -> CLIPTokenizer:
    """A CLIPTokenizer from a local vocab with BPE merges that build each of `words`; other text falls
    back to single characters, so any prompt is valid input. BPE applies merges by rank, so a merge
    learnt for one word can pre-empt another's: most words become one token, some a few pieces."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = []
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        cur = symbols[0]
        for s in symbols[1:]:
            merges.append(f"{cur} {s}")
            cur += s
            vocab.setdefault(cur, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=max_length)


def build_tokenizer(out_dir: str | Path) -> CLIPTokenizer:
    """The shapes world's tokenizer. 29 of its 34 grammar words are single tokens; orange, three,
    squares, triangle(s) split into 3-6 pieces. The longest evaluation prompt takes 20 of the 22
    content positions; one random training prompt in 20,000 loses its last token."""
    out_dir = Path(out_dir)
    word_tokenizer(out_dir / "raw", WORDS, MAX_TOKENS).save_pretrained(out_dir)
    return CLIPTokenizer.from_pretrained(out_dir)


def build_model(cfg, tokenizer) -> CLIPModel:
    common = dict(hidden_size=cfg.hidden_size, intermediate_size=2 * cfg.hidden_size,
                  num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads)
    text = dict(common, vocab_size=len(tokenizer), max_position_embeddings=MAX_TOKENS,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(common, image_size=64, patch_size=cfg.patch_size, num_channels=3)
    torch.manual_seed(cfg.seed)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim))


def continue_from(cfg, tokenizer) -> CLIPModel:
    """A CLIP with the text transformer + projection of cfg.init_from, and its image tower too when cfg's
    has the same shapes (training on), else a fresh one of cfg's shape (e.g. finer patches).

    Used to improve the image side without moving the text tower the UNets were trained on."""
    old = CLIPModel.from_pretrained(cfg.init_from, use_safetensors=True)
    model = build_model(cfg, tokenizer)
    model.text_model.load_state_dict(old.text_model.state_dict())
    if model.text_projection.weight.shape == old.text_projection.weight.shape:
        model.text_projection.load_state_dict(old.text_projection.state_dict())
    def vision_shapes(m):
        return [(k, v.shape) for part in (m.vision_model, m.visual_projection) for k, v in part.state_dict().items()]

    if vision_shapes(model) == vision_shapes(old):
        model.vision_model.load_state_dict(old.vision_model.state_dict())
        model.visual_projection.load_state_dict(old.visual_projection.state_dict())
        model.logit_scale.data.copy_(old.logit_scale.data)
    if cfg.freeze_text:
        model.text_model.requires_grad_(False)
    return model


def tokenize(tokenizer, prompts) -> dict:
    return tokenizer(list(prompts), padding="max_length", max_length=MAX_TOKENS, truncation=True,
                     return_tensors="pt")


def contrastive_loss(model: CLIPModel, images: torch.Tensor, tokens: dict, prompts: list[str]) -> torch.Tensor:
    out = model(pixel_values=images, input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    same = torch.tensor([[a == b for b in prompts] for a in prompts], dtype=torch.float32, device=images.device)
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(out.logits_per_image, target) + F.cross_entropy(out.logits_per_text, target))


@torch.no_grad()
def retrieval_top1(model: CLIPModel, tokenizer, images: np.ndarray, prompts: list[str], group: int = 100) -> dict:
    """Text-to-image top-1 among `group` candidates (each text's own image is among them).

    `exact`: the retrieved image is the one rendered from this text (or from the same text).
    `satisfying`: the retrieved image satisfies the text by ShapeEval -- partial captions such as
    'a circle' truly describe several candidates, so this is the well-defined score."""
    from shapes import judge

    model.eval()
    exact = satisfying = total = 0
    for k in range(0, len(prompts) - group + 1, group):
        tok = tokenize(tokenizer, prompts[k:k + group]).to(model.device)
        out = model(pixel_values=to_tensor(images[k:k + group]).to(model.device), **tok)
        best = (out.text_embeds @ out.image_embeds.T).argmax(1)  # both unit-normalised
        for i, j in enumerate(best.tolist()):
            exact += prompts[k + j] == prompts[k + i]
            satisfying += judge(prompts[k + i], images[k + j])[0]
        total += group
    model.train()
    return {"exact": exact / max(total, 1), "satisfying": satisfying / max(total, 1)}


def train(cfg) -> dict:
    """Train the tiny CLIP; cfg.tokenizer_dir must hold the tokenizer (build_tokenizer). On a GPU when
    there is one (accelerate's device)."""
    acc = make_accelerator(cfg)
    tokenizer = CLIPTokenizer.from_pretrained(cfg.tokenizer_dir)
    model = (continue_from(cfg, tokenizer) if cfg.init_from else build_model(cfg, tokenizer)).to(acc.device)

    def take_text_tower(_state=None):
        if cfg.text_from:
            enc = CLIPTextModel.from_pretrained(cfg.text_from, use_safetensors=True, dtype=torch.float32)
            model.text_model.load_state_dict(getattr(enc, "text_model", enc).state_dict())

    take_text_tower()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model_w, opt = acc.prepare(model, opt)
    images, prompts = pool(cfg.data_size, seed=cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1 + 7919 * acc.process_index)

    def step(_):
        n_hard = int(cfg.batch_size * cfg.hard_negative_prob) // 2
        pairs = rng.integers(len(prompts) // 2, size=n_hard) * 2
        idx = np.concatenate([pairs, pairs + 1, rng.integers(len(prompts), size=cfg.batch_size - 2 * n_hard)])
        batch_prompts = [prompts[i] for i in idx]
        loss = contrastive_loss(model_w, to_tensor(images[idx]).to(acc.device),
                                tokenize(tokenizer, batch_prompts).to(acc.device), batch_prompts)
        optimize(opt, loss, params, accelerator=acc)
        return {"loss": loss.detach(), "lr": opt.param_groups[0]["lr"]}  # no sync: read when logged

    result = train_loop(cfg, {"clip": model}, {"clip": opt}, step, accelerator=acc, on_resume=take_text_tower)
    result["model"] = model
    result["tokenizer"] = tokenizer
    return result


def export(model: CLIPModel, tokenizer, out_dir: str | Path) -> None:
    """Save CLIPModel + tokenizer + image processor in the standard hub layout."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    CLIPImageProcessor(do_resize=False, do_center_crop=False, do_rescale=True, rescale_factor=1 / 255,
                       do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(out_dir)
