"""Gradio front end: one module per tab, each `build_<tab>(services)`; `build_demo` puts them together."""
from __future__ import annotations

import gradio as gr

from .compare import build_compare
from .control import build_control
from .evaluate import build_evaluate
from .generate import build_generate
from .models import build_models
from .refine import build_refine
from .services import Services, make_services
from .train import build_train

TITLE = "OneStep Studio"


def build_demo(services: Services | None = None) -> gr.Blocks:
    services = services or make_services()
    services.outputs.mkdir(parents=True, exist_ok=True)
    with gr.Blocks(title=TITLE, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"# {TITLE}\nOne-step text-to-image, live, on your own machine.")
        if services.notice:
            gr.Markdown(f"**Notice:** {services.notice}", elem_id="notice")
        with gr.Tabs():
            generate_tab = build_generate(services)
            compare_tab = build_compare(services)
            build_control(services, generate_tab)
            build_refine(services, generate_tab)
            build_evaluate(services)
            build_models(services)
            build_train(services, generate_tab, compare_tab)  # nothing when services.training is off
    demo.services = services
    return demo


def launch_kwargs(services: Services, host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> dict:
    """Safe defaults: loopback, no share link, curated errors only, capped uploads, only outputs/ served."""
    return dict(server_name=host, server_port=port, share=share, show_error=False, max_file_size="20mb",
                allowed_paths=[str(services.outputs.resolve())], enable_monitoring=False, ssr_mode=False,
                mcp_server=False, run_history=False)


def queue(demo: gr.Blocks) -> gr.Blocks:
    """A bounded queue; all model work shares one concurrency group ("gpu") of size 1."""
    return demo.queue(max_size=16, default_concurrency_limit=1)
