"""Generate tab: the image follows the prompt as you type (newest request wins, stale ones are
dropped), with the time of each stage, a running images/s figure, a history of this browser tab,
and PNGs that carry their settings (drop one back in to restore and reproduce it)."""
from __future__ import annotations

import gradio as gr

from pipelines import generation, nasa, registry, speed

from .services import Services, gpu, parse_seed, user_errors

HISTORY_LIMIT = 48
HISTORY_REFRESH = 1.0  # seconds between redraws of the history gallery (when it changed)
NEGATIVE_MODES = [("NASA", "nasa"), ("CFG", "cfg")]  # (label, value the API takes)


def timing_line(timings: dict, n: int, session: dict, info: dict | None = None, notice: str = "") -> str:
    ms = {k: v * 1000 for k, v in timings.items()}
    line = (f"text encoding {ms['text_encoding']:.0f} ms · denoising {ms['denoising']:.0f} ms · "
            f"decoding {ms['decoding']:.0f} ms · total {ms['total']:.0f} ms · "
            f"{n / max(timings['total'], 1e-9):.1f} images/s")
    if info and info.get("engine"):
        line += f" · {'ONNX Runtime' if info['engine'] == 'onnx' else 'PyTorch'}"
        if info.get("prompt_cache") == "hit":
            line += " (cached prompt)"
    if session["seconds"]:
        line += f" · running {session['images'] / session['seconds']:.1f} images/s over {session['images']} images"
    if notice:
        line += f" · notice: {notice}"
    return line


def build_generate(services: Services) -> dict:
    spec = registry.get(services.default_model)

    @gpu
    @user_errors
    def run(model_id, prompt, negative_prompt, seed_text, randomize, steps, size, batch_size, negative_mode="nasa",
            nasa_alpha=None, tiny_decoder=False, history=None, session=None):
        """One generation; also this tab's history and running images/s (per browser session: other users
        never see them), in the same round trip so a live edit costs one request."""
        seed = parse_seed(seed_text, randomize)
        res = generation.generate(model_id, prompt, negative_prompt=negative_prompt or "", steps=int(steps),
                                  seed=seed, batch_size=int(batch_size), height=int(size), width=int(size),
                                  device=services.device, negative_mode=negative_mode or "nasa",
                                  nasa_alpha=None if nasa_alpha is None else float(nasa_alpha),
                                  torch_options=speed.TorchOptions(tiny_decoder=True) if tiny_decoder else None)
        files = []
        for i, img in enumerate(res.images):
            settings = generation.image_settings(res.settings, i)
            path = services.output_path(f"{settings['seed']}.png")
            files.append((str(generation.save_png(img, path, settings)), f"seed {settings['seed']}"))
        session = {"images": (session or {}).get("images", 0) + len(files),
                   "seconds": (session or {}).get("seconds", 0.0) + res.timings["total"]}
        history = (files + list(history or []))[:HISTORY_LIMIT]
        return files, timing_line(res.timings, len(files), session, res.info, res.notice), str(seed), history, session

    def show_history(history, shown):
        """Redraw the history gallery when it changed, at most once per HISTORY_REFRESH seconds: redrawing
        it after every live edit costs gradio ~1 ms per image on the server and the browser a re-render,
        both while the next edit's image is on its way."""
        newest = history[0][0] if history else None
        return (gr.skip(), shown) if newest == shown else (history, newest)

    @user_errors
    def restore(path):
        """Settings of a dropped OneStep PNG -> the controls (the change events then regenerate it)."""
        if not path:
            return [gr.update()] * 10
        s = generation.read_settings(path)
        # images saved before NASA existed steered away from their negative prompt with CFG
        mode = s.get("negative_mode", "cfg" if s.get("negative_prompt") else "nasa")
        alpha = s.get("nasa_alpha")
        return (s["model"], s["prompt"], s.get("negative_prompt", ""), str(s["seed"]), False, s["steps"],
                s.get("height", spec.resolution), mode, gr.update() if alpha is None else alpha,
                s.get("decoder") == "tiny")

    def on_model(model_id):
        try:
            s = registry.get(model_id)
        except registry.UnknownModelError:
            return gr.update(), gr.update(), gr.update()
        return (gr.update(value=s.steps, maximum=50 if s.role == "teacher" else 4), gr.update(value=s.resolution),
                gr.update(value=s.offered_nasa_alpha, maximum=s.nasa_alpha_max))

    with gr.Tab("Generate", id="generate"):
        history_state = gr.State([])
        session_state = gr.State({})
        shown_state = gr.State(None)  # the newest history image drawn so far
        with gr.Row():
            with gr.Column(scale=2):
                model = gr.Dropdown(services.model_choices(), value=services.default_model, label="Model",
                                    allow_custom_value=True, elem_id="model",
                                    info="a registry id, or the path of a local diffusers folder")
                prompt = gr.Textbox(label="Prompt", value="a red circle left of a blue square", lines=2,
                                    elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", value="", lines=1, elem_id="negative",
                                      placeholder="what to keep out, e.g. red",
                                      info="one step can steer away from it too: NASA (below), or CFG to compare")
                with gr.Row():
                    negative_mode = gr.Radio(NEGATIVE_MODES, value="nasa", label="Negative prompt by",
                                             elem_id="negative-mode",
                                             info="NASA: in attention, one pass; CFG: two passes blended "
                                                  "(teachers always use CFG)")
                    nasa_alpha = gr.Slider(0, spec.nasa_alpha_max, value=spec.offered_nasa_alpha,
                                           step=0.05, label="NASA alpha", elem_id="nasa-alpha",
                                           info="how hard to steer away; too high lets the negative take over")
                with gr.Row():
                    seed = gr.Textbox(label="Seed", value="0", elem_id="seed")
                    randomize = gr.Checkbox(label="Randomize seed", value=False)
                    # live by default for one-step students; a multi-step teacher takes seconds per image
                    live = gr.Checkbox(label="Live", value=spec.role == "student", elem_id="live",
                                       info="regenerate as you type and move sliders")
                with gr.Row():
                    steps = gr.Slider(1, 50 if spec.role == "teacher" else 4, value=spec.steps, step=1, label="Steps")
                    size = gr.Slider(64, 1024, value=spec.resolution, step=8, label="Size (px)")
                    batch = gr.Slider(1, 16, value=1, step=1, label="Batch")
                tiny = gr.Checkbox(label="Tiny decoder", value=False, elem_id="tiny-decoder",
                                   info="AutoencoderTiny in place of the VAE decoder: faster, a little less exact")
                button = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                dropped = gr.File(label="Drop a OneStep PNG to restore its settings", file_types=[".png"],
                                  type="filepath", elem_id="restore")
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Images", columns=4, height=420, elem_id="gallery", format="png")
                timing = gr.Markdown(elem_id="timing")
                history_view = gr.Gallery(label="History (this tab)", columns=8, height=160, elem_id="history",
                                          format="png")
        inputs = [model, prompt, negative, seed, randomize, steps, size, batch, negative_mode, nasa_alpha, tiny,
                  history_state, session_state]
        outputs = [gallery, timing, seed, history_state, session_state]
        gr.Timer(HISTORY_REFRESH).tick(show_history, [history_state, shown_state], [history_view, shown_state],
                                       api_visibility="private", show_progress="hidden")
        model.change(on_model, model, [steps, size, nasa_alpha], api_visibility="private")
        button.click(run, inputs, outputs, api_name="generate", concurrency_id="gpu")
        prompt.submit(run, inputs, outputs, api_visibility="private", concurrency_id="gpu")

        def live_run(on, *args):
            return run(*args) if on else (gr.skip(),) * len(outputs)

        # live: every edit or slider release asks; while one runs, only the newest waits. `.change`, not
        # `.input`: gradio's textbox sends no input event for deletions (Backspace never regenerated)
        for trigger in (prompt.change, negative.change, steps.release, size.release, batch.release, negative_mode.input,
                        nasa_alpha.release, tiny.input):
            trigger(live_run, [live, *inputs], outputs, api_visibility="private", concurrency_id="gpu",
                    trigger_mode="always_last", show_progress="hidden")
        restored = [model, prompt, negative, seed, randomize, steps, size, negative_mode, nasa_alpha, tiny]
        dropped.upload(restore, dropped, restored, api_visibility="private").then(
            run, inputs, outputs, api_visibility="private", concurrency_id="gpu")
    return {"model": model, "prompt": prompt, "seed": seed, "steps": steps, "gallery": gallery, "timing": timing}
