"""Models panel: what is installed, what each needs, and how to fetch what is missing."""
from __future__ import annotations

import gradio as gr

from pipelines import registry

from .services import Services


def models_table() -> str:
    rows = ["| model | family | role | teacher | steps | memory | licence | status |", "|---|---|---|---|---|---|---|---|"]
    for spec in registry.MODELS.values():
        if registry.installed(spec):
            status = "installed"
        elif spec.unet and not spec.unet[1].endswith(".safetensors"):
            status = "not loadable: published only as a pickle"
        else:
            status = f"{'not built' if spec.is_local else 'missing'}: `{registry.install_hint(spec)}`"
        rows.append(f"| `{spec.id}` | {spec.family} | {spec.role} | {spec.teacher or ''} | {spec.steps} | "
                    f"~{spec.memory_gb:g} GB | {spec.licence} | {status} |")
    return "\n".join(rows)


def build_models(services: Services) -> dict:
    with gr.Tab("Models", id="models"):
        gr.Markdown("Hub models load from the local cache only; fetch them once with the command shown "
                    "(needs a network). Local diffusers folders can be typed into any model box.")
        table = gr.Markdown(models_table(), elem_id="models-table")
        gr.Button("Refresh").click(models_table, None, table, api_visibility="private")
    return {"table": table}
