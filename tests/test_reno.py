"""ReNO on tiny real models: the objective falls, the best iterate (not the last) comes back, cancel
stops within one iteration, exported noise reproduces the image bit for bit, bad input is one line."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines import generation, loading, onestep, registry, reno, rewards
from pipelines.rewards.clip import ClipReward


@pytest.fixture(scope="module")
def clip_reward():
    model, tok = loading.load_clip(registry.SHAPES_CLIP, device="cpu")
    return ClipReward(model, tok, folder=registry.SHAPES_CLIP)


@pytest.fixture(scope="module")
def student(tiny_student):
    spec = registry.get(str(tiny_student))
    return loading.load_pipeline(str(tiny_student), device="cpu"), spec


def _run(student, clip_reward, **kw):
    pipe, spec = student
    kw.setdefault("config", reno.RenoConfig(iterations=6, lr=5.0))
    return reno.refine(pipe, spec, "a red circle", {"clip": (clip_reward, 1.0)}, seed=3, **kw)


def test_reward_rises_and_best_is_returned(student, clip_reward):
    res = _run(student, clip_reward, config=reno.RenoConfig(iterations=8, lr=20.0))
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 8 and min(losses[1:]) < losses[0]
    assert res.best_iteration == int(np.argmin(losses))
    assert res.settings["reno"]["best_iteration"] == res.best_iteration
    # the best image is the best iterate's, not the last one's (when they differ)
    assert res.history[res.best_iteration]["loss"] == min(losses)


class PeakReward(rewards.Reward):
    """Scores the iterate number's closeness to `peak` (plus a zero-weight image term for a graph)."""

    def __init__(self, peak):
        super().__init__(name="peak", offset=0.0)
        self.peak, self.calls = peak, 0

    def score(self, images, prompts):
        value = -abs(self.calls - self.peak) + 0.0 * images.mean()
        self.calls += 1
        return value.reshape(1)


def test_best_iterate_not_last(student):
    seen = []
    pipe, spec = student
    res = reno.refine(pipe, spec, "a red circle", {"peak": (PeakReward(2), 1.0)}, seed=3,
                      config=reno.RenoConfig(iterations=5), callback=seen.append)
    assert res.best_iteration == 2 and len(res.history) == 5
    assert np.array_equal(np.asarray(res.best), np.asarray(seen[2].image))
    assert [s.best for s in seen] == [True, True, True, False, False]


class OverflowReward(rewards.Reward):
    """A reward whose gradient is inf on its first evaluation (as an fp16 overflow), finite after."""

    def __init__(self):
        super().__init__(name="overflow", offset=0.0)
        self.calls = 0

    def score(self, images, prompts):
        scale = float("inf") if self.calls == 0 else 1.0
        self.calls += 1
        return (images.mean() * scale).reshape(1)


def test_non_finite_gradient_skips_the_update(student):
    """An overflowing step is skipped: the noise stays finite and the next iterate is the same image."""
    pipe, spec = student
    res = reno.refine(pipe, spec, "a red circle", {"overflow": (OverflowReward(), 1.0)}, seed=3,
                      config=reno.RenoConfig(iterations=3))
    assert res.settings["reno"]["skipped_updates"] == 1
    assert torch.isfinite(res.best_noise).all()
    assert res.history[1]["noise_norm"] == res.history[0]["noise_norm"]
    assert res.history[2]["noise_norm"] != res.history[1]["noise_norm"]


def test_shared_model_is_left_untouched(student, clip_reward):
    """ReNO differentiates only the noise: the cached pipeline's flags and .grad stay as they were."""
    pipe, _ = student
    before = [p.requires_grad for p in pipe.unet.parameters()]
    _run(student, clip_reward, config=reno.RenoConfig(iterations=3))
    seen = []
    _run(student, clip_reward, config=reno.RenoConfig(iterations=9), callback=seen.append, cancel=lambda: len(seen) > 1)
    assert [p.requires_grad for p in pipe.unet.parameters()] == before
    assert all(p.grad is None for m in (pipe.unet, pipe.vae) for p in m.parameters())


def test_cancel_stops_within_one_iteration(student, clip_reward):
    seen = []
    res = _run(student, clip_reward, config=reno.RenoConfig(iterations=50), callback=seen.append,
               cancel=lambda: len(seen) >= 2)
    assert len(seen) == 2 and len(res.history) == 2 and res.stopped == "cancelled"


def test_time_budget(student, clip_reward):
    res = _run(student, clip_reward, config=reno.RenoConfig(iterations=500, seconds=0.01))
    assert res.stopped == "time" and len(res.history) < 500


@pytest.mark.parametrize("steps", [1, 2])
def test_exported_noise_reproduces_image(student, clip_reward, tmp_path, steps):
    pipe, spec = student
    res = _run(student, clip_reward, steps=steps)
    path = reno.save_noise(res.best_noise, res.settings, tmp_path / "noise.safetensors")
    noise, settings = loading.load_noise(path)
    assert settings["prompt"] == "a red circle" and settings["steps"] == steps
    again = generation.generate(settings["model"], settings["prompt"], steps=settings["steps"], seed=settings["seed"],
                                noise=noise, device="cpu")
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(res.best))


def test_start_image_is_plain_generation(student, clip_reward):
    pipe, spec = student
    res = _run(student, clip_reward, config=reno.RenoConfig(iterations=1))
    plain = onestep.generate(pipe, spec, "a red circle", seed=3)
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(res.initial))


def test_noise_prior_minimum_on_the_shell():
    d = 2048
    radii = torch.tensor([0.5, 1.0, 1.5]) * (d - 1) ** 0.5
    values = [float(reno.noise_prior(torch.full((1, d), r / d ** 0.5))) for r in radii]
    assert values[1] < values[0] and values[1] < values[2]


def test_bad_input_one_line(student, clip_reward):
    pipe, spec = student
    for cfg, msg in [(reno.RenoConfig(iterations=0), "iterations"), (reno.RenoConfig(lr=-1), "learning rate"),
                     (reno.RenoConfig(seconds=1e9), "seconds")]:
        with pytest.raises(ValueError, match=msg):
            reno.refine(pipe, spec, "a red circle", {"clip": (clip_reward, 1.0)}, config=cfg)
    with pytest.raises(ValueError, match="unknown reward"):
        rewards.parse_weights("clip=1,aesthetic=2")
    with pytest.raises(ValueError, match="not a number"):
        rewards.parse_weights("clip=x")
    with pytest.raises(ValueError, match="noise has shape"):
        reno.refine(pipe, spec, "a red circle", {"clip": (clip_reward, 1.0)}, noise=torch.zeros(1, 4, 8, 8))


def test_missing_hub_rewards_say_what_is_missing(tiny_sd):
    spec = registry.get(str(tiny_sd))
    for name in ("pickscore", "hpsv2", "imagereward"):
        why = rewards.missing(name, spec)
        assert why and ("prefetch" in why or "pip install" in why or "safetensors" in why), why
    with pytest.raises(rewards.RewardUnavailable, match="hpsv2"):
        rewards.load("hpsv2", spec)
    shapes = registry.get("shapes-64-teacher")
    assert rewards.default_weights(shapes) == {"clip": 0.01}
    assert "photographs" in rewards.missing("pickscore", shapes)


def test_contrast_reward_prefers_the_prompt_over_its_near_misses(clip_reward, tiny_sd):
    from pipelines.rewards.contrast import ContrastReward
    from shapes import render

    reward = ContrastReward(clip_reward.model, clip_reward.tokenizer, folder=registry.SHAPES_CLIP)
    candidates = reward.candidates("two red circles")
    assert candidates[0] == "two red circles" and len(candidates) == 17  # the prompt, then 5 + 9 + 2 near misses
    pixels = np.stack([render("a red circle", s) for s in range(4)])
    image = torch.tensor(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    right = reward.score(image, ["a red circle"] * 4)
    wrong = reward.score(image, ["a blue circle"] * 4)
    assert (right <= 0).all() and (right > wrong).all()  # a log-probability, higher for the true prompt
    # a prompt outside the grammar has no near misses, and a batch needs a prompt per image: one-line errors
    with pytest.raises(ValueError, match="shapes grammar") as e:
        reward.score(image[:1], ["a photo of a dog"])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="one prompt per image"):
        reward.score(image, ["a red circle"])
    # ReNO's loss form and the registry: the shapes world has it, hub models are told why not
    assert float(reward.loss_of(right)[0]) == -float(right[0])
    assert rewards.parse_weights("clip=0.01,contrast") == {"clip": 0.01, "contrast": 0.03}
    assert "shapes grammar" in rewards.missing("contrast", registry.get(str(tiny_sd)))
    shapes = registry.get("shapes-64")
    assert rewards.missing("contrast", shapes) is None
    # the registry builds it on the clip reward's model: one tiny CLIP in memory for both
    assert rewards.load("contrast", shapes).model is rewards.load("clip", shapes).model


def test_reno_raises_the_contrast_reward(student, clip_reward):
    from pipelines.rewards.contrast import ContrastReward

    pipe, spec = student
    reward = ContrastReward(clip_reward.model, clip_reward.tokenizer, folder=registry.SHAPES_CLIP)
    res = reno.refine(pipe, spec, "two red circles", {"contrast": (reward, 1.0)}, seed=3,
                      config=reno.RenoConfig(iterations=8, lr=20.0))
    scores = [h["rewards"]["contrast"] for h in res.history]
    assert max(scores[1:]) > scores[0] and res.best_iteration > 0


def test_preprocess_is_differentiable_and_matches_clip_input():
    x = torch.rand(2, 3, 80, 96, requires_grad=True)
    y = rewards.preprocess(x * 2 - 1, 64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert y.shape == (2, 3, 64, 64)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_cli_refine_and_evaluate(shapes_student, tmp_path, capsys):
    import json

    from pipelines.__main__ import main

    out = tmp_path / "r.png"
    assert main(["refine", "--model", str(shapes_student), "--prompt", "a red circle", "--iterations", "3",
                 "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["iterations"] == 3 and set(report["best_rewards"]) == {"clip"}
    assert out.is_file() and (tmp_path / "r-start.png").is_file()
    noise, settings = loading.load_noise(report["files"]["noise"])
    again = generation.generate(str(shapes_student), "a red circle", seed=0, noise=noise, device="cpu")
    from PIL import Image

    assert np.array_equal(np.asarray(again.images[0]), np.asarray(Image.open(out).convert("RGB")))

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    assert main(["evaluate", "--model", str(shapes_student), "--prompts", str(prompts), "--images-per-prompt", "1",
                 "--reno", "--iterations", "2", "--json", str(tmp_path / "e.json")]) == 0
    summary = json.loads((tmp_path / "e.json").read_text())
    assert summary["num_images"] == 2 and "plain" in summary and summary["reno"]["iterations"] == 2
    # budgets: the best iterate within 1 iteration is the start, within all of them the result
    assert main(["evaluate", "--model", str(shapes_student), "--prompts", str(prompts), "--images-per-prompt", "1",
                 "--reno", "--iterations", "3", "--budgets", "1,3", "--json", str(tmp_path / "b.json")]) == 0
    summary = json.loads((tmp_path / "b.json").read_text())
    assert summary["budgets"]["1"] == summary["plain"] and summary["budgets"]["3"]["overall"] == summary["overall"]
    # a time budget that ends every run after its first iteration: every budget still judges every image
    assert main(["evaluate", "--model", str(shapes_student), "--prompts", str(prompts), "--images-per-prompt", "1",
                 "--reno", "--iterations", "3", "--budgets", "2,3", "--seconds", "0.001", "--json",
                 str(tmp_path / "t.json")]) == 0
    summary = json.loads((tmp_path / "t.json").read_text())
    assert summary["budgets"]["3"] == summary["budgets"]["2"] == summary["plain"]
    assert summary["budgets"]["3"]["num_images"] == 2
    for bad in (["--reno", "--iterations", "3", "--budgets", "4"], ["--budgets", "2"]):
        assert main(["evaluate", "--model", str(shapes_student), "--prompts", str(prompts), *bad,
                     "--json", str(tmp_path / "x.json")]) == 2
        assert "budgets" in capsys.readouterr().err

    assert main(["refine", "--model", str(shapes_student), "--prompt", "a red circle", "--rewards", "pickscore=1"]) == 2
    assert "photographs" in capsys.readouterr().err
    assert main(["refine", "--model", str(shapes_student), "--prompt", "a red circle", "--iterations", "0"]) == 2
    assert "iterations" in capsys.readouterr().err
