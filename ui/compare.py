"""Compare tab: the one-step student beside its multi-step teacher, from the same noise."""
from __future__ import annotations

import gradio as gr

from pipelines import compare, nasa, registry

from .generate import NEGATIVE_MODES
from .services import Services, gpu, parse_seed, user_errors


def caption(item: compare.Scored) -> str:
    parts = [item.label, f"{item.seconds * 1000:.0f} ms"]
    if item.clip_score is not None:
        parts.append(f"CLIP {item.clip_score:.1f}")
    if item.shapeeval:
        parts.append(f"ShapeEval {item.shapeeval}")
    return " · ".join(parts)


def build_compare(services: Services) -> dict:
    students = sorted(services.students(with_teacher=True), key=lambda m: not _installed(m))

    @gpu
    @user_errors
    def run(model_id, prompt, seed_text, steps, teacher_steps, guidance, negative_prompt="", negative_mode="nasa",
            nasa_alpha=None):
        seed = parse_seed(seed_text, False)
        res = compare.compare(model_id, prompt, seed=seed, steps=int(steps), teacher_steps=int(teacher_steps),
                              guidance_scale=float(guidance), device=services.device,
                              negative_prompt=negative_prompt or "", negative_mode=negative_mode or "nasa",
                              nasa_alpha=None if nasa_alpha is None else float(nasa_alpha))
        s, t = res["student"], res["teacher"]
        summary = (f"**Student** {caption(s)}  \n**Teacher** {caption(t)}  \n"
                   f"**Speedup** {res['speedup']:.1f}x from the same initial noise")
        strip = [(x.image, caption(x)) for x in res["strip"]]
        return [(s.image, caption(s)), (t.image, caption(t))], summary, strip

    with gr.Tab("Compare", id="compare"):
        with gr.Row():
            model = gr.Dropdown(students or services.model_choices(), value=students[0] if students else None,
                                label="Student", allow_custom_value=True, elem_id="compare-model")
            prompt = gr.Textbox(label="Prompt", value="a red circle left of a blue square", elem_id="compare-prompt")
            seed = gr.Textbox(label="Seed", value="0")
        with gr.Row():
            steps = gr.Slider(1, 4, value=1, step=1, label="Student steps")
            teacher_steps = gr.Slider(1, 100, value=25, step=1, label="Teacher steps")
            guidance = gr.Slider(0, 15, value=5.0, step=0.5, label="Teacher CFG")
        with gr.Row():
            negative = gr.Textbox(label="Negative prompt", value="", elem_id="compare-negative",
                                  info="the teacher always steers away with its CFG")
            negative_mode = gr.Radio(NEGATIVE_MODES, value="nasa", label="Student's negative prompt by",
                                     elem_id="compare-negative-mode")
            first = _known(students[0]) if students else None
            nasa_alpha = gr.Slider(0, first.nasa_alpha_max if first else nasa.MAX_ALPHA,
                                   value=first.offered_nasa_alpha if first else registry.DEFAULT_NASA_ALPHA,
                                   step=0.05, label="NASA alpha", elem_id="compare-nasa-alpha")
        button = gr.Button("Compare", variant="primary", elem_id="compare-btn")
        pair = gr.Gallery(label="Student · Teacher", columns=2, height=360, elem_id="compare-pair", format="png")
        summary = gr.Markdown(elem_id="compare-summary")
        strip = gr.Gallery(label="Student at 1, 2, 4 steps", columns=3, height=220, elem_id="compare-strip", format="png")
        button.click(run, [model, prompt, seed, steps, teacher_steps, guidance, negative, negative_mode, nasa_alpha],
                     [pair, summary, strip], api_name="compare", concurrency_id="gpu")
        model.change(_on_model, model, nasa_alpha, api_visibility="private")
    return {"model": model}


def _known(model_id) -> registry.ModelSpec | None:
    """The student's registry entry; None for a model the registry does not know."""
    try:
        return registry.get(model_id)
    except (registry.UnknownModelError, TypeError):
        return None


def _on_model(model_id):
    spec = _known(model_id)
    return gr.update() if spec is None else gr.update(value=spec.offered_nasa_alpha, maximum=spec.nasa_alpha_max)


def _installed(model_id: str) -> bool:
    spec = registry.get(model_id)
    return spec.is_local and registry.installed(spec)

