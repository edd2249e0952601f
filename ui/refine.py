"""Refine tab: ReNO optimizes one image's initial noise against rewards, with a live preview every
iteration, the reward curve, a before/after view, cancel, and the optimized noise as a file that
reproduces the image exactly when loaded back."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from pipelines import generation, loading, registry, reno, rewards

from .services import Services, gpu, parse_seed, user_errors


def default_rewards(model_id: str) -> str:
    try:
        weights = rewards.default_weights(registry.get(model_id))
    except (ValueError, registry.UnknownModelError):
        weights = {"clip": rewards.REWARDS["clip"]}
    return ",".join(f"{k}={v:g}" for k, v in weights.items())


def curve(history: list[dict]) -> pd.DataFrame:
    rows = [{"iteration": h["iteration"], "value": v, "series": name}
            for h in history for name, v in h["rewards"].items()]
    rows += [{"iteration": h["iteration"], "value": -h["loss"], "series": "objective (-loss)"} for h in history]
    return pd.DataFrame(rows, columns=["iteration", "value", "series"])


def status_line(step: reno.RenoStep, best_iteration: int, total: int) -> str:
    scores = " · ".join(f"{k} {v:.2f}" for k, v in step.rewards.items())
    return (f"iteration {step.iteration + 1}/{total} · {scores} · noise norm {step.noise_norm:.1f} · "
            f"best so far: iteration {best_iteration + 1} · {step.seconds:.1f} s")


def build_refine(services: Services, generate_tab: dict | None = None) -> dict:
    students = services.students() or services.model_choices()
    default = services.default_model if services.default_model in students else students[0]

    @gpu
    @user_errors
    def run(model_id, prompt, seed_text, steps, reward_text, iterations, lr, seconds, flag=None):
        seed = parse_seed(seed_text, False)
        flag = flag if isinstance(flag, dict) else {}  # this browser tab's cancel flag (absent for API calls)
        flag["stop"] = False
        model_id = generation.routed(model_id, prompt, services.device)[0]  # MSD: the student its router picks
        spec = registry.get(model_id)
        if spec.role != "student":
            raise ValueError(f"{model_id} is a multi-step teacher; ReNO refines one-step (or few-step) students")
        config = reno.RenoConfig(iterations=int(iterations), lr=float(lr), seconds=float(seconds or 0))
        pipe = loading.load_pipeline(model_id, device=services.device)
        job = reno.Refinement(pipe, spec, prompt, (reward_text or "").strip() or None, seed=seed, steps=int(steps),
                              config=config)
        for step in job:
            yield (step.image, gr.update(), curve(job.history),
                   status_line(step, job.best_iteration, config.iterations), gr.update())
            if flag.get("stop"):  # Cancel: stop here, and still keep (and show) the best iterate so far
                job.stopped = "cancelled"
                break
        res = job.result()
        png = generation.save_png(res.best, services.output_path("reno.png"), res.settings)
        noise = reno.save_noise(res.best_noise, res.settings, services.output_path("noise.safetensors"))
        first, top = res.history[0], res.history[res.best_iteration]
        gains = " · ".join(f"{k} {first['rewards'][k]:.2f} → {top['rewards'][k]:.2f}" for k in top["rewards"])
        summary = (f"**Done** ({res.stopped}): best iterate {res.best_iteration + 1} of {len(res.history)} in "
                   f"{res.seconds:.1f} s · {gains}")
        yield str(png), (res.initial, res.best), curve(res.history), summary, str(noise)

    @gpu
    @user_errors
    def reproduce(path):
        """A noise file exported here -> the same image again, from its settings."""
        if not path:
            return gr.update(), gr.update()
        noise, s = loading.load_noise(path)
        if not isinstance(s, dict) or not s.get("model") or "prompt" not in s:
            raise ValueError("this noise file carries no settings; only files exported by Refine can be replayed")
        if s["model"] not in services.model_choices():  # an upload never picks a folder on this server
            raise ValueError(f"this noise file was made with {str(s['model'])[:80]!r}, which this app does not serve; "
                             "allowed: the models in the Student box")
        res = generation.generate(s["model"], s["prompt"], steps=s.get("steps"), seed=int(s.get("seed", 0)),
                                  height=s.get("height"), width=s.get("width"), noise=noise, device=services.device)
        return res.images[0], f"Reproduced from the noise file: `{s['prompt']}` with {s['model']}, seed {s.get('seed')}"

    with gr.Tab("Refine", id="refine"):
        gr.Markdown("ReNO: gradient steps on the initial noise of a one-step student raise a reward (CLIP score "
                    "on `shapes-64`; `contrast` scores the prompt against its near misses); the best iterate is "
                    "kept, the start included.")
        with gr.Row():
            with gr.Column(scale=2):
                model = gr.Dropdown(students, value=default, label="Student", allow_custom_value=True,
                                    elem_id="refine-model")
                prompt = gr.Textbox(label="Prompt", value="two red circles", elem_id="refine-prompt")
                with gr.Row():
                    seed = gr.Textbox(label="Seed (start noise)", value="0", elem_id="refine-seed")
                    steps = gr.Slider(1, 4, value=registry.get(default).steps if default in services.students() else 1, step=1,
                                      label="Student steps")
                from_generate = gr.Button("Use the image in Generate", size="sm", elem_id="refine-from-generate")
                reward_box = gr.Textbox(label="Rewards (name=weight)", value=default_rewards(default),
                                        info="allowed: " + ", ".join(rewards.REWARDS), elem_id="refine-rewards")
                with gr.Row():
                    iterations = gr.Slider(1, 200, value=reno.RenoConfig.iterations, step=1, label="Iterations",
                                           elem_id="refine-iterations")
                    lr = gr.Number(value=reno.RenoConfig.lr, label="Learning rate", minimum=0.001, maximum=1000)
                    seconds = gr.Slider(0, 120, value=0, step=1, label="Time budget (s, 0 = none)")
                with gr.Row():
                    start = gr.Button("Refine", variant="primary", elem_id="refine-btn")
                    cancel = gr.Button("Cancel", elem_id="refine-cancel")
                noise_in = gr.File(label="Load a noise file to reproduce its image", file_types=[".safetensors"],
                                   type="filepath", elem_id="refine-noise-in")
            with gr.Column(scale=3):
                preview = gr.Image(label="Current iterate", type="filepath", format="png", height=256,
                                   elem_id="refine-preview")
                status = gr.Markdown(elem_id="refine-status")
                before_after = gr.ImageSlider(label="Before / after", type="pil", height=256, elem_id="refine-slider")
                plot = gr.LinePlot(x="iteration", y="value", color="series", label="Rewards per iteration",
                                   height=220, elem_id="refine-plot")
                noise_out = gr.File(label="Optimized noise (.safetensors)", elem_id="refine-noise-out")
        flag = gr.State({})  # this tab's cancel flag; a State input is not part of the /refine API
        inputs = [model, prompt, seed, steps, reward_box, iterations, lr, seconds, flag]
        start.click(run, inputs, [preview, before_after, plot, status, noise_out], api_name="refine",
                    concurrency_id="gpu")
        # not queued behind the running refinement: the loop sees the flag after its current iteration
        cancel.click(lambda f: f.update(stop=True), flag, None, api_visibility="private", queue=False)
        model.change(lambda m: gr.update(value=default_rewards(m)), model, reward_box, api_visibility="private")
        noise_in.upload(reproduce, noise_in, [preview, status], api_visibility="private", concurrency_id="gpu")
        if generate_tab:
            g = generate_tab
            from_generate.click(lambda m, p, s, n: (m, p, s, n), [g["model"], g["prompt"], g["seed"], g["steps"]],
                                [model, prompt, seed, steps], api_visibility="private")
    return {"model": model}

