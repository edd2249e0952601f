"""What the tabs need from the rest of the app, passed in explicitly (no module-level state)."""
from __future__ import annotations

import functools
import inspect
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from pipelines import loading, registry
from pipelines.errors import first_line
from pipelines.registry import UnknownModelError

EMBEDDED_CHAIN = ("shapes-64", "shapes-64-teacher")


@dataclass
class Services:
    outputs: Path = Path("outputs")
    default_model: str = registry.DEFAULT_MODEL
    notice: str = ""  # shown at the top of the page when the default could not be served
    device: str | None = None
    extra_models: list[str] = field(default_factory=list)
    training: bool = True  # the Train tab; off when the app listens beyond loopback without --enable-training
    runs: Path | None = None  # training runs root (None: $ONESTEP_RUNS or runs/)
    jobs: object = field(default=None, repr=False)  # the JobManager, made on first use (job_manager())

    def students(self, with_teacher: bool = False) -> list[str]:
        """The offered models that are one- to few-step students (with a teacher to compare, if asked)."""
        found = []
        for model_id in self.model_choices():
            try:
                spec = registry.get(model_id)
            except UnknownModelError:
                continue
            if spec.role == "student" and (spec.teacher is not None or not with_teacher):
                found.append(model_id)
        return found

    def output_path(self, name: str) -> Path:
        """outputs/<time>-<random>-<name>: unguessable, since outputs/ is served and other users must not
        find this user's files."""
        return self.outputs / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(8)}-{name}"

    def exports_dir(self) -> Path:
        return Path(self.runs) / "exports" if self.runs is not None else registry.exports_root()

    def model_choices(self) -> list[str]:
        return list(dict.fromkeys([self.default_model, *registry.MODELS, *self.extra_models,
                                   *registry.local_models(self.exports_dir())]))

    def job_manager(self):
        if self.jobs is None:
            from training.jobs import JobManager

            self.jobs = JobManager(self.runs)
        return self.jobs


def make_services(outputs: str | Path = "outputs", device: str | None = None, training: bool = True,
                  runs: str | Path | None = None) -> Services:
    """Pick the default model: the embedded one-step student, else its teacher (with a notice)."""
    svc = Services(outputs=Path(outputs), device=device, training=training,
                   runs=Path(runs) if runs is not None else None)
    for model_id in EMBEDDED_CHAIN:
        if registry.installed(registry.MODELS[model_id]):
            svc.default_model = model_id
            if model_id != registry.DEFAULT_MODEL:
                svc.notice = (f"The embedded one-step student `{registry.DEFAULT_MODEL}` is not built yet; serving "
                              f"its multi-step teacher `{model_id}` instead. Build the student with "
                              f"`{registry.install_hint(registry.MODELS[registry.DEFAULT_MODEL])}`.")
            return svc
    svc.notice = ("No embedded model is installed (assets/models/shapes-64 is missing). Build it with "
                  f"`{registry.SHAPES_RECIPE}`, or pick a hub model "
                  "and fetch it with `python -m pipelines prefetch <id>`.")
    return svc


def gpu(fn):
    """On a ZeroGPU Space, GPU work must run inside spaces.GPU; elsewhere this is the function itself."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn)


def user_errors(fn):
    """Turn our one-line errors into gr.Error so the page shows them (show_error stays False)."""

    def one_line(e: Exception) -> gr.Error:
        return gr.Error(first_line(e, 500))

    if inspect.isgeneratorfunction(fn):  # streaming handlers fail while iterating, not when called
        @functools.wraps(fn)
        def streaming(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except (ValueError, UnknownModelError, loading.LoadError) as e:
                raise one_line(e) from None

        return streaming

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ValueError, UnknownModelError, loading.LoadError) as e:
            raise one_line(e) from None

    return wrapper


def parse_seed(text, randomize: bool) -> int:
    """Seed from a textbox; a random one when asked."""
    if randomize:
        return secrets.randbelow(2**32)
    raw = str(text).strip()
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"seed {raw[:40]!r} is not a whole number; allowed: 0 to {2**32 - 1}") from None
    if not 0 <= value < 2**32:
        raise ValueError(f"seed {value} is out of range; allowed: 0 to {2**32 - 1}")
    return value
