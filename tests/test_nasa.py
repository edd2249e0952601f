"""NASA (negative-away steer attention) on tiny SD and SDXL UNets: exactness at alpha 0, the paper's
formula per layer against diffusers' stock processor, restoring processors, the negative branch
steering, batches, settings, CLI, UI API and the removal benchmark."""
import json

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from pipelines import generation, loading, nasa, onestep, registry
from tests.test_cli import cli


@pytest.fixture(params=["tiny_sd", "tiny_sdxl"])
def model(request):
    path = request.getfixturevalue(request.param)
    return registry.get(str(path)), loading.load_pipeline(str(path))


def _arr(img):
    return np.asarray(img, dtype=np.int16)


def _conds(pipe, prompt="a cat", negative="a dog", batch=1):
    return (onestep.encode_prompt(pipe, [prompt], 64, 64).repeat(batch),
            onestep.encode_prompt(pipe, [negative], 64, 64))


@torch.no_grad()
def _latents(pipe, seeds=(3,), negative=None, **kwargs):
    cond, neg = _conds(pipe, batch=len(seeds), **({"negative": negative} if negative else {}))
    noise = onestep.make_noise(pipe, list(seeds), 64, 64)
    return onestep.denoise(pipe, cond, noise, [999], negative=neg if negative else None, **kwargs)


def _processors(unet) -> dict:
    return {name: id(p) for name, p in unet.attn_processors.items()}


def test_alpha_zero_is_exactly_the_plain_output(model):
    spec, pipe = model
    plain = _latents(pipe)
    assert torch.equal(_latents(pipe, negative="a dog", negative_mode="nasa", nasa_alpha=0.0), plain)
    a = onestep.generate(pipe, spec, "a cat", seed=4, batch_size=2, height=64, width=64).images
    b = onestep.generate(pipe, spec, "a cat", negative_prompt="a dog", nasa_alpha=0, seed=4, batch_size=2, height=64,
                         width=64).images
    assert all(np.array_equal(_arr(x), _arr(y)) for x, y in zip(a, b))


@pytest.mark.parametrize("masked", [False, True])
def test_processor_at_alpha_zero_is_bit_for_bit_the_stock_processor(model, masked):
    """Installed by hand (bypassing applied's shortcut), alpha 0 reproduces AttnProcessor2_0 exactly,
    with and without a text attention mask for the positive prompt."""
    _, pipe = model
    unet = pipe.unet
    cond, neg = _conds(pipe, batch=2)
    x = onestep.make_noise(pipe, [1, 2], 64, 64)
    t = torch.full((2,), 999)
    mask = torch.ones(2, cond.prompt_embeds.shape[1])
    mask[:, 5:] = 0
    kwargs = dict(encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=cond.added_cond_kwargs,
                  encoder_attention_mask=mask if masked else None)
    layers = nasa.cross_attention_layers(unet)
    assert layers and all(isinstance(layer.processor, AttnProcessor2_0) for layer in layers)
    with torch.no_grad():
        stock = unet(x, t, **kwargs).sample
        previous = [layer.processor for layer in layers]
        try:
            for layer in layers:
                layer.set_processor(nasa.NASAAttnProcessor(neg.prompt_embeds, 0.0))
            ours = unet(x, t, **kwargs).sample
            for layer in layers:
                layer.set_processor(nasa.NASAAttnProcessor(neg.prompt_embeds, 0.3))
            steered = unet(x, t, **kwargs).sample
        finally:
            for layer, p in zip(layers, previous):
                layer.set_processor(p)
    assert torch.equal(ours, stock)
    assert not torch.allclose(steered, stock)


def _formula_case(attn, batch=3, queries=10, pos_tokens=7, neg_tokens=5):
    g = torch.Generator().manual_seed(0)
    dim = attn.to_k.in_features
    h = torch.randn(batch, queries, attn.to_q.in_features, generator=g)
    pos = torch.randn(batch, pos_tokens, dim, generator=g)
    neg = torch.randn(1, neg_tokens, dim, generator=g)
    return h, pos, neg


def _check_formula(attn, h, pos, neg, alpha, pos_mask=None, neg_mask=None):
    """to_out(Z+ - alpha Z-) = stock(pos) - alpha (stock(neg) - bias), since to_out is affine and the
    stock processor adds its bias once per call; each prompt keeps its own mask."""
    stock = AttnProcessor2_0()
    pos_bias = None if pos_mask is None else ((1 - pos_mask) * -10000.0)[:, None, :]
    neg_bias = None if neg_mask is None else ((1 - neg_mask.expand(h.shape[0], -1)) * -10000.0)[:, None, :]
    with torch.no_grad():
        plus = stock(attn, h, pos, attention_mask=pos_bias)
        minus = stock(attn, h, neg.expand(h.shape[0], -1, -1), attention_mask=neg_bias)
        ours = nasa.NASAAttnProcessor(neg, alpha, negative_mask=neg_mask)(attn, h, pos, attention_mask=pos_bias)
    expected = plus - alpha * (minus - attn.to_out[0].bias)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    return ours


def test_layer_output_is_the_papers_formula(model):
    _, pipe = model
    attn = nasa.cross_attention_layers(pipe.unet)[0]
    assert not attn.residual_connection and attn.rescale_output_factor == 1.0 and attn.to_out[0].bias is not None
    h, pos, neg = _formula_case(attn)
    _check_formula(attn, h, pos, neg, alpha=0.7)


def test_separate_masks_and_norms_of_the_layer():
    """A layer with norm_cross, norm_q and norm_k: all apply to both branches; the positive mask and the
    negative mask each reach only their own prompt (their lengths even differ)."""
    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=12, heads=2, dim_head=4, cross_attention_norm="layer_norm",
                     qk_norm="layer_norm", bias=True).eval()
    assert attn.norm_cross is not None and attn.norm_q is not None and attn.norm_k is not None
    h, pos, neg = _formula_case(attn)
    pos_mask = torch.ones(3, 7)
    pos_mask[:, 4:] = 0
    neg_mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]])
    masked = _check_formula(attn, h, pos, neg, 0.5, pos_mask=pos_mask, neg_mask=neg_mask)
    unmasked = _check_formula(attn, h, pos, neg, 0.5, pos_mask=pos_mask)
    assert not torch.allclose(masked, unmasked)  # the negative mask is used, not ignored
    with pytest.raises(ValueError, match="negative attention mask"):
        nasa.NASAAttnProcessor(neg, 0.5, negative_mask=torch.ones(2, 5))(attn, h, pos)


def test_processors_restored_after_the_call_and_after_an_exception(model):
    spec, pipe = model
    unet = pipe.unet
    before = _processors(unet)
    cond, neg = _conds(pipe)
    with nasa.applied(unet, neg.prompt_embeds, 0.5) as layers:
        assert len(layers) == len(nasa.cross_attention_layers(unet)) > 0
        now = unet.attn_processors
        crossed = {n for n, p in now.items() if isinstance(p, nasa.NASAAttnProcessor)}
        assert crossed and all(n.endswith("attn2.processor") for n in crossed)
        assert all(now[n] is not None and id(now[n]) == before[n] for n in now if n not in crossed)  # self-attn kept
    assert _processors(unet) == before
    with pytest.raises(RuntimeError, match="boom"), nasa.applied(unet, neg.prompt_embeds, 0.5):
        raise RuntimeError("boom")
    assert _processors(unet) == before
    # an error raised inside the UNet's forward (a negative batch that fits no image batch)
    two = neg.repeat(2)
    with pytest.raises(ValueError, match="negative prompt batch 2"):
        onestep.denoise(pipe, cond.repeat(3), onestep.make_noise(pipe, [0, 1, 2], 64, 64), [999], negative=two,
                        nasa_alpha=0.5)
    assert _processors(unet) == before
    # a whole generate call leaves nothing behind either
    onestep.generate(pipe, spec, "a cat", negative_prompt="a dog", height=64, width=64)
    assert _processors(unet) == before


def test_negative_branch_steers(model):
    _, pipe = model
    plain = _latents(pipe)
    dog = _latents(pipe, negative="a dog", nasa_alpha=0.5)
    dog_more = _latents(pipe, negative="a dog", nasa_alpha=1.0)
    red = _latents(pipe, negative="red", nasa_alpha=0.5)
    for a, b in ((plain, dog), (dog, dog_more), (dog, red)):
        assert (a - b).abs().max() > 1e-4
    # NASA is not the CFG baseline under another name
    assert (dog - _latents(pipe, negative="a dog", negative_mode="cfg", guidance_scale=2.0)).abs().max() > 1e-4


def test_one_negative_serves_a_batch(model):
    spec, pipe = model
    cond, neg = _conds(pipe, batch=3)
    noise = onestep.make_noise(pipe, [5, 6, 7], 64, 64)
    with torch.no_grad():
        shared = onestep.denoise(pipe, cond, noise, [999], negative=neg, nasa_alpha=0.5)
        per_image = onestep.denoise(pipe, cond, noise, [999], negative=neg.repeat(3), nasa_alpha=0.5)
        single = onestep.denoise(pipe, _conds(pipe)[0], noise[2:], [999], negative=neg, nasa_alpha=0.5)
    torch.testing.assert_close(shared, per_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared[2:], single, atol=1e-5, rtol=1e-5)
    batch = onestep.generate(pipe, spec, "a cat", negative_prompt="a dog", nasa_alpha=0.5, seed=5, batch_size=3,
                             height=64, width=64).images
    alone = onestep.generate(pipe, spec, "a cat", negative_prompt="a dog", nasa_alpha=0.5, seed=7, height=64,
                             width=64).images[0]
    assert np.abs(_arr(batch[2]) - _arr(alone)).max() <= 1


def test_settings_record_the_negative_and_a_png_reproduces_it(model, tmp_path):
    spec, pipe = model
    res = onestep.generate(pipe, spec, "a cat", negative_prompt="a dog", seed=9, height=64, width=64)
    assert res.settings["negative_mode"] == "nasa" and res.settings["nasa_alpha"] == spec.nasa_alpha > 0
    assert "negative_mode" not in onestep.generate(pipe, spec, "a cat", seed=9, height=64, width=64).settings
    cfg = generation.generate(spec.id, "a cat", negative_prompt="a dog", negative_mode="cfg", seed=9, height=64,
                              width=64)
    saved = generation.read_settings(generation.save_png(cfg.images[0], tmp_path / "a.png", cfg.settings))
    assert saved["negative_mode"] == "cfg"
    keys = ("negative_prompt", "negative_mode", "nasa_alpha", "guidance_scale", "seed", "steps", "height", "width")
    again = generation.generate(saved["model"], saved["prompt"], **{k: saved[k] for k in keys})
    assert np.array_equal(_arr(again.images[0]), _arr(cfg.images[0]))
    assert not np.array_equal(_arr(res.images[0]), _arr(cfg.images[0]))


def test_words_only_negative_leaves_out_the_start_token_and_padding(model):
    """nasa_words_only: the negative branch attends to the negative's own tokens (start token and padding
    masked); with a mask that keeps every token it is plain NASA, and at alpha 0 nothing changes."""
    import dataclasses

    spec, pipe = model
    mask = nasa.words_mask(pipe.tokenizer, "a dog")
    ids = pipe.tokenizer("a dog", padding="max_length", max_length=pipe.tokenizer.model_max_length).input_ids
    words = len(pipe.tokenizer("a dog").input_ids) - 1  # the words and the end token, without the start token
    assert mask.shape == (1, len(ids)) and mask[0, 0] == 0 and mask[0, 1:1 + words].eq(1).all()
    assert mask[0, 1 + words:].eq(0).all()
    plain = _latents(pipe, negative="a dog", nasa_alpha=1.0)
    assert torch.equal(_latents(pipe, negative="a dog", nasa_alpha=1.0, nasa_mask=torch.ones_like(mask)), plain)
    assert (_latents(pipe, negative="a dog", nasa_alpha=1.0, nasa_mask=mask) - plain).abs().max() > 1e-4
    words_spec = dataclasses.replace(spec, nasa_words_only=True)

    def image(s, alpha):
        return _arr(onestep.generate(pipe, s, "a cat", negative_prompt="a dog", nasa_alpha=alpha, seed=4, height=64,
                                     width=64).images[0])

    assert np.array_equal(image(words_spec, 0.0), image(spec, 0.0))
    assert not np.array_equal(image(words_spec, 1.0), image(spec, 1.0))


def test_shapes_student_steers_with_the_negatives_words_on_pytorch():
    from pipelines import generation

    spec = registry.get("shapes-64")
    assert spec.nasa_words_only and not any(s.nasa_words_only for s in registry.MODELS.values() if s is not spec)
    res = generation.generate("shapes-64", "a circle", negative_prompt="red", seed=0)
    assert res.info["engine"] == "torch" and "nasa_words_only" in res.notice  # the ONNX graph attends to every token
    assert "nasa_words_only" not in generation.generate("shapes-64", "a circle", seed=0).notice


def test_registry_alphas_follow_the_paper():
    m = registry.MODELS
    assert m["stabilityai/sd-turbo"].nasa_alpha == 0.2  # SD2.1 family: the paper's training-free default
    assert all(0.1 <= m[k].nasa_alpha <= 0.3 for k in ("stabilityai/sdxl-turbo", "tianweiy/DMD2-sdxl-1step",
                                                       "tianweiy/DMD2-sdxl-4step"))
    assert all(s.nasa_alpha == 0 for s in m.values() if s.role == "teacher")  # teachers use CFG
    assert all(0 < s.nasa_alpha <= s.nasa_alpha_max <= nasa.MAX_ALPHA for s in m.values()
               if s.role == "student" and s.family in ("sd", "sdxl"))


@pytest.mark.parametrize("kwargs,match", [
    ({"negative_mode": "negative"}, "allowed: nasa, cfg"), ({"nasa_alpha": 16.5}, "allowed: 0 to 16"),
    ({"nasa_alpha": -0.1}, "allowed: 0 to 16"), ({"nasa_alpha": float("nan")}, "from 0 to 16"),
    ({"nasa_alpha": "0.5"}, "from 0 to 16"), ({"nasa_alpha": True}, "from 0 to 16")])
def test_bad_mode_or_alpha_is_a_one_line_error(tiny_sd, kwargs, match):
    spec, pipe = registry.get(str(tiny_sd)), loading.load_pipeline(str(tiny_sd))
    for call in (lambda: onestep.generate(pipe, spec, "a cat", negative_prompt="a dog", height=64, width=64, **kwargs),
                 lambda: generation.generate(str(tiny_sd), "a cat", negative_prompt="a dog", height=64, width=64,
                                             **kwargs)):
        with pytest.raises(ValueError, match=match) as e:
            call()
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="expected \\(batch, tokens, 32\\)"), nasa.applied(pipe.unet, torch.zeros(1, 4, 7), 0.5):
        pass


def test_cli_negative_mode_and_alpha(tiny_sd, tmp_path):
    base = ["generate", "--model", tiny_sd, "--prompt", "a cat", "--negative-prompt", "a dog", "--seed", 2,
            "--height", 64, "--width", 64, "--json"]
    default = json.loads(cli(*base, "--out", tmp_path / "n.png").stdout)["settings"]
    assert default["negative_mode"] == "nasa" and default["nasa_alpha"] == registry.get(str(tiny_sd)).nasa_alpha
    set_ = json.loads(cli(*base, "--negative-mode", "cfg", "--nasa-alpha", 0.7, "--out", tmp_path / "c.png").stdout)
    assert set_["settings"]["negative_mode"] == "cfg" and set_["settings"]["nasa_alpha"] == 0.7
    assert generation.read_settings(tmp_path / "c.png")["negative_mode"] == "cfg"
    for args, match in ((["--negative-mode", "both"], "allowed: nasa, cfg"), (["--nasa-alpha", 17], "allowed: 0 to 16")):
        proc = cli(*base, *args, check=False)
        assert proc.returncode == 2 and match in proc.stderr.strip().splitlines()[-1] and "Traceback" not in proc.stderr


def test_ui_api_takes_negative_mode_and_alpha(tiny_sd, tiny_student, tmp_path):
    from gradio_client import Client

    from tests.serving import serving
    from ui.services import Services

    services = Services(outputs=tmp_path / "out", default_model=str(tiny_sd), extra_models=[str(tiny_student)])
    with serving(services) as url:
        client = Client(url, verbose=False)
        client.predict(str(tiny_sd), "a cat", "a dog", "3", False, 1, 64, 1, "cfg", 0.4, api_name="/generate")
        settings = generation.read_settings(next(services.outputs.glob("*-3.png")))
        assert settings["negative_mode"] == "cfg" and settings["nasa_alpha"] == 0.4
        with pytest.raises(Exception, match="16.5") as e:  # the slider's own bound answers first
            client.predict(str(tiny_sd), "a cat", "a dog", "3", False, 1, 64, 1, "nasa", 16.5, api_name="/generate")
        assert "\n" not in str(e.value).strip()
        pair, summary, _ = client.predict(str(tiny_student), "a red circle", "0", 1, 2, 2.0, "blue", "nasa", 0.6,
                                          api_name="/compare")
        assert len(pair) == 2 and "NASA α 0.6" in summary


def test_removal_benchmark_runs_on_a_tiny_student(tiny_student, tmp_path, monkeypatch):
    from bench import nasa as bench

    negatives, draw = [], bench._draw
    monkeypatch.setattr(bench, "_draw", lambda *a, **kw: negatives.append(kw.get("negative_prompt")) or draw(*a, **kw))
    out = tmp_path / "nasa.json"
    assert bench.main(["--model", str(tiny_student), "--images", "3", "--nasa-alpha", "0.5,1", "--repeats", "1",
                       "--timing-batch", "2", "--negative-template", "{0}, on a {0} background",
                       "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["negative_template"] == "{0}, on a {0} background"
    worded = [n for n in negatives if n]  # every negative draw (CFG and NASA) got the worded negative
    assert len(worded) == 9 and all(n == f"{n.split(',')[0]}, on a {n.split(',')[0]} background" for n in worded)
    for bad in ("red", "{0} {1}", "{{0}}", "{color}"):
        with pytest.raises(ValueError, match="must hold"):
            bench.check_template(bad)
    assert bench.main(["--model", str(tiny_student), "--negative-template", "no color here"]) == 2
    assert res["images"] == 3 and [m["mode"] for m in res["modes"]] == ["none", "cfg", "nasa", "nasa"]
    assert [m.get("nasa_alpha") for m in res["modes"][2:]] == [0.5, 1.0]
    for m in res["modes"]:
        assert 0 <= m["appears"] <= 1 and 0 <= m["shapeeval"] <= 1
    t = res["timing"]
    assert t["nasa_ratio"] > 0 and t["cfg_ratio"] > 0 and t["plain_seconds_per_image"] > 0
    assert bench.main(["--model", "shapes-64-teacher", "--images", "1"]) == 2  # a teacher is refused


def test_removal_cases_and_scoring():
    from bench import nasa as bench
    from shapes import parse, render

    cases, per_pair = bench.make_cases(500)
    assert len(cases) >= 500 and per_pair == 2
    pairs = {(c.prompt, c.negative) for c in cases}
    assert len({c.seed for c in cases}) == len(cases)  # every case its own noise, a pair's seeds consecutive
    assert all(c.seed == cases[i - 1].seed + 1 for i, c in enumerate(cases) if i % 2)
    assert len(pairs) == len(cases) // 2
    assert not {c.seed for c in cases} & {c.seed for c in bench.make_cases(500, seed=1)[0]}  # another seed, other noises
    assert all(o.color is None and parse(c.prompt).background is None for c in cases for o in parse(c.prompt).objects)
    few, one = bench.make_cases(4)
    assert len(few) == 4 and one == 1
    img = render("a red circle on a white background", 0)
    rows = bench._score([bench.Case("a circle", "red", 0), bench.Case("a circle", "white", 0),
                         bench.Case("a circle", "blue", 0), bench.Case("a square", "blue", 0)], [img] * 4)
    assert [r["appears"] for r in rows] == [True, True, False, False]
    assert [r["object"] for r in rows] == [True, False, False, False]
    assert [r["background"] for r in rows] == [False, True, False, False]
    assert [r["shapeeval"] for r in rows] == [True, True, True, False]
    gone = bench._score([bench.Case("a circle", "red", 0), bench.Case("a circle", "white", 0)],
                        [render("a blue circle on a white background", 0)] * 2)
    s = bench._summary(gone, rows[:2])  # red left the object, the white background stayed
    assert (s["removed"], s["removed_object"], s["removed_background"]) == (0.5, 1.0, 0.0)
    assert s["removed_by_color"] == {"red": 1.0, "white": 0.0}
