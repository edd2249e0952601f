"""Control tab: pin the layout with a control image (an upload, a sketch, the image in Generate, or a
layout rendered from the prompt), preview its map, and see three ways of following it side by side:
the one-step student with its NCT adapter, the student with its teacher's ControlNet, and the
teacher with its ControlNet, each with its time and (for Canny) how well it keeps the control's edges."""
from __future__ import annotations

import gradio as gr
import numpy as np

from pipelines import control, generation, registry
from pipelines.errors import first_line

from .services import Services, gpu, parse_seed, user_errors

WAYS = (("student + NCT", "student", "nct"), ("student + teacher's ControlNet", "student", "controlnet"),
        ("teacher + ControlNet", "teacher", "controlnet"))


def source_image(upload, sketch):
    """The upload, else the sketch's composite; None when neither holds anything."""
    if upload is not None:
        return upload
    if isinstance(sketch, dict) and sketch.get("composite") is not None:
        arr = np.asarray(sketch["composite"])
        if arr.size and (arr.ndim < 3 or arr.shape[-1] < 4 or arr[..., 3].any()):
            return sketch["composite"]
    return None


def follows(source, output, preprocessor: str, settings: dict) -> str:
    """How well an output keeps the control's edges (Canny only: the other maps are not edges), measured as
    `evaluate --control` does (`control.follow`), at the tab's Canny thresholds."""
    if preprocessor != "canny":
        return ""
    m = control.follow(source, np.asarray(output.convert("RGB")), "canny", **settings)[2]
    return f", edge F1 {m['edge_f1']:.2f} (precision {m['edge_precision']:.2f}, recall {m['edge_recall']:.2f})"


def build_control(services: Services, generate_tab: dict | None = None) -> dict:
    students = services.students(with_teacher=True) or services.model_choices()

    def settings(preprocessor, low, high):
        return {"low": int(low), "high": int(high)} if preprocessor == "canny" else {}

    @user_errors
    def preview(upload, sketch, model_id, preprocessor, low, high):
        img = source_image(upload, sketch)
        if img is None:
            return None
        size = registry.get(model_id).resolution
        return control.make_map(img, preprocessor, size, size, **settings(preprocessor, low, high))

    @gpu
    @user_errors
    def run(model_id, prompt, seed_text, upload, sketch, preprocessor, low, high, scale, teacher_steps):
        img = source_image(upload, sketch)
        if img is None:
            raise ValueError("no control image: upload one, draw one, or press 'Layout from prompt'")
        seed = parse_seed(seed_text, False)
        spec = registry.get(model_id)
        if spec.role != "student" or not spec.teacher:
            raise ValueError(f"{model_id} is not a student with a teacher; Control compares both (pick e.g. shapes-64)")
        img = control.read_image(img)  # decode and check the upload once, not once per way
        cells, lines = [], []
        for label, who, kind in WAYS:
            target = model_id if who == "student" else spec.teacher
            try:
                res = generation.generate(target, prompt, seed=seed, control_image=img, preprocessor=preprocessor,
                                          control_model=kind, control_scale=float(scale),
                                          control_settings=settings(preprocessor, low, high),
                                          steps=int(teacher_steps) if who == "teacher" else None, device=services.device)
            except ValueError as e:  # one missing adapter must not hide the other two
                lines.append(f"**{label}**: unavailable: {first_line(e)}")
                continue
            ms = res.timings["total"] * 1000
            cells.append((res.images[0], f"{label} · {ms:.0f} ms"))
            lines.append(f"**{label}**: {ms:.0f} ms ({res.settings['control']['model']})"
                         + follows(img, res.images[0], preprocessor, settings(preprocessor, low, high)))
        return cells, "  \n".join(lines)

    @user_errors
    def layout_from_prompt(prompt, seed_text):
        from shapes import GrammarError, parse, render

        try:
            spec = parse(prompt)
        except GrammarError as e:
            raise ValueError(f"'Layout from prompt' needs a shapes-world prompt: {e}") from None
        return render(spec, parse_seed(seed_text, False) + 10_000)

    with gr.Tab("Control", id="control"):
        with gr.Row():
            with gr.Column(scale=2):
                model = gr.Dropdown(students, value=students[0] if students else None, label="Student",
                                    allow_custom_value=True, elem_id="control-model")
                prompt = gr.Textbox(label="Prompt", value="a red circle left of a blue square", elem_id="control-prompt")
                seed = gr.Textbox(label="Seed", value="0")
                with gr.Tabs():
                    with gr.Tab("Upload"):
                        upload = gr.Image(label="Control image", type="pil", sources=["upload", "clipboard"],
                                          image_mode="RGBA", height=200, elem_id="control-upload")
                        with gr.Row():
                            from_prompt = gr.Button("Layout from prompt", size="sm", elem_id="control-from-prompt")
                            from_generate = gr.Button("Use the image in Generate", size="sm")
                    with gr.Tab("Sketch"):
                        sketch = gr.Sketchpad(label="Draw the layout", type="pil", height=260, elem_id="control-sketch")
                with gr.Row():
                    preprocessor = gr.Dropdown(list(control.PREPROCESSORS), value="canny", label="Preprocessor",
                                               info="needs weights (not offered): " + ", ".join(control.NEEDS_WEIGHTS))
                    scale = gr.Slider(0, 2, value=1.0, step=0.05, label="Conditioning scale")
                with gr.Row():
                    low = gr.Slider(0, 255, value=control.CANNY_DEFAULTS["low"], step=1, label="Canny low")
                    high = gr.Slider(0, 255, value=control.CANNY_DEFAULTS["high"], step=1, label="Canny high")
                teacher_steps = gr.Slider(1, 100, value=25, step=1, label="Teacher steps")
                button = gr.Button("Generate with control", variant="primary", elem_id="control-btn")
            with gr.Column(scale=3):
                control_map = gr.Image(label="Control map", type="pil", height=160, interactive=False,
                                       elem_id="control-map")
                gallery = gr.Gallery(label="Student + NCT · student + teacher's ControlNet · teacher + ControlNet",
                                     columns=3, height=300, elem_id="control-gallery", format="png")
                summary = gr.Markdown(elem_id="control-summary")
        map_inputs = [upload, sketch, model, preprocessor, low, high]
        for trigger in (upload.change, preprocessor.change, low.release, high.release, model.change):
            trigger(preview, map_inputs, control_map, api_visibility="private")
        sketch.change(preview, map_inputs, control_map, api_visibility="private", trigger_mode="always_last",
                      show_progress="hidden")
        from_prompt.click(layout_from_prompt, [prompt, seed], upload, api_visibility="private")
        if generate_tab:
            def first_image(images):
                if not images:
                    raise gr.Error("Generate has no image yet")
                item = images[0]
                return item[0] if isinstance(item, (tuple, list)) else getattr(item, "image", item)

            from_generate.click(first_image, generate_tab["gallery"], upload, api_visibility="private")
        button.click(run, [model, prompt, seed, upload, sketch, preprocessor, low, high, scale, teacher_steps],
                     [gallery, summary], api_name="control", concurrency_id="gpu")
    return {"model": model}

