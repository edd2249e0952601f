"""Generate tab: prompt in, images out, with the time each stage took."""
from __future__ import annotations

import time

import gradio as gr

from pipelines import generation, registry

from .services import Services, parse_seed, user_errors


def timing_line(timings: dict, n: int) -> str:
    ms = {k: v * 1000 for k, v in timings.items()}
    return (f"text encoding {ms['text_encoding']:.0f} ms · denoising {ms['denoising']:.0f} ms · "
            f"decoding {ms['decoding']:.0f} ms · total {ms['total']:.0f} ms · "
            f"{n / max(timings['total'], 1e-9):.1f} images/s")


def build_generate(services: Services) -> dict:
    spec = registry.get(services.default_model)

    @user_errors
    def run(model_id, prompt, negative_prompt, seed_text, randomize, steps, size, batch_size):
        spec = registry.get(model_id)
        seed = parse_seed(seed_text, randomize)
        res = generation.generate(model_id, prompt, negative_prompt=negative_prompt or "", steps=int(steps),
                                  seed=seed, batch_size=int(batch_size), height=int(size), width=int(size),
                                  device=services.device)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        files = []
        for i, img in enumerate(res.images):
            settings = generation.image_settings(res.settings, i)
            path = services.outputs / f"{stamp}-{settings['seed']}.png"
            files.append((str(generation.save_png(img, path, settings)), f"seed {settings['seed']}"))
        return files, timing_line(res.timings, len(res.images)), str(seed)

    def on_model(model_id):
        try:
            s = registry.get(model_id)
        except registry.UnknownModelError:
            return gr.update(), gr.update()
        max_steps = 50 if s.role == "teacher" else 4
        return gr.update(value=s.steps, maximum=max_steps), gr.update(value=s.resolution)

    with gr.Tab("Generate", id="generate"):
        with gr.Row():
            with gr.Column(scale=2):
                model = gr.Dropdown(services.model_choices(), value=services.default_model, label="Model",
                                    allow_custom_value=True, elem_id="model",
                                    info="a registry id, or the path of a local diffusers folder")
                prompt = gr.Textbox(label="Prompt", value="a red circle left of a blue square", lines=2,
                                    elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", value="", lines=1)
                with gr.Row():
                    seed = gr.Textbox(label="Seed", value="0", elem_id="seed")
                    randomize = gr.Checkbox(label="Randomize seed", value=False)
                with gr.Row():
                    steps = gr.Slider(1, 50 if spec.role == "teacher" else 4, value=spec.steps, step=1, label="Steps")
                    size = gr.Slider(64, 1024, value=spec.resolution, step=8, label="Size (px)")
                    batch = gr.Slider(1, 16, value=1, step=1, label="Batch")
                button = gr.Button("Generate", variant="primary", elem_id="generate-btn")
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Images", columns=4, height=420, elem_id="gallery", format="png")
                timing = gr.Markdown(elem_id="timing")
        model.change(on_model, model, [steps, size], api_visibility="private")
        inputs = [model, prompt, negative, seed, randomize, steps, size, batch]
        button.click(run, inputs, [gallery, timing, seed], api_name="generate", concurrency_id="gpu")
        prompt.submit(run, inputs, [gallery, timing, seed], api_visibility="private", concurrency_id="gpu")
    return {"model": model, "prompt": prompt, "gallery": gallery, "timing": timing}
