"""ONNX Runtime engine (pipelines/onnx_engine.py), the prompt cache and the PyTorch knobs (speed.py).

Stated tolerance of the ONNX engine against PyTorch on the same inputs: clean latents within 1e-4
(absolute; the latents are O(1)) and 8-bit images within 1 level per channel (a float difference of
~1e-6 can round a value to the neighbouring level, never further)."""
import json

import numpy as np
import pytest
import torch

from pipelines import generation, loading, onestep, onnx_engine, onnx_export, registry, speed
from pipelines.__main__ import main

LATENT_TOL = 1e-4
PIXEL_TOL = 1


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))
    onnx_engine._FOUND.clear()


@pytest.fixture(scope="module")
def exported(tiny_student, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "tiny-student"
    manifest = onnx_engine.export(str(tiny_student), out)
    return out, manifest


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, np.int16) for im in images])


def test_export_writes_every_graph_and_a_verification_report(exported):
    out, manifest = exported
    assert set(manifest["graphs"]) == {"text_encoder", "unet", "unet_nasa", "vae_decoder"}
    report = json.loads((out / "export-report.json").read_text())
    for name, v in report["verification"].items():
        assert v["max_abs_diff"] <= v["tolerance"] <= 1e-3 * max(1.0, v["max_abs_value"]), name
    assert "controlnet/nct" in report["not_exported"]
    assert (out / "tokenizer" / "tokenizer_config.json").is_file()
    assert not list(out.parent.glob(".tiny-student.tmp-*"))  # written beside, renamed into place


@pytest.mark.parametrize("kwargs", [
    {}, {"batch_size": 3}, {"negative_prompt": "red"}, {"negative_prompt": "red", "negative_mode": "cfg"},
    {"steps": 2}, {"height": 80, "width": 80}],
    ids=["plain", "batch3", "nasa", "cfg", "two-steps", "80px"])
def test_onnx_latents_and_images_match_pytorch(exported, tiny_student, kwargs):
    spec = registry.get(str(tiny_student))
    pipe = loading.load_pipeline(str(tiny_student), device="cpu")
    engine = onnx_engine.load_engine(exported[0])
    ref = onestep.generate(pipe, spec, "a red circle", seed=3, **kwargs)
    got = onnx_engine.generate(engine, spec, "a red circle", seed=3, **kwargs)
    assert got.info["engine"] == "onnx" and got.settings == ref.settings
    assert set(got.timings) == set(ref.timings) and all(v >= 0 for v in got.timings.values())
    assert np.abs(pixels(got.images) - pixels(ref.images)).max() <= PIXEL_TOL
    # the latents themselves, one stage at a time
    steps, h, w = kwargs.get("steps", 1), kwargs.get("height", 64), kwargs.get("width", 64)
    ts = onestep.resolve_timesteps(spec, steps)
    noise = onestep.make_noise(pipe, [3], h, w)
    with torch.no_grad():
        cond = onestep.encode_prompt(pipe, ["a red circle"], h, w)
        lat_ref = onestep.denoise(pipe, cond, noise, ts, generator=torch.Generator().manual_seed(4)).numpy()
    feeds, _ = engine.encode("a red circle", h, w, use_cache=False)
    assert np.abs(feeds["prompt_embeds"] - cond.prompt_embeds.numpy()).max() < LATENT_TOL
    lat = engine.denoise(feeds, noise, ts, torch.Generator().manual_seed(4))
    assert np.abs(lat - lat_ref).max() < LATENT_TOL


@pytest.mark.parametrize("fixture", ["tiny_sd_v", "tiny_sdxl"])
def test_v_prediction_and_sdxl_exports_match_pytorch(request, fixture, tmp_path):
    model = str(request.getfixturevalue(fixture))
    manifest = onnx_engine.export(model, tmp_path / "onnx", nasa_graph=False)
    assert "unet_nasa" not in manifest["graphs"] and manifest["not_exported"]["unet_nasa"] == "--no-nasa"
    spec = registry.get(model)
    ref = onestep.generate(loading.load_pipeline(model, device="cpu"), spec, "a blue square", seed=1, batch_size=2,
                           height=64, width=64)
    engine = onnx_engine.load_engine(tmp_path / "onnx")
    got = onnx_engine.generate(engine, spec, "a blue square", seed=1, batch_size=2, height=64, width=64)
    assert np.abs(pixels(got.images) - pixels(ref.images)).max() <= PIXEL_TOL
    with pytest.raises(ValueError, match="no NASA graph"):
        onnx_engine.generate(engine, spec, "a blue square", negative_prompt="red", nasa_alpha=0.5)


@pytest.fixture
def student_with_onnx(tiny_student, copy_model):
    """A copy of the tiny student with its export in <folder>/onnx, where Generate looks for it."""
    folder = copy_model(tiny_student)
    onnx_engine.export(str(folder), folder / "onnx")
    return folder


def test_generate_uses_the_onnx_folder_by_convention(student_with_onnx):
    res = generation.generate(str(student_with_onnx), "a red circle", seed=2, engine="auto")
    assert res.info["engine"] == "onnx" and res.notice == ""
    torch_res = generation.generate(str(student_with_onnx), "a red circle", seed=2, engine="torch")
    assert torch_res.info["engine"] == "torch"
    assert np.abs(pixels(res.images) - pixels(torch_res.images)).max() <= PIXEL_TOL


def test_sizes_the_graphs_cannot_take_run_on_pytorch(student_with_onnx):
    """Graphs are traced on sizes that halve cleanly through the UNet; others fall back, with the reason."""
    manifest_path = student_with_onnx / "onnx" / loading.ONNX_MANIFEST
    manifest = json.loads(manifest_path.read_text())
    assert manifest["size_multiple"] == 4  # VAE factor 2 x one UNet downsample
    manifest["size_multiple"] = 48
    manifest_path.write_text(json.dumps(manifest))
    res = generation.generate(str(student_with_onnx), "a red circle", height=64, width=64)
    assert res.info["engine"] == "torch" and "multiples of 48, not 64x64" in res.notice
    with pytest.raises(ValueError, match="multiples of 48"):
        generation.generate(str(student_with_onnx), "a red circle", engine="onnx")


def test_corrupt_onnx_file_is_a_clear_error_and_generate_falls_back(student_with_onnx):
    graph = student_with_onnx / "onnx" / "unet.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the weights
    graph.write_bytes(bytes(data))
    with pytest.raises(loading.LoadError, match=r"corrupt ONNX graph .*unet\.onnx.*checksum.*export-onnx"):
        loading.load_onnx(student_with_onnx / "onnx")
    res = generation.generate(str(student_with_onnx), "a red circle", seed=2)
    assert res.info["engine"] == "torch" and len(res.images) == 1
    assert res.notice.startswith("ONNX engine unavailable (corrupt ONNX graph") and res.notice.endswith("using PyTorch")
    assert "\n" not in res.notice
    with pytest.raises(loading.LoadError, match="corrupt ONNX graph"):
        generation.generate(str(student_with_onnx), "a red circle", engine="onnx")


def test_unparseable_onnx_file_is_a_clear_error(student_with_onnx):
    """A file whose checksum matches its manifest but that ONNX Runtime cannot parse."""
    folder = student_with_onnx / "onnx"
    (folder / "vae_decoder.onnx").write_bytes(b"not a protobuf at all" * 10)
    manifest = json.loads((folder / loading.ONNX_MANIFEST).read_text())
    manifest["graphs"]["vae_decoder"].update(onnx_export.file_entry(folder / "vae_decoder.onnx"))
    (folder / loading.ONNX_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(loading.LoadError, match="ONNX Runtime cannot load it"):
        loading.load_onnx(folder)
    (folder / loading.ONNX_MANIFEST).write_text("{broken")
    with pytest.raises(loading.LoadError, match="not valid JSON"):
        loading.load_onnx(folder)


def test_export_made_from_other_weights_is_not_used(student_with_onnx):
    cfg = student_with_onnx / "unet" / "config.json"
    cfg.write_text(cfg.read_text() + "\n")  # the model changed after the export
    res = generation.generate(str(student_with_onnx), "a red circle")
    assert res.info["engine"] == "torch" and "made from other weights" in res.notice


def test_build_on_first_use_serves_pytorch_then_onnx(tiny_student, monkeypatch):
    monkeypatch.setenv("ONESTEP_ONNX_BUILD", "1")
    spec = registry.ModelSpec(str(tiny_student), "sd", "student", str(tiny_student), resolution=64, onnx="build")
    engine, notice = onnx_engine.engine_for(spec)
    assert engine is None and "building the ONNX Runtime engine" in notice
    onnx_engine.wait_for_builds(300)
    engine, notice = onnx_engine.engine_for(spec)
    assert engine is not None and notice == ""
    assert engine.folder == onnx_engine.cache_folder(spec) and engine.folder.parent == onnx_engine.cache_root()


def test_prompt_cache_skips_text_encoding_and_is_keyed_by_model(tiny_student, tiny_sd_v):
    calls = []
    pipe = loading.load_pipeline(str(tiny_student), device="cpu")
    hook = pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        onestep.PROMPT_CACHE.clear()
        first = generation.generate(str(tiny_student), "two green squares", seed=5, engine="torch")
        assert first.info["prompt_cache"] == "miss" and len(calls) == 1
        second = generation.generate(str(tiny_student), "two green squares", seed=5, engine="torch")
        assert second.info["prompt_cache"] == "hit" and len(calls) == 1  # the text encoder did not run
        assert np.array_equal(pixels(first.images), pixels(second.images))
        off = generation.generate(str(tiny_student), "two green squares", seed=5, engine="torch", prompt_cache=False)
        assert off.info["prompt_cache"] == "off" and len(calls) == 2
        other = generation.generate(str(tiny_sd_v), "two green squares", engine="torch")
        assert other.info["prompt_cache"] == "miss"  # another model never shares an entry
        onestep.PROMPT_CACHE.clear(str(tiny_student))
        again = generation.generate(str(tiny_student), "two green squares", seed=5, engine="torch")
        assert again.info["prompt_cache"] == "miss" and len(calls) == 3
        assert generation.generate(str(tiny_sd_v), "two green squares", engine="torch").info["prompt_cache"] == "hit"
    finally:
        hook.remove()
    # a reloaded pipeline of the same id has another text encoder: a miss, not a stale hit
    loading.clear_cache()
    assert generation.generate(str(tiny_student), "two green squares", engine="torch").info["prompt_cache"] == "miss"


def test_onnx_engine_caches_prompts_too(exported, tiny_student):
    engine = onnx_engine.load_engine(exported[0])
    spec = registry.get(str(tiny_student))
    runs = engine.text_encoder_runs
    a = onnx_engine.generate(engine, spec, "a heart", seed=1)
    b = onnx_engine.generate(engine, spec, "a heart", seed=1)
    assert engine.text_encoder_runs == runs + 1 and b.info["prompt_cache"] == "hit"
    assert np.array_equal(pixels(a.images), pixels(b.images))


def test_cli_export_onnx_and_generate_on_it(tiny_student, tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["export-onnx", "--model", str(tiny_student), "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["out"] == str(out) and report["graphs"]["unet"]["max_abs_diff"] < 1e-3
    assert (out / loading.ONNX_MANIFEST).is_file()
    # exporting again replaces the export in place
    assert main(["export-onnx", "--model", str(tiny_student), "--out", str(out), "--no-nasa", "--json"]) == 0
    assert "unet_nasa" not in json.loads(capsys.readouterr().out)["graphs"]
    # without --out it goes to the cache, where generate --engine onnx finds it
    assert main(["export-onnx", "--model", str(tiny_student)]) == 0
    capsys.readouterr()
    png = tmp_path / "a.png"
    assert main(["generate", "--model", str(tiny_student), "--prompt", "a cat", "--engine", "onnx", "--out", str(png),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["engine"] == "onnx" and png.is_file()


@pytest.mark.parametrize("args,match", [
    (["--model", "no/such-model"], "unknown model"),
    (["--model", "shapes-64-teacher"], "is a teacher; the ONNX engine serves one- to four-step students"),
    (["--out", "FILE"], "is a file; give a new or empty folder"),
    (["--out", "BUSY"], "holds other files"),
])
def test_cli_export_onnx_bad_args_are_one_line(tiny_student, tmp_path, capsys, args, match):
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "BUSY").mkdir()
    (tmp_path / "BUSY" / "notes.txt").write_text("mine")
    args = [str(tmp_path / a) if a in ("FILE", "BUSY") else a for a in args]
    argv = ["export-onnx", *(["--model", str(tiny_student)] if "--model" not in args else []), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err
    assert (tmp_path / "BUSY" / "notes.txt").read_text() == "mine"


def test_engine_argument_is_checked(tiny_student):
    with pytest.raises(ValueError, match="engine 'tensorrt' is not supported; allowed: auto, torch, onnx"):
        generation.generate(str(tiny_student), "a cat", engine="tensorrt")


def test_channels_last_matches_default_layout(tiny_student):
    ref = generation.generate(str(tiny_student), "a red circle", seed=4, engine="torch")
    loading.clear_cache()  # channels_last converts the cached modules in place: start from a fresh copy
    try:
        got = generation.generate(str(tiny_student), "a red circle", seed=4, engine="torch",
                                  torch_options=speed.TorchOptions(channels_last=True))
        pipe = loading.load_pipeline(str(tiny_student), device="cpu")
        assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        assert np.abs(pixels(got.images) - pixels(ref.images)).max() <= PIXEL_TOL
    finally:
        loading.clear_cache()


def test_tiny_decoder_from_a_local_folder(tiny_student, tmp_path):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=4).save_pretrained(tmp_path / "taesd")
    opts = speed.TorchOptions(tiny_decoder=str(tmp_path / "taesd"))
    got = generation.generate(str(tiny_student), "a red circle", seed=4, engine="torch", torch_options=opts)
    ref = generation.generate(str(tiny_student), "a red circle", seed=4, engine="torch")
    assert got.images[0].size == ref.images[0].size == (64, 64)
    assert np.abs(pixels(got.images) - pixels(ref.images)).max() > 10  # another decoder drew it
    assert type(loading.load_pipeline(str(tiny_student), device="cpu").vae).__name__ == "AutoencoderKL"  # untouched
    # a decoder that does not fit the model's latents is refused in one line
    AutoencoderTiny(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                    num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1)).save_pretrained(tmp_path / "taesd4x")
    with pytest.raises(ValueError, match="upsamples 4x"):
        generation.generate(str(tiny_student), "a cat", engine="torch",
                            torch_options=speed.TorchOptions(tiny_decoder=str(tmp_path / "taesd4x")))
    with pytest.raises(loading.LoadError, match="does not exist"):
        generation.generate(str(tiny_student), "a cat", engine="torch",
                            torch_options=speed.TorchOptions(tiny_decoder=str(tmp_path / "missing")))


def test_tiny_decoder_graph_matches_pytorch_and_goes_stale_with_its_weights(tiny_student, tmp_path, monkeypatch):
    from diffusers import AutoencoderTiny

    from training.methods.dmd2 import copy_folder

    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=4).save_pretrained(tmp_path / "taesd")
    monkeypatch.setattr(registry, "tiny_decoder_source", lambda spec: str(tmp_path / "taesd"))
    student = copy_folder(tiny_student, tmp_path / "student")
    manifest = onnx_engine.export(str(student), student / "onnx")
    assert "tiny_decoder" in manifest["graphs"] and manifest["tiny_decoder"]["source"] == str(tmp_path / "taesd")
    tiny = speed.TorchOptions(tiny_decoder=True)
    got = generation.generate(str(student), "a red circle", seed=4, engine="onnx", torch_options=tiny)
    ref = generation.generate(str(student), "a red circle", seed=4, engine="torch", torch_options=tiny)
    vae = generation.generate(str(student), "a red circle", seed=4, engine="onnx")
    assert got.info == {**got.info, "engine": "onnx", "decoder": "tiny"} and ref.info["decoder"] == "tiny"
    assert np.abs(pixels(got.images) - pixels(ref.images)).max() <= 1
    assert np.abs(pixels(got.images) - pixels(vae.images)).max() > 10 and vae.info["decoder"] == "vae"
    # retraining the tiny decoder makes the export stale: it is not used, and the notice says why
    config = tmp_path / "taesd" / "config.json"
    config.write_text(config.read_text().replace("{", '{"_note": "retrained",', 1))
    onnx_engine._FOUND.clear()
    folder, why = onnx_engine.find(registry.get(str(student)))
    assert folder is None and "other weights" in why


def test_export_without_a_tiny_decoder_serves_it_on_pytorch(student_with_onnx):
    tiny = speed.TorchOptions(tiny_decoder=str(student_with_onnx))  # a folder of the user's: PyTorch only
    with pytest.raises(ValueError, match="PyTorch engine only"):
        generation.generate(str(student_with_onnx), "a cat", engine="onnx", torch_options=tiny)
    with pytest.raises(ValueError, match="no tiny decoder graph"):  # TAESD is not on this machine
        generation.generate(str(student_with_onnx), "a cat", engine="onnx", torch_options=speed.TorchOptions(tiny_decoder=True))


def test_torch_option_errors_are_one_line(tiny_student):
    with pytest.raises(ValueError, match="float16 needs a CUDA device"):
        speed.pipeline(str(tiny_student), speed.TorchOptions(dtype="float16"), device="cpu")
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        speed.TorchOptions(dtype="int8").check()


def test_torch_compile_failure_is_one_line(tiny_student, monkeypatch):
    """Compiling for real takes minutes on 2 cores (it works: see README); here the compiler breaks."""
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nlong traceback text")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(ValueError, match=r"^torch.compile does not work here \(RuntimeError: no C\+\+ compiler found\); "
                                         r"run without --compile$"):
        generation.generate(str(tiny_student), "a cat", engine="torch", torch_options=speed.TorchOptions(compile=True))
    assert type(loading.load_pipeline(str(tiny_student), device="cpu").unet).__name__ == "UNet2DConditionModel"


def test_noise_replay_runs_on_pytorch_in_auto_mode(student_with_onnx):
    """A noise file (ReNO's export) was optimized through PyTorch; auto replays it there, bit for bit."""
    noise = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    res = generation.generate(str(student_with_onnx), "a red circle", noise=noise)
    ref = generation.generate(str(student_with_onnx), "a red circle", noise=noise, engine="torch")
    assert res.info["engine"] == "torch" and np.array_equal(pixels(res.images), pixels(ref.images))
    assert generation.generate(str(student_with_onnx), "a red circle", noise=noise, engine="onnx").info["engine"] == "onnx"
