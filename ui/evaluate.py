"""Evaluate tab: ShapeEval of any model on a prompt suite (or your own prompts), per GenEval
category, with ReNO optionally on (then the plain and refined scores of the same seeds)."""
from __future__ import annotations

import gradio as gr

from pipelines import evaluate, reno
from shapes.suites import PROMPT_DIR

from .services import Services, gpu, parse_seed, user_errors

SUITES = {"ShapeEval (604 prompts)": PROMPT_DIR / "shapeeval.txt", "held-out combinations (120)": PROMPT_DIR / "heldout.txt"}
MAX_IMAGES = 4096
MAX_RENO_ITERATIONS = 5000  # images x iterations per run: the model is shared, live typing waits meanwhile


def subset(prompts: list[str], limit: int) -> list[str]:
    """`limit` prompts spread evenly over the file (its categories come in blocks)."""
    if limit >= len(prompts):
        return prompts
    step = len(prompts) / limit
    return [prompts[int(i * step)] for i in range(limit)]


def table(summary: dict) -> str:
    plain = summary.get("plain")
    head = "| category | plain | with ReNO | gain |" if plain else "| category | ShapeEval |"
    rows = [head, "|---|---|---|---|" if plain else "|---|---|"]
    for cat, v in {**summary["per_category"], "overall": summary["overall"]}.items():
        if plain:
            p = plain["overall"] if cat == "overall" else plain["per_category"][cat]
            rows.append(f"| {cat} | {p:.3f} | {v:.3f} | {v - p:+.3f} |")
        else:
            rows.append(f"| {cat} | {v:.3f} |")
    return "\n".join(rows) + f"\n\n{summary['num_images']} images"


def build_evaluate(services: Services) -> dict:
    @gpu
    @user_errors
    def run(model_id, suite, custom, limit, images_per_prompt, seed_text, use_reno, iterations):
        if suite == "my prompts":
            lines = [ln.strip() for ln in (custom or "").splitlines() if ln.strip()]
            if not lines:
                raise ValueError("no prompts: write one per line, e.g. 'a red circle'")
            prompts = evaluate.check_prompts(lines, "your prompts")
        elif suite in SUITES:
            prompts = evaluate.read_prompts(SUITES[suite])
        else:
            raise ValueError(f"unknown suite {suite!r}; allowed: {', '.join([*SUITES, 'my prompts'])}")
        prompts = subset(prompts, int(limit))
        if len(prompts) * int(images_per_prompt) > MAX_IMAGES:
            raise ValueError(f"{len(prompts) * int(images_per_prompt)} images asked; at most {MAX_IMAGES} per run")
        config = reno.RenoConfig(iterations=int(iterations)) if use_reno else None
        total = len(prompts) * int(images_per_prompt) * int(iterations)
        if use_reno and total > MAX_RENO_ITERATIONS:
            raise ValueError(f"{total} ReNO iterations asked (images x iterations); at most {MAX_RENO_ITERATIONS} per "
                             "run here: use fewer prompts, or `python -m pipelines evaluate --reno` for the suite")
        summary = evaluate.evaluate(model_id, prompts, int(images_per_prompt), None, parse_seed(seed_text, False),
                                    reno=config, device=services.device)
        return table(summary), summary

    with gr.Tab("Evaluate", id="evaluate"):
        gr.Markdown("ShapeEval: an exact judge of what is in a `shapes-64` picture (GenEval's categories).")
        with gr.Row():
            model = gr.Dropdown(services.model_choices(), value=services.default_model, label="Model",
                                allow_custom_value=True, elem_id="eval-model")
            suite = gr.Dropdown([*SUITES, "my prompts"], value=next(iter(SUITES)), label="Prompts")
            limit = gr.Slider(1, 604, value=24, step=1, label="Prompts used (spread over the suite)")
            per = gr.Slider(1, 4, value=1, step=1, label="Images per prompt")
            seed = gr.Textbox(label="Seed", value="0")
        custom = gr.Textbox(label="My prompts (one per line, in the shapes grammar)", lines=3)
        with gr.Row():
            use_reno = gr.Checkbox(label="ReNO on (students)", value=False)
            iterations = gr.Slider(1, 200, value=reno.RenoConfig.iterations, step=1, label="ReNO iterations")
        button = gr.Button("Evaluate", variant="primary", elem_id="eval-btn")
        result = gr.Markdown(elem_id="eval-table")
        raw = gr.JSON(label="Summary")
        button.click(run, [model, suite, custom, limit, per, seed, use_reno, iterations], [result, raw],
                     api_name="evaluate", concurrency_id="gpu")
    return {"model": model}
