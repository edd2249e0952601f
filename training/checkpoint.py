"""Checkpoints: atomic, safetensors-only, resumable from the latest *complete* one.

Layout of a run folder::

    run/config.json                    the resolved config (written once by the runner)
    run/metrics.jsonl                  one JSON line per logged step
    run/checkpoints/step-00000500/     model-<name>.safetensors, optim-<name>.safetensors,
                                       optim-<name>.json, state.json, COMPLETE

A checkpoint is written into a hidden temporary folder, marked COMPLETE, then renamed into place,
so a crash mid-write never leaves a folder that looks finished. Older checkpoints are rotated only
after the new one is complete.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MARKER = "COMPLETE"


def _flat_optim(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optim(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') bytes to disk, so COMPLETE never lands before the data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(run_dir: str | Path, step: int, modules: dict, optimizers: dict | None = None,
         state: dict | None = None, keep: int = 2) -> Path:
    """Write checkpoint `step` atomically; then keep only the newest `keep` complete ones.

    Order: every file into a hidden temp folder and fsync'd, then COMPLETE, then one rename into
    place. A crash (or ENOSPC) at any point leaves either the previous complete checkpoints or the
    new one; a leftover temp folder is never picked by `latest` and is cleared by the next save."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, module in modules.items():
            sd = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            save_file(sd, str(tmp / f"model-{name}.safetensors"))
        for name, opt in (optimizers or {}).items():
            tensors, meta = _flat_optim(opt)
            save_file(tensors, str(tmp / f"optim-{name}.safetensors"))
            (tmp / f"optim-{name}.json").write_text(json.dumps(meta))
        (tmp / "state.json").write_text(json.dumps({"step": step, **(state or {})}))
        for f in tmp.iterdir():
            _fsync(f)
        (tmp / MARKER).write_text("ok\n")
        _fsync(tmp / MARKER)
        _fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # e.g. disk full: the last good checkpoint stays as it was
        raise
    if final.exists():  # the same step saved again: move the old one aside first (rename needs an empty target)
        old = root / f".old-step-{step:08d}-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(root)
    for stale in [*root.glob(".tmp-*"), *root.glob(".old-*")]:  # left by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    for old in complete_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first; half-written ones are ignored."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / MARKER).is_file())


def latest(run_dir: str | Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def load(ckpt: str | Path, modules: dict, optimizers: dict | None = None, new: tuple = ()) -> dict:
    """Restore modules (and optimizers) from a checkpoint folder; return its state.json. Names in `new`
    may be missing from it (a phase that starts training a part the phase before kept fixed): those keep
    their initial state."""
    ckpt = Path(ckpt)
    if not (ckpt / MARKER).is_file():
        raise ValueError(f"checkpoint {ckpt} is incomplete (no {MARKER} marker); resume from a complete one")
    modules = {k: v for k, v in modules.items() if k not in new or (ckpt / f"model-{k}.safetensors").is_file()}
    optimizers = {k: v for k, v in (optimizers or {}).items() if k not in new or (ckpt / f"optim-{k}.json").is_file()}
    for name, module in modules.items():
        module.load_state_dict(load_file(str(ckpt / f"model-{name}.safetensors")))
    for name, opt in optimizers.items():
        _load_optim(opt, load_file(str(ckpt / f"optim-{name}.safetensors")),
                    json.loads((ckpt / f"optim-{name}.json").read_text()))
    return json.loads((ckpt / "state.json").read_text())
