"""One-step core and teacher sampling on tiny SD and SDXL pipelines loaded through loading.py."""
import numpy as np
import pytest
import torch

from pipelines import loading, onestep, registry, teacher


@pytest.fixture(params=["tiny_sd", "tiny_sd_v", "tiny_sdxl"])
def model(request):
    path = request.getfixturevalue(request.param)
    return registry.get(str(path)), loading.load_pipeline(str(path))


def _arr(img):
    return np.asarray(img, dtype=np.int16)


def test_output_shapes_and_timings(model):
    spec, pipe = model
    res = onestep.generate(pipe, spec, "a red circle", steps=1, seed=1, batch_size=3, height=64, width=96)
    assert len(res.images) == 3 and res.images[0].size == (96, 64)
    assert set(res.timings) == {"text_encoding", "denoising", "decoding", "total"}
    assert all(v >= 0 for v in res.timings.values())


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_seed_determinism(model, steps):
    spec, pipe = model
    a = onestep.generate(pipe, spec, "a cat", steps=steps, seed=7, height=64, width=64).images[0]
    b = onestep.generate(pipe, spec, "a cat", steps=steps, seed=7, height=64, width=64).images[0]
    c = onestep.generate(pipe, spec, "a cat", steps=steps, seed=8, height=64, width=64).images[0]
    assert np.array_equal(_arr(a), _arr(b))
    assert not np.array_equal(_arr(a), _arr(c))


def test_batch_image_equals_its_own_seed(model):
    spec, pipe = model
    batch = onestep.generate(pipe, spec, "a dog", seed=10, batch_size=3, height=64, width=64).images
    single = onestep.generate(pipe, spec, "a dog", seed=12, batch_size=1, height=64, width=64).images[0]
    assert np.abs(_arr(batch[2]) - _arr(single)).max() <= 1


def test_explicit_noise_equals_seeded_noise(model):
    spec, pipe = model
    noise = onestep.make_noise(pipe, [5], 64, 64)
    a = onestep.generate(pipe, spec, "a dog", seed=5, height=64, width=64).images[0]
    b = onestep.generate(pipe, spec, "a dog", seed=999, height=64, width=64, noise=noise).images[0]
    assert np.array_equal(_arr(a), _arr(b))
    with pytest.raises(ValueError, match="noise has shape"):
        onestep.generate(pipe, spec, "a dog", height=64, width=64, noise=torch.zeros(1, 4, 3, 3))


def test_gradients_reach_the_noise(model):
    spec, pipe = model
    noise = onestep.make_noise(pipe, [0], 64, 64).requires_grad_(True)
    cond = onestep.encode_prompt(pipe, ["a red circle"], 64, 64)
    image = onestep.decode(pipe, onestep.denoise(pipe, cond, noise, [999, 499], generator=torch.Generator().manual_seed(0)))
    image.square().mean().backward()
    assert noise.grad is not None and torch.isfinite(noise.grad).all() and noise.grad.abs().sum() > 0


def test_prompt_changes_the_image(model):
    spec, pipe = model
    a = onestep.generate(pipe, spec, "a red circle", seed=3, height=64, width=64).images[0]
    b = onestep.generate(pipe, spec, "a blue square", seed=3, height=64, width=64).images[0]
    assert not np.array_equal(_arr(a), _arr(b))


def test_teacher_and_student_start_from_identical_noise(model, monkeypatch):
    spec, pipe = model
    seen = []
    real = pipe.unet.forward

    def spy(sample, *args, **kwargs):
        seen.append(sample.detach().clone())
        return real(sample, *args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", spy)
    onestep.generate(pipe, spec, "a cat", seed=21, height=64, width=64)
    student_first = seen[0]
    seen.clear()
    teacher.sample(pipe, spec, "a cat", seed=21, steps=3, guidance_scale=2.0, height=64, width=64)
    teacher_first = seen[0]  # CFG batch: [uncond, cond], both from the same latents
    noise = onestep.make_noise(pipe, [21], 64, 64)
    assert torch.allclose(student_first, noise)
    # the teacher's scheduler scales its first input by a constant (init sigma, input scaling)
    for half in teacher_first:
        cos = torch.nn.functional.cosine_similarity(half.flatten(), noise.flatten(), dim=0)
        assert cos > 0.99999


def test_negative_prompt_baseline_changes_output(model):
    spec, pipe = model
    a = onestep.generate(pipe, spec, "a cat", seed=2, height=64, width=64).images[0]
    b = onestep.generate(pipe, spec, "a cat", negative_prompt="a dog", seed=2, height=64, width=64).images[0]
    assert not np.array_equal(_arr(a), _arr(b))


def test_timesteps_from_spec_and_defaults():
    assert onestep.default_timesteps(4) == [999, 749, 499, 249]
    assert onestep.default_timesteps(1) == [999]
    dmd2 = registry.MODELS["tianweiy/DMD2-sdxl-4step"]
    assert onestep.resolve_timesteps(dmd2, 4) == [999, 749, 499, 249]
    assert onestep.resolve_timesteps(registry.MODELS["tianweiy/DMD2-sdxl-1step"], 1) == [399]
    with pytest.raises(ValueError):
        onestep.resolve_timesteps(dmd2, 2, timesteps=[5000, 1])


@pytest.mark.parametrize("kwargs,match", [
    ({"steps": 0}, "steps 0"), ({"steps": 10**6}, "steps 1000000"), ({"width": 100000}, "width 100000"),
    ({"seed": 2**70}, "seed"), ({"seed": "abc"}, "seed"), ({"height": 100}, "multiple of 8"),
    ({"batch_size": 0}, "batch size")])
def test_bad_inputs_are_one_line_errors(tiny_sd, kwargs, match):
    spec, pipe = registry.get(str(tiny_sd)), loading.load_pipeline(str(tiny_sd))
    args = dict(steps=1, seed=0, height=64, width=64) | kwargs
    with pytest.raises(ValueError, match=match) as e:
        onestep.generate(pipe, spec, "a cat", **args)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="characters"):
        onestep.generate(pipe, spec, "x" * 100_000, height=64, width=64)
