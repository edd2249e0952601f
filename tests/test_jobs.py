"""The training job manager end to end on tiny real components (tiny_sd as the DMD2 teacher), each job a
real `accelerate launch` process group: progress, cancel with a checkpoint, resume that continues the
step count, SIGKILL -> failed with the log tail, a manager restart that reconciles and adopts, "try in
playground" from a checkpoint while the job trains, export into the registry's local models, the CLI,
bad configs refused before anything starts, and checkpoints that survive a kill mid-write."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from training import catalog, checkpoint
from training.jobs import JobManager, group_alive

ROOT = Path(__file__).resolve().parent.parent
TINY = ["batch_size=1", "height=64", "width=64", "log_every=1", "warmup=1", "eval_images=2"]
LONG = TINY + ["steps=100000", "save_every=100000"]  # runs until cancelled; saves only when stopped


def until(predicate, timeout: float = 120, interval: float = 0.3, what: str = "condition"):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if "loss_fake" in ln]


def trainer(job) -> psutil.Process:
    """The training worker (child of the accelerate launcher) of a running job."""
    kids = [p for p in psutil.Process(job.pid).children(recursive=True) if "training.run" in " ".join(p.cmdline())]
    assert kids, "the launcher has no training.run worker"
    return kids[0]


def cli(*args, runs: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "training", "--runs", str(runs), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return tmp_path / "runs"


def test_job_lifecycle_end_to_end(runs, tiny_sd):
    mgr = JobManager(runs, poll_interval=0.3, kill_timeout=60)
    job = mgr.submit("dmd2", base=str(tiny_sd), settings=LONG)
    assert job.status == "running" and (job.path / "config.json").is_file() and job.pgid == job.pid
    cmd = mgr.launch_command(job)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and cmd[cmd.index("--num_processes") + 1] == "1"
    assert cmd[-4:] == ["-m", "training.run", "--config", str(job.path / "config.json")]
    if not torch.cuda.is_available():
        assert "--cpu" in cmd

    # one job at a time: a second one waits in the queue, and cancelling it there is immediate
    second = mgr.submit("dmd2", base=str(tiny_sd), settings=LONG, name="waiting")
    assert second.status == "queued"
    assert mgr.cancel("waiting").status == "cancelled"

    # progress: steps climb, with a pace and an ETA
    prog = until(lambda: (p := mgr.progress(mgr.get(job.id)))["step"] >= 3 and p, what="3 steps")
    assert prog["total"] == 100000 and prog["rate"] > 0 and prog["eta"] > 0
    assert mgr.get(job.id).status == "running"

    # cancel: SIGTERM to the group -> the trainer writes a checkpoint at the step it reached and exits
    mgr.cancel(job.id)
    job = mgr.wait(job.id, timeout=120)
    assert job.status == "cancelled", job.reason
    stopped = job.step
    assert stopped >= 3 and job.checkpoint == f"step-{stopped:08d}" and "resume continues" in job.reason
    assert checkpoint.latest(job.path).name == job.checkpoint
    assert not group_alive(job.pgid)
    assert mgr.latest_sample(job) is not None  # a sample grid was written with the checkpoint

    # resume: the step count continues from the checkpoint (never restarts at 1)
    mgr.resume(job.id)
    until(lambda: mgr.progress(mgr.get(job.id))["step"] >= stopped + 2, what="steps after resume")
    steps = logged_steps(job.path)
    assert steps[:stopped + 2] == list(range(1, stopped + 3)), steps

    # try in playground while the job keeps training: the checkpoint becomes a model folder and an image
    folder, image = mgr.try_in_playground(job.id, "a red circle")
    assert folder == job.path / "export" / job.checkpoint and image.size == (64, 64)
    assert json.loads((folder / "onestep.json").read_text())["role"] == "student"
    assert mgr.get(job.id).status == "running"
    exported = mgr.export(job.id, "my-student")
    from pipelines import registry

    assert str(exported) in registry.local_models(mgr.exports)
    with pytest.raises(ValueError, match="is taken|exists"):
        mgr.export(job.id, "my-student")
    with pytest.raises(ValueError, match="export name"):
        mgr.export(job.id, "../../x")

    # SIGKILL the worker (as the OOM killer would): failed, with the trainer's exit code and the log tail
    trainer(mgr.get(job.id)).send_signal(signal.SIGKILL)
    job = mgr.wait(job.id, timeout=60)
    assert job.status == "failed" and job.exit_code == -9 and "SIGKILL" in job.reason, job.reason
    assert "SIGKILL" in job.log_tail and f"checkpoint step-{stopped:08d} kept" in job.reason

    # the app goes away while a job runs: a detached CLI resume leaves it with no live manager ...
    mgr.close()  # this manager stops watching too
    out = cli("resume", job.id, "--detach", runs=runs)
    assert out.returncode == 0, out.stderr
    running = mgr.get(job.id)
    assert running.status == "running" and group_alive(running.pgid)
    # ... a new manager adopts it (its processes live on) ...
    adopter = JobManager(runs, background=False)
    assert adopter.get(job.id).owner == adopter.me and adopter.get(job.id).status == "running"
    # ... then the machine "crashes" (the whole group is killed) before anyone polls again
    os.killpg(running.pgid, signal.SIGKILL)
    until(lambda: not group_alive(running.pgid), timeout=30, what="the group to die")
    fresh = JobManager(runs, background=False)  # a restart reconciles the stale `running` row
    job = fresh.get(job.id)
    assert job.status == "failed" and job.reason.startswith("process vanished"), job.reason
    assert [j.id for j in fresh.list()] == ["waiting", job.id]

    # delete removes the row and the run folder
    fresh.delete("waiting")
    assert not (runs / "waiting").exists() and [j.id for j in fresh.list()] == [job.id]
    mgr.close()


def sets(*pairs) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


def test_cli_follows_a_job_to_its_end(runs, tiny_sd, copy_model):
    done = cli("run", "--method", "dmd2", "--base", str(tiny_sd), "--name", "short",
               *sets(*TINY, "steps=3", "save_every=3"), runs=runs)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any("running step" in ln for ln in lines) and "completed step 3/3" in lines[-1]
    listed = cli("list", runs=runs)
    assert "short" in listed.stdout and "completed" in listed.stdout
    assert checkpoint.latest(runs / "short").name == "step-00000003"

    # a job that fails at run time (its teacher's UNet config does not match its weights): the CLI exits
    # non-zero, the job is failed with the trainer's exit code and error, and the log tail is printed
    broken = copy_model(tiny_sd)
    unet_cfg = broken / "unet" / "config.json"
    unet_cfg.write_text(json.dumps({**json.loads(unet_cfg.read_text()), "cross_attention_dim": 48}))
    failed = cli("run", "--method", "dmd2", "--base", str(broken), "--name", "broken",
                 *sets(*TINY, "steps=2"), runs=runs)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    last = failed.stdout.splitlines()[-1]
    assert "broken: failed" in last and "exit code 1" in last and "could not load" in last, last
    assert "log tail" in failed.stderr and "Traceback" in failed.stderr
    # refused before anything starts: exit 2 and one line
    refused = cli("run", "--method", "dmd2", "--base", str(tiny_sd), "--set", "steps=-1", runs=runs)
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0
    assert "steps must be a positive whole number" in refused.stderr


BAD = [
    (dict(settings=["stepz=3"]), r"unknown config key 'stepz' for dmd2; allowed: .*steps"),
    (dict(settings=["steps=-5"]), r"steps must be a positive whole number, got -5"),
    (dict(settings=["steps=0"]), r"steps must be a positive whole number, got 0"),
    (dict(settings=["steps=ten"]), r"steps must be a whole number, got 'ten'"),
    (dict(settings=["lr=-1e-4"]), r"lr must be a positive number"),
    (dict(settings=["run_dir=/tmp/elsewhere"]), r"run_dir cannot be set"),
    (dict(settings=["timesteps=[999, 2000]"]), r"timesteps \[999, 2000\] must be 1 to 4"),
    (dict(name="../../x"), r"job name '../../x' is not allowed; allowed: 1-64 letters"),
    (dict(name="x; rm -rf ~"), r"job name 'x; rm -rf ~' is not allowed"),
    (dict(name="a/b"), r"job name 'a/b' is not allowed"),
    (dict(name="$(reboot)"), r"is not allowed"),
    (dict(name="exports"), r"job name 'exports' is reserved"),
    (dict(settings=["prompts=/etc/passwd"]), r"prompts path /etc/passwd is outside the data roots; allowed:"),
    (dict(settings=["prompts=assets/prompts/../../README.md"]), r"outside the data roots"),
    (dict(settings=["nasa_negatives=/etc/passwd"]), r"nasa_negatives path /etc/passwd is outside the data roots"),
    (dict(settings=["nasa_negatives=assets/prompts"]), r"nasa_negatives .*assets/prompts is not a text file"),
    (dict(settings=["gan_weight=0.01", "prompts=assets/prompts/heldout.txt"]), r"gan_weight > 0 needs real images"),
    (dict(settings=["batch_size=1000000000"]), r"not enough memory: the job needs about .* free"),
    (dict(base="nobody/nothing"), r"base model: unknown model 'nobody/nothing'"),
    (dict(processes=999), r"processes 999 is more than this machine has"),
    (dict(method="dmd3"), r"unknown method 'dmd3'; allowed: dmd2, dmd2-4step, msd"),
    (dict(method="vae", base="shapes-64-teacher"), r"trains from nothing and takes no base model"),
    (dict(method="vae", processes=2), r"trains in one process; allowed processes: 1"),
    (dict(prompts_text="\n \n"), r"prompt file holds no prompts"),
    (dict(method="teacher", base=None, settings=["clip_dir=/tmp"]), r"clip_dir /tmp is not the folder it needs"),
    (dict(settings=["route=/nonexistent/router"]), r"route folder /nonexistent/router does not exist"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_configs_are_refused_before_anything_starts(runs, tiny_sd, kwargs, message):
    mgr = JobManager(runs, background=False)
    kw = {"method": "dmd2", "base": str(tiny_sd), "settings": ["steps=2"], **kwargs}
    if "settings" in kwargs:
        kw["settings"] = kwargs["settings"]
    with pytest.raises(ValueError, match=message) as err:
        mgr.submit(**kw)
    assert "\n" not in str(err.value)
    assert mgr.list() == [] and sorted(p.name for p in runs.iterdir()) == ["jobs.db"]


def test_prompts_inside_the_data_roots_and_uploaded_text_are_accepted(runs, tiny_sd, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "mine.txt").write_text("a red circle\na blue square\n")
    mgr = JobManager(runs, data_roots=[data], background=False)
    cfg = catalog.build_config(catalog.get_method("dmd2"), str(tiny_sd), {"prompts": str(data / "mine.txt")},
                               runs / "x", mgr.data_roots)
    assert cfg.prompts == str((data / "mine.txt").resolve()) and cfg.teacher == str(tiny_sd)
    for negatives, want in (("colors", "colors"), (str(data / "mine.txt"), str((data / "mine.txt").resolve()))):
        nasa_t = catalog.build_config(catalog.get_method("dmd2"), str(tiny_sd), {"nasa_negatives": negatives},
                                      runs / "n", mgr.data_roots)
        assert nasa_t.nasa_negatives == want
    assert cfg.timesteps == (999,) and catalog.build_config(
        catalog.get_method("dmd2-4step"), str(tiny_sd), {}, runs / "y", mgr.data_roots).timesteps == (999, 749, 499, 249)
    need = mgr.preflight(catalog.get_method("dmd2"), cfg)
    assert 0 < need["total"] < need["free"]


def test_checkpoint_never_points_resume_at_a_partial_one(tmp_path, monkeypatch):
    from training import common
    from training.config import VaeConfig

    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    checkpoint.save(tmp_path, 5, {"m": model}, {"m": opt})

    # a crash (or a full disk) between the weights and COMPLETE: the last good checkpoint stays the latest
    real = checkpoint.save_file
    calls = []

    def dies_on_second_file(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", dies_on_second_file)
    with pytest.raises(OSError):
        checkpoint.save(tmp_path, 6, {"m": model}, {"m": opt})
    monkeypatch.setattr(checkpoint, "save_file", real)
    assert checkpoint.latest(tmp_path).name == "step-00000005"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # the partial folder was removed

    # what a process killed mid-write leaves: a temp folder, and a step folder without COMPLETE
    partial = tmp_path / "checkpoints" / "step-00000009"
    partial.mkdir()
    (partial / "model-m.safetensors").write_bytes(b"\x10\x00\x00\x00half")
    tmp = tmp_path / "checkpoints" / ".tmp-step-00000010-4242"
    tmp.mkdir()
    (tmp / "model-m.safetensors").write_bytes(b"half")
    assert checkpoint.latest(tmp_path).name == "step-00000005"

    # the training loop resumes from step 5 (not 9 or 10) and its next save clears the leftovers
    cfg = VaeConfig(run_dir=str(tmp_path), steps=7, save_every=1, log_every=1, warmup=1)
    res = common.train_loop(cfg, {"m": model}, {"m": opt}, lambda i: {"loss": 0.0})
    assert res["finished"] and res["step"] == 7
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [6, 7]
    assert not tmp.exists()


KILLER = """
import sys, torch
from training import checkpoint
big = torch.nn.Linear(2048, 2048)  # 16 MB of weights + 32 MB of optimizer state a checkpoint
opt = torch.optim.AdamW(big.parameters())
big(torch.ones(1, 2048)).sum().backward(); opt.step()
for step in range(1, 10000):
    checkpoint.save(sys.argv[1], step, {"m": big}, {"m": opt}, keep=2)
"""


def test_a_kill_during_a_checkpoint_write_leaves_a_loadable_latest(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for attempt in range(2):  # two kills at different moments of the writing loop
        run = tmp_path / f"run{attempt}"
        proc = subprocess.Popen([sys.executable, "-c", KILLER, str(run)], env=env, cwd=ROOT)
        until(lambda run=run, n=1 + attempt % 2: len(checkpoint.complete_checkpoints(run)) >= n, timeout=120,
              interval=0.02, what="a first checkpoint")
        time.sleep(0.05 * attempt)
        proc.kill()
        proc.wait()
        last = checkpoint.latest(run)
        model, opt = torch.nn.Linear(2048, 2048), None
        opt = torch.optim.AdamW(model.parameters())
        state = checkpoint.load(last, {"m": model}, {"m": opt})  # complete: loads without error
        assert state["step"] == int(last.name.split("-")[1])
        for folder in (run / "checkpoints").iterdir():
            if folder.name.startswith("step-"):
                assert (folder / checkpoint.MARKER).is_file()  # no half-written folder ever has a step name


STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a trainer stuck where it cannot stop gracefully
child = subprocess.Popen([sys.executable, "-c",
                          "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"])
print("ready", child.pid, flush=True)
time.sleep(120)
"""


def test_cancel_escalates_to_sigkill_of_the_whole_group(runs, tiny_sd, monkeypatch):
    # the job's command is replaced by a process (and its child) that ignore SIGTERM
    monkeypatch.setattr(JobManager, "launch_command", lambda self, job: [sys.executable, "-c", STUBBORN])
    mgr = JobManager(runs, kill_timeout=1.0, background=False)
    job = mgr.submit("dmd2", base=str(tiny_sd), settings=["steps=5"])
    ready = until(lambda: [ln for ln in mgr.log(job).splitlines() if ln.startswith("ready")], what="the stub")
    grandchild = int(ready[0].split()[1])
    assert os.getpgid(grandchild) == job.pgid  # the whole tree is one process group
    mgr.cancel(job.id)
    mgr.poll()
    assert mgr.get(job.id).status == "running" and group_alive(job.pgid)  # SIGTERM was ignored
    job = mgr.wait(job.id, timeout=30)
    assert job.status == "cancelled" and "killed" in job.reason and "no checkpoint" in job.reason, job.reason
    assert not group_alive(job.pgid)


def test_training_is_hidden_when_the_app_is_exposed(monkeypatch, tmp_path):
    import app
    from ui import build_demo
    from ui.services import Services

    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("ONESTEP_ENABLE_TRAINING", raising=False)
    assert app.training_allowed(app.parse_args([]))
    assert not app.training_allowed(app.parse_args(["--listen", "--auth", "me:secret"]))
    assert not app.training_allowed(app.parse_args(["--share"]))
    assert app.training_allowed(app.parse_args(["--listen", "--auth", "me:secret", "--enable-training"]))
    monkeypatch.setenv("SPACE_ID", "someone/onestep")
    assert not app.training_allowed(app.parse_args([]))
    monkeypatch.setenv("ONESTEP_ENABLE_TRAINING", "1")
    assert app.training_allowed(app.parse_args([]))

    def train_ids(services):
        demo = build_demo(services)
        return {b.elem_id for b in demo.blocks.values() if str(getattr(b, "elem_id", "")).startswith("train-")}

    hidden = Services(outputs=tmp_path / "out", training=False, runs=tmp_path / "hidden-runs")
    assert train_ids(hidden) == set() and not (tmp_path / "hidden-runs").exists()  # no tab, no events, no jobs
    shown = Services(outputs=tmp_path / "out", runs=tmp_path / "runs")
    assert {"train-start", "train-cancel", "train-resume", "train-try", "train-export"} <= train_ids(shown)
