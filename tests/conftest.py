"""Shared fixtures: tiny SD/SDXL pipelines in hub layout, built once per session, offline."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("ONESTEP_ONNX_BUILD", "0")  # no background ONNX exports unless a test asks for one


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    from tests.tiny_models import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory):
    from tests.tiny_models import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd-v", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    from tests.tiny_models import make_tiny_sdxl

    return make_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture
def copy_model(tmp_path):
    """A writable copy of a model folder, to break in a test."""

    def _copy(src):
        from training.methods.dmd2 import copy_folder

        return copy_folder(src, tmp_path / f"copy-{src.name}")  # a student keeps borrowing its teacher's parts

    return _copy


@pytest.fixture(scope="session")
def tiny_student(tiny_sd, tmp_path_factory):
    """A one-step DMD2 student of tiny_sd (two training steps), exported with its teacher recorded."""
    import json

    from training.config import Dmd2Config
    from training.methods import dmd2

    root = tmp_path_factory.mktemp("student")
    cfg = Dmd2Config(teacher=str(tiny_sd), run_dir=str(root / "run"), prompts="shapes", steps=2, batch_size=1,
                     height=64, width=64, warmup=1)
    out = dmd2.export(dmd2.train(cfg), cfg, root / "tiny-student")
    meta = json.loads((out / "onestep.json").read_text())
    (out / "onestep.json").write_text(json.dumps({**meta, "resolution": 64}))
    return out


@pytest.fixture(scope="session")
def shapes_student(tiny_student, tmp_path_factory):
    """The tiny student presented as a shapes-world model (its teacher is shapes-64-teacher), so its
    default reward is the embedded tiny CLIP."""
    import json

    from training.methods.dmd2 import copy_folder

    dst = copy_folder(tiny_student, tmp_path_factory.mktemp("shapes-student") / "student")
    meta = json.loads((dst / "onestep.json").read_text())
    (dst / "onestep.json").write_text(json.dumps({**meta, "teacher": "shapes-64-teacher"}))
    return dst
