"""Train tab: start, cancel, resume and delete background training jobs (training/jobs.py), with a live
log tail, a progress bar with ETA, loss curves, the newest sample grid and the job history. "Try in
playground" turns the latest complete checkpoint into a model folder, makes one image with it and puts
it in the Generate and Compare model boxes while the job keeps training; "Export" writes a model folder
that the registry lists as a local model.

Built only when `services.training` is on: the app turns it off when it listens beyond loopback
without --enable-training, and then no Train event exists at all."""
from __future__ import annotations

import html
import time
from pathlib import Path

import gradio as gr

from pipelines import registry
from training import catalog, runlog
from training.jobs import MAX_PROMPT_BYTES

from .services import Services, gpu, user_errors

TICK_SECONDS = 2.0
SHAPES_WORLD = "shapes world"
UPLOADED = "uploaded file"
HISTORY_COLUMNS = ["job", "method", "base", "status", "step", "started", "took", "reason"]
MAX_PLOT_POINTS = 1500
QUIET_WARNING = 300  # seconds without a metrics line before the bar says so


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s" if m else f"{s}s"


def progress_html(job, prog: dict | None) -> str:
    if job is None:
        return "<div id='train-progress-bar' data-step='0'>no job selected</div>"
    pct = 100.0 * prog["fraction"]
    bits = [f"step {prog['step']:,} / {prog['total']:,} ({pct:.0f}%)"]
    if prog.get("rate"):
        bits.append(f"{prog['rate']:.1f} steps/s")
    if prog.get("eta") is not None:
        bits.append(f"ETA {_duration(prog['eta'])}")
    bits.append(job.status)
    if prog.get("quiet") is not None and prog["quiet"] > QUIET_WARNING:
        bits.append(f"nothing logged for {_duration(prog['quiet'])}: loading, a long checkpoint, or hung")
    color = {"failed": "#d9534f", "cancelled": "#999", "completed": "#2e9b4f"}.get(job.status, "#4f6df5")
    return (f"<div id='train-progress-bar' data-step='{prog['step']}' data-total='{prog['total']}' "
            f"data-status='{job.status}'>"
            f"<div style='background:#e5e7eb;border-radius:6px;height:14px;overflow:hidden'>"
            f"<div style='width:{pct:.2f}%;background:{color};height:14px'></div></div>"
            f"<div class='train-progress-text'>{html.escape(' · '.join(bits))}</div></div>")


def status_md(job) -> str:
    if job is None:
        return "Start a job, or pick one above."
    lines = [f"**{job.id}** · {job.method} · {job.status}"]
    if job.reason and job.reason != job.status:
        lines.append(html.escape(job.reason))
    if job.checkpoint:
        lines.append(f"latest complete checkpoint: `{job.checkpoint}`")
    if job.exit_code is not None and job.status == "failed":
        lines.append(f"exit code {job.exit_code}")
    return "  \n".join(lines)


def loss_frame(rows: list[dict]):
    """Loss and sample-score curves as long-form rows (step, value, series) for gr.LinePlot."""
    import pandas as pd

    points = []
    for r in rows:
        for k, v in r.items():
            if k.startswith(("loss", "sample_")) and isinstance(v, (int, float)):
                points.append({"step": r["step"], "value": float(v), "series": f"{r.get('source', '')}{k}"})
    if len(points) > MAX_PLOT_POINTS:  # keep the plot light: every n-th point, always the newest
        stride = len(points) // MAX_PLOT_POINTS + 1
        points = points[::stride] + points[-1:]
    if not points:  # None, not an empty frame: a plot that starts from an empty frame never draws its lines
        return None
    return pd.DataFrame(points, columns=["step", "value", "series"]).astype(
        {"step": "int64", "value": "float64", "series": "str"})


def history_rows(jobs) -> list[list]:
    rows = []
    for j in jobs:
        started = time.strftime("%m-%d %H:%M", time.localtime(j.started)) if j.started else ""
        took = _duration((j.ended or time.time()) - j.started) if j.started and j.status != "queued" else ""
        rows.append([j.id, j.method, j.base, j.status, f"{j.step}/{j.total}", started, took, j.reason[:160]])
    return rows


def base_choices(method: str) -> list[str]:
    m = catalog.METHODS[method]
    want = "student" if m.base_field == "student" else "teacher"
    ids = [i for i, s in registry.MODELS.items() if s.role == want and s.family in registry.UNET_FAMILIES]
    return list(dict.fromkeys([m.default_base, *ids])) if m.default_base else ids


def build_train(services: Services, generate_tab: dict | None = None, compare_tab: dict | None = None) -> dict | None:
    if not services.training:
        return None
    jobs = services.job_manager()
    builtin = catalog.builtin_prompt_lists()
    first = next(iter(catalog.METHODS))

    def settings_hint(method: str) -> str:
        m = catalog.METHODS[method]
        shown = {k: v for k, v in m.defaults.items() if k not in ("steps", "batch_size", "prompts")}
        return "defaults: " + ", ".join(f"{k}={v}" for k, v in shown.items()) if shown else "no extra defaults"

    def defaults_of(method: str) -> dict:
        m = catalog.METHODS[method]
        base = {f: getattr(catalog.CONFIGS[m.config], f) for f in ("steps", "batch_size")}
        return {**base, **{k: v for k, v in m.defaults.items() if k in base}}

    def on_method(method):
        m = catalog.METHODS[method]
        d = defaults_of(method)
        has_prompts = "prompts" in catalog.field_names(m.config_class())
        return (gr.update(choices=base_choices(method), value=m.default_base, visible=m.base_field is not None),
                gr.update(visible=has_prompts), d["steps"], d["batch_size"],
                gr.update(info=settings_hint(method)), gr.update(value=1, interactive=m.multi_process))

    @user_errors
    def start(method, base, prompts, upload, name, steps, batch, processes, settings):
        m = catalog.get_method(method)
        pairs = [ln.strip() for ln in (settings or "").splitlines() if ln.strip() and not ln.strip().startswith("#")]
        if steps is not None:
            pairs.append(f"steps={int(steps)}")
        if batch is not None:
            pairs.append(f"batch_size={int(batch)}")
        prompts_text = None
        if "prompts" in catalog.field_names(m.config_class()) and not any(p.startswith("prompts=") for p in pairs):
            if prompts == UPLOADED:
                if not upload:
                    raise ValueError("choose a prompt file to upload (.txt, one prompt a line), or another prompt source")
                # one byte over the limit is enough for the manager to say the file is too large
                prompts_text = Path(upload).read_bytes()[:MAX_PROMPT_BYTES + 1].decode("utf-8", errors="replace")
            elif prompts in builtin:
                pairs.append(f"prompts={builtin[prompts]}")
            else:
                pairs.append("prompts=shapes")
        job = jobs.submit(method, base=(base or None) if m.base_field else None, settings=pairs, name=name or None,
                          processes=int(processes or 1), prompts_text=prompts_text)
        return gr.update(choices=_ids(), value=job.id), f"started **{job.id}** ({job.status})"

    @user_errors
    def act(action, job_id):
        if not job_id:
            raise ValueError("pick a job first")
        if action == "delete":
            jobs.delete(job_id)
            ids = _ids()
            return gr.update(choices=ids, value=ids[0] if ids else None), f"deleted {job_id} and its run folder"
        job = getattr(jobs, action)(job_id)
        return gr.update(), f"{job.id}: {job.reason or job.status}"

    @gpu
    @user_errors
    def try_it(job_id, prompt):
        if not job_id:
            raise ValueError("pick a job first")
        folder, image = jobs.try_in_playground(job_id, prompt or "a red circle", device=services.device)
        if str(folder) not in services.extra_models:
            services.extra_models.append(str(folder))
        note = (f"`{folder}` (latest complete checkpoint) is now in the Generate and Compare model boxes; "
                "the job keeps training")
        return (image, note, *_model_box_updates(str(folder)))

    @user_errors
    def export(job_id, name):
        if not job_id:
            raise ValueError("pick a job first")
        out = jobs.export(job_id, name or None)
        listed = str(out) in registry.local_models(services.exports_dir())
        note = f"exported to `{out}`" + (" — listed in the model boxes" if listed else "")
        return (note, *_model_box_updates(None))

    def _model_box_updates(select: str | None):
        value = {"value": select} if select else {}
        return [gr.update(choices=services.model_choices(), **value) for tab in (generate_tab, compare_tab)
                if tab is not None]

    def _ids() -> list[str]:
        return [j.id for j in jobs.list()]

    def refresh(job_id, shown):
        """Timer tick: poll the manager; send only what changed (the sample and plot are not resent each tick)."""
        if not jobs.watching:  # the manager's own thread polls every second when it runs
            jobs.poll()
        shown = dict(shown or {})
        all_jobs = jobs.list()
        ids = [j.id for j in all_jobs]
        job = next((j for j in all_jobs if j.id == job_id), None)
        out_ids = gr.update()
        if ids != shown.get("ids"):
            out_ids = gr.update(choices=ids, value=job_id if job else (ids[0] if ids else None))
            shown["ids"] = ids
        prog = jobs.progress(job) if job else None
        sample, plot, log = gr.update(), gr.update(), gr.update()
        if job is not None:
            grid = jobs.latest_sample(job)
            key = f"{job.id}:{grid}:{grid.stat().st_mtime if grid else 0}"
            if key != shown.get("sample"):
                from PIL import Image

                sample = Image.open(grid).convert("RGB") if grid else None
                shown["sample"] = key
            key = f"{job.id}:{runlog.metrics_stamp(job.method, job.path)}"
            if key != shown.get("plot"):  # parse the metrics only when a file changed
                plot = loss_frame(jobs.metrics(job))
                shown["plot"] = key
            text = jobs.log(job) if job.status == "running" else (jobs.log(job) or job.log_tail)
            if text != shown.get("log"):
                log = text
                shown["log"] = text
        history = history_rows(all_jobs)
        table = history if history != shown.get("history") else gr.update()
        shown["history"] = history
        return out_ids, progress_html(job, prog), status_md(job), sample, plot, log, table, shown

    with gr.Tab("Train", id="train"):
        shown = gr.State({})
        with gr.Row():
            with gr.Column(scale=2):
                method = gr.Dropdown([(m.label, m.name) for m in catalog.METHODS.values()], value=first,
                                     label="Method", elem_id="train-method")
                m0 = catalog.METHODS[first]
                base = gr.Dropdown(base_choices(first), value=m0.default_base, label="Base model",
                                   allow_custom_value=True, elem_id="train-base", visible=m0.base_field is not None,
                                   info="a registry id or the path of a local diffusers folder")
                with gr.Group(visible="prompts" in catalog.field_names(m0.config_class())) as prompt_group:
                    prompts = gr.Radio([SHAPES_WORLD, *builtin, UPLOADED], value=SHAPES_WORLD, label="Prompts",
                                       elem_id="train-prompts")
                    upload = gr.File(label="Prompt file (.txt, one prompt a line, up to 1 MB)", file_types=[".txt"],
                                     type="filepath", elem_id="train-upload")
                d0 = defaults_of(first)
                with gr.Row():
                    name = gr.Textbox(label="Job name (optional)", placeholder="e.g. my-student", elem_id="train-name")
                    processes = gr.Number(1, precision=0, minimum=1, label="Processes / GPUs", elem_id="train-processes")
                with gr.Row():
                    steps = gr.Number(d0["steps"], precision=0, label="Steps", elem_id="train-steps")
                    batch = gr.Number(d0["batch_size"], precision=0, label="Batch size", elem_id="train-batch")
                settings = gr.Textbox(label="More settings (key=value, one a line)", lines=3, elem_id="train-settings",
                                      info=settings_hint(first), placeholder="lr=5e-5\nsave_every=100")
                start_btn = gr.Button("Start", variant="primary", elem_id="train-start")
                message = gr.Markdown(elem_id="train-message")
            with gr.Column(scale=3):
                ids = _ids()
                job = gr.Dropdown(ids, value=ids[0] if ids else None, label="Job", elem_id="train-job")
                progress = gr.HTML(progress_html(None, None), elem_id="train-progress")
                status = gr.Markdown(status_md(None), elem_id="train-status")
                with gr.Row():
                    cancel_btn = gr.Button("Cancel", elem_id="train-cancel")
                    resume_btn = gr.Button("Resume", elem_id="train-resume")
                    delete_btn = gr.Button("Delete", variant="stop", elem_id="train-delete")
                with gr.Row():
                    sample = gr.Image(label="Latest samples", type="pil", interactive=False, elem_id="train-sample",
                                      format="png", height=260)
                    plot = gr.LinePlot(None, x="step", y="value", color="series", label="Losses",
                                       elem_id="train-plot", height=260)
                log = gr.Textbox(label="Log (last lines)", lines=10, max_lines=10, interactive=False,
                                 elem_id="train-log", autoscroll=True)
                with gr.Row():
                    play_prompt = gr.Textbox("a red circle", label="Playground prompt", elem_id="train-play-prompt")
                    try_btn = gr.Button("Try in playground", elem_id="train-try")
                with gr.Row():
                    export_name = gr.Textbox(label="Export name (optional)", elem_id="train-export-name")
                    export_btn = gr.Button("Export", elem_id="train-export")
                play_image = gr.Image(label="From the latest checkpoint", type="pil", interactive=False,
                                      elem_id="train-play-image", format="png", height=200)
                play_note = gr.Markdown(elem_id="train-play-note")
        history = gr.Dataframe(history_rows(jobs.list()), headers=HISTORY_COLUMNS, interactive=False,
                               label="Jobs", elem_id="train-history", wrap=True)
        timer = gr.Timer(TICK_SECONDS)

        boxes = [c["model"] for c in (generate_tab, compare_tab) if c is not None]
        private = {"api_visibility": "private"}
        quiet = {**private, "show_progress": "hidden"}  # refreshes never cover the page with spinners
        view = [job, progress, status, sample, plot, log, history, shown]
        method.change(on_method, method, [base, prompt_group, steps, batch, settings, processes], **private)
        start_btn.click(start, [method, base, prompts, upload, name, steps, batch, processes, settings],
                        [job, message], **private).then(refresh, [job, shown], view, **quiet)
        for btn, action in ((cancel_btn, "cancel"), (resume_btn, "resume")):
            btn.click(lambda j, a=action: act(a, j), job, [job, message], **private).then(
                refresh, [job, shown], view, **quiet)
        # deleting removes the run folder: ask in the browser first (a declined confirm sends no job)
        delete_btn.click(lambda j: act("delete", j) if j else (gr.update(), "not deleted"), job, [job, message],
                         js="(j) => (j && confirm('Delete job ' + j + ' and its run folder?')) ? j : null",
                         **private).then(refresh, [job, shown], view, **quiet)
        job.input(lambda j: refresh(j, {}), job, view, **quiet)  # another job picked: send everything afresh
        try_btn.click(try_it, [job, play_prompt], [play_image, play_note, *boxes], concurrency_id="gpu", **private)
        export_btn.click(export, [job, export_name], [play_note, *boxes], **private)
        timer.tick(refresh, [job, shown], view, **quiet)
    return {"job": job, "progress": progress, "timer": timer}
