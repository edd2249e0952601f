"""Multi-student models (MSD, Song et al., ICML 2025, arXiv 2410.23274): K one-step students, each
owning a disjoint part of the prompt space; a router sends each prompt to exactly one of them, so a
generation still costs one network evaluation.

An MSD model is a folder holding `msd.json` and one diffusers student folder per student:

    {"router": {"type": "category", "groups": [["single_object", "colors"], ...], "default": 0}
               | {"type": "embedding", "mean": [...], "directions": [[...], [...]]},
     "students": ["student-0", "student-1", ...], "teacher": "...", "steps": 1, "timesteps": [999]}

Routers: `category` (shapes-grammar prompts by GenEval category; prompts outside the grammar go to
`default`) and `embedding` (the sign pattern of the pooled text embedding on one or two principal
directions: 2 or 4 students, the paper's "quadrants").
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

MSD_FILE = "msd.json"


def is_msd(path: str | Path) -> bool:
    return (Path(path) / MSD_FILE).is_file()


def read(path: str | Path) -> dict:
    meta = json.loads((Path(path) / MSD_FILE).read_text())
    students = meta.get("students", [])
    if not students:
        raise ValueError(f"{Path(path) / MSD_FILE} lists no students")
    for s in students:
        if "/" in s or s.startswith("."):
            raise ValueError(f"student folder {s!r} in {MSD_FILE} must be a plain folder name")
    return meta


def pooled_embedding(pipe, prompts: list[str]) -> torch.Tensor:
    """Token-pooled (mean) text embedding of the first text encoder, as the paper pools over tokens."""
    tok = pipe.tokenizer(list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = pipe.text_encoder(tok.input_ids.to(pipe.text_encoder.device))[0].float()
    mask = tok.attention_mask.to(hidden.device).unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


def fit_embedding_router(pipe, prompts: list[str], num_students: int) -> dict:
    """Mean and top principal directions of the pooled embeddings: sign patterns split the space
    into equal-ish halves or quadrants."""
    if num_students not in (2, 4):
        raise ValueError(f"an embedding router splits into 2 or 4 students, not {num_students}")
    emb = pooled_embedding(pipe, prompts)
    mean = emb.mean(0)
    _, _, v = torch.linalg.svd(emb - mean, full_matrices=False)
    k = 1 if num_students == 2 else 2
    return {"type": "embedding", "mean": mean.tolist(), "directions": v[:k].tolist()}


def route(router: dict, prompts: list[str], pipe=None) -> list[int]:
    """Student index for each prompt."""
    if router["type"] == "category":
        from shapes import GrammarError, parse

        out = []
        for p in prompts:
            try:
                cat = parse(p).category
            except GrammarError:
                out.append(int(router.get("default", 0)))
                continue
            out.append(next(i for i, g in enumerate(router["groups"]) if cat in g))
        return out
    if router["type"] == "embedding":
        if pipe is None:
            raise ValueError("an embedding router needs the text encoder (pipe)")
        emb = pooled_embedding(pipe, prompts) - torch.tensor(router["mean"])
        signs = (emb @ torch.tensor(router["directions"]).T > 0).long()
        weights = 2 ** torch.arange(signs.shape[1])
        return (signs * weights).sum(1).tolist()
    raise ValueError(f"unknown router type {router['type']!r}; allowed: category, embedding")
