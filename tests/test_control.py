"""Control: preprocessors on awkward uploads, ControlNet/NCT application on tiny real models, the
training losses, loading checks and the CLI."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import control, generation, loading, onestep, registry, teacher
from training.config import ControlNetConfig, NctConfig
from training.methods import controlnet as cn_method
from training.methods import nct


def _shapes_png(size=(67, 45), mode="RGB") -> Image.Image:
    from shapes import parse, render

    img = Image.fromarray(render(parse("a red circle left of a blue square"), 3)).resize(size)
    return img.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "P", "I;16"])
@pytest.mark.parametrize("preprocessor", control.PREPROCESSORS)
def test_preprocessors_on_odd_gray_and_alpha_images(mode, preprocessor, tmp_path):
    img = _shapes_png((67, 45), "RGB")
    if mode == "I;16":
        img = Image.fromarray((np.asarray(img.convert("L")).astype(np.uint16) * 257))
    else:
        img = img.convert(mode)
    path = tmp_path / "in.png"
    img.save(path)
    for src in (path, img, np.asarray(img) if mode in ("RGB", "L", "RGBA") else img):
        m = control.make_map(src, preprocessor, 64, 48)
        assert m.size == (48, 64) and m.mode == "RGB"
    if preprocessor == "canny":
        assert np.asarray(m).max() == 255  # the shapes' outlines were found


def test_canny_finds_edges_between_colors_of_one_brightness():
    """A red circle on purple (luma 103 against 83) has an outline; a gray copy's gradient is under Canny's
    low threshold, so only the color image shows it."""
    from shapes import render

    rgb = render("a red circle on a purple background", seed=0)
    gray = np.repeat(np.asarray(Image.fromarray(rgb).convert("L"))[..., None], 3, axis=2)
    assert (control.detect(gray, "canny") == 0).all()
    edges = control.detect(rgb, "canny")[..., 0] > 0
    assert edges.sum() > 40 and not edges[0].any() and not edges[:, 0].any()  # the outline, not the frame


def test_bad_uploads_say_what_is_wrong(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    with pytest.raises(ValueError, match="could not read the control image"):
        control.make_map(bad)
    big = Image.new("L", (4200, 4200))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    with pytest.raises(ValueError, match="too large|at most"):
        control.make_map(buf.getvalue())
    with pytest.raises(ValueError, match="does not exist"):
        control.make_map(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="pickle"):
        control.make_map(bad, "hed")
    with pytest.raises(ValueError, match="unknown preprocessor"):
        control.make_map(bad, "xray")
    with pytest.raises(ValueError, match="uint8"):
        control.make_map(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="out of range"):
        control.check_scale(3.0)


def test_edge_match():
    a = np.zeros((32, 32), np.uint8)
    a[10, 5:25] = 255
    assert control.edge_match(a, a)["f1"] == 1.0
    shifted = np.roll(a, 1, axis=0)
    assert control.edge_match(a, shifted)["f1"] == 1.0  # within the 1-pixel tolerance
    assert control.edge_match(a, np.roll(a, 5, axis=0))["f1"] == 0.0
    assert control.edge_match(a, np.zeros_like(a))["f1"] == 0.0
    extra = a.copy()
    extra[20, 5:25] = 255  # every edge drawn, plus as many that are not there
    assert control.edge_match(a, extra) == {"precision": 0.5, "recall": 1.0, "f1": 2 / 3}
    assert control.edge_match(extra, a) == {"precision": 1.0, "recall": 0.5, "f1": 2 / 3}


@pytest.fixture(scope="module")
def student_pipe(tiny_student):
    return loading.load_pipeline(str(tiny_student), device="cpu"), registry.get(str(tiny_student))


def _controlnet(pipe, seed=0, perturb=False):
    torch.manual_seed(seed)
    net = cn_method.new_controlnet(pipe.unet, pipe.vae_scale_factor).eval()
    if perturb:  # zero-initialised outputs do nothing until trained: give them weights
        with torch.no_grad():
            for name, p in net.named_parameters():
                if "zero" in name or "controlnet_" in name:
                    p.normal_(0, 0.05)
    return net


def test_zero_init_controlnet_changes_nothing_and_trained_one_does(student_pipe):
    pipe, spec = student_pipe
    layout = control.make_map(_shapes_png((64, 64)), "canny", 64, 64)
    plain = onestep.generate(pipe, spec, "a red circle", seed=1)
    for net, same in ((_controlnet(pipe), True), (_controlnet(pipe, perturb=True), False)):
        ctl = control.Control(net, control.map_tensor(layout, 1, "cpu", torch.float32))
        out = onestep.generate(pipe, spec, "a red circle", seed=1, control=ctl)
        assert np.array_equal(np.asarray(out.images[0]), np.asarray(plain.images[0])) is same
    # the teacher path (diffusers' ControlNet pipeline on the same components) takes the same Control
    res = teacher.sample(pipe, spec, "a red circle", steps=2, guidance_scale=2.0, seed=1, control=ctl)
    assert res.images[0].size == (64, 64)


def test_saved_controlnet_loads_and_drives_generation(student_pipe, tiny_student, tmp_path, capsys):
    pipe, spec = student_pipe
    folder = cn_method.export(_controlnet(pipe, perturb=True), tmp_path / "cn")
    layout = tmp_path / "layout.png"
    _shapes_png((90, 70)).save(layout)
    res = generation.generate(str(tiny_student), "a red circle", control_image=str(layout), control_model=str(folder),
                              control_scale=0.8, device="cpu")
    assert res.settings["control"]["kind"] == "controlnet" and res.settings["control"]["scale"] == 0.8
    from pipelines.__main__ import main

    out = tmp_path / "o.png"
    assert main(["generate", "--model", str(tiny_student), "--prompt", "a red circle", "--control-image", str(layout),
                 "--control-model", str(folder), "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["control"]["preprocessor"] == "canny"
    assert main(["generate", "--model", str(tiny_student), "--prompt", "a red circle", "--control-image", str(layout),
                 "--control-model", str(folder), "--control-scale", "9"]) == 2
    assert "out of range" in capsys.readouterr().err
    # no adapter of its own and no teacher with a ControlNet: a clear error
    assert main(["generate", "--model", str(tiny_student), "--prompt", "a red circle", "--control-image",
                 str(layout)]) == 2
    assert "ControlNet" in capsys.readouterr().err
    # a ControlNet made for other latents (the embedded teacher's: 8 channels) is refused in one line
    assert main(["generate", "--model", str(tiny_student), "--prompt", "a red circle", "--control-image", str(layout),
                 "--control-model", "assets/models/shapes-64/controlnet-canny"]) == 2
    assert "8-channel latents" in capsys.readouterr().err


def test_controlnet_folder_checks(student_pipe, tmp_path):
    pipe, _ = student_pipe
    folder = cn_method.export(_controlnet(pipe), tmp_path / "cn")
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(loading.LoadError, match="truncated|corrupt"):
        loading.load_controlnet(folder)
    weights.unlink()
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(loading.LoadError, match="pickles"):
        loading.load_controlnet(folder)
    with pytest.raises(loading.LoadError, match="does not exist"):
        loading.load_controlnet(tmp_path / "nope")


def test_resolve_control_models():
    student, teacher_spec = registry.get("shapes-64"), registry.get("shapes-64-teacher")
    assert control.resolve(teacher_spec, "canny") == (teacher_spec.control_source("canny", "controlnet"), "controlnet")
    assert control.resolve(student, "canny", "controlnet")[1] == "controlnet"
    assert control.resolve(student, "canny", "nct") == (student.control_source("canny", "nct"), "nct")
    with pytest.raises(ValueError, match="teacher"):
        control.resolve(teacher_spec, "canny", "nct")
    sd_turbo = registry.get("stabilityai/sd-turbo")
    assert control.resolve(sd_turbo, "canny")[0] == "thibaud/controlnet-sd21-canny-diffusers"


def test_nct_losses_decrease_on_a_tiny_student(tiny_student):
    pipe, spec = loading.load_pipeline(str(tiny_student), device="cpu", cache=False), registry.get(str(tiny_student))
    model = nct.Adapted(pipe, spec)
    torch.manual_seed(0)
    net = cn_method.new_controlnet(pipe.unet, pipe.vae_scale_factor).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    shape = onestep.latent_shape(pipe, 4, 64, 64)
    with torch.no_grad():
        cond = onestep.encode_prompt(pipe, ["a red circle", "a blue square", "two green circles", "a red square"],
                                     64, 64)
        z = torch.randn(shape, generator=gen)
        c = model.conditions(model.x0(z, cond, None), "canny")
    eps = torch.randn(shape, generator=gen)
    k = torch.tensor([0, 2, 5, 7])
    totals = []
    for _ in range(8):
        l_con, l_bound, _ = nct.losses(model, net, z, eps, k, 8, cond, c)
        loss = l_con + l_bound
        totals.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert totals[-1] < totals[0]
    assert all(p.grad is None for p in pipe.unet.parameters())  # the student is frozen
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_nct_and_controlnet_training_runs_resume_and_export(tiny_student, tiny_sd, tmp_path):
    from training.run import main as run_main
    from training.config import save_json

    cfg = NctConfig(student=str(tiny_student), run_dir=str(tmp_path / "nct"), steps=3, batch_size=2, save_every=2,
                    warmup=1)
    save_json(cfg, tmp_path / "nct.json")
    assert run_main(["--config", str(tmp_path / "nct.json"), "--export", str(tmp_path / "nct-out")]) == 0
    assert loading.load_controlnet(tmp_path / "nct-out") is not None
    lines = [json.loads(x) for x in (tmp_path / "nct" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_con", "loss_bound", "lambda"} <= set(lines[-1])
    state = json.loads(next((tmp_path / "nct" / "checkpoints").glob("step-00000003")).joinpath("state.json").read_text())
    assert "lambda" in state
    # a warm start (fresh run folder) begins from the exported adapter and its step
    import dataclasses

    from training.methods import nct as nct_method

    warm = dataclasses.replace(cfg, run_dir=str(tmp_path / "nct-warm"), init_adapter=str(tmp_path / "nct-out"),
                               init_step=3, steps=3)
    res = nct_method.train(warm)
    assert res["finished"] and res["step"] == 3
    exported = loading.load_controlnet(tmp_path / "nct-out").state_dict()
    assert all(torch.equal(v, exported[k]) for k, v in res["adapter"].state_dict().items())

    # a scale folded into the export: at conditioning scale 1 it gives what the adapter gave at that scale, and a
    # warm start from it takes the scale out again
    from pipelines import generation
    from shapes import render

    adapter = res["adapter"]
    with torch.no_grad():  # residual convolutions away from zero, so that the scale matters
        for conv in [*adapter.controlnet_down_blocks, adapter.controlnet_mid_block]:
            conv.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
            conv.bias.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    plain = nct_method.export(adapter, cfg, tmp_path / "nct-plain", meta=False)
    folded = nct_method.export(adapter, cfg, tmp_path / "nct-folded", scale=2.0, meta=False)
    assert nct_method.folded_scale(plain) == 1.0 and nct_method.folded_scale(folded) == 2.0
    layout = render("a red circle left of a blue square", seed=3)

    def image(model, scale):
        return np.asarray(generation.generate(str(tiny_student), "a red circle", control_image=layout, seed=0,
                                              control_model=str(model), control_scale=scale).images[0], np.int16)

    at_two = image(plain, 2.0)
    assert np.abs(image(folded, 1.0) - at_two).max() <= 1 and np.abs(image(plain, 1.0) - at_two).max() > 1
    res = nct_method.train(dataclasses.replace(warm, run_dir=str(tmp_path / "nct-warm2"), init_adapter=str(folded)))
    unfolded, want = res["adapter"].state_dict(), loading.load_controlnet(plain).state_dict()
    assert all(torch.allclose(v, want[k], atol=1e-6) for k, v in unfolded.items())
    calib = nct_method.calibrate(adapter, cfg, ["a red circle", "two blue squares"], scales=(1.0, 2.0))
    assert calib["scale"] in (1.0, 2.0) and set(calib["scales"]) == {1.0, 2.0}
    for r in calib["scales"].values():  # evaluate --control's numbers: precision and recall beside F1
        assert all(0 <= r[k] <= 1 for k in ("edge_f1", "edge_precision", "edge_recall", "shapeeval"))

    cfg = ControlNetConfig(teacher=str(tiny_sd), run_dir=str(tmp_path / "cn"), steps=2, batch_size=2, data_size=8,
                           warmup=1)
    res = cn_method.train(cfg)
    assert res["finished"]
    cn_method.export(res["controlnet"], tmp_path / "cn-out")
    assert (tmp_path / "cn-out" / "config.json").is_file()
    with pytest.raises(ValueError, match="pickle"):
        cn_method.train(ControlNetConfig(teacher=str(tiny_sd), run_dir=str(tmp_path / "x"), preprocessor="hed"))


def test_control_tab_says_how_well_each_output_keeps_the_edges():
    from PIL import Image

    from shapes import render
    from ui.control import follows

    layout = Image.fromarray(render("a red circle left of a blue square", 3))
    assert follows(layout, layout, "canny", {}) == ", edge F1 1.00 (precision 1.00, recall 1.00)"
    blank = Image.new("RGB", (64, 64), (0, 128, 0))
    assert follows(layout, blank, "canny", {}) == ", edge F1 0.00 (precision 0.00, recall 0.00)"
    elsewhere = Image.fromarray(render("a red circle left of a blue square", 4))  # the same prompt, moved
    assert follows(layout.resize((128, 128)), elsewhere, "canny", {"low": 100, "high": 200}).startswith(", edge F1 0.")
    assert follows(layout, layout, "sketch", {}) == ""  # its maps are not edges


def test_control_endpoint_side_by_side(tiny_student, tmp_path):
    """/control on a student with no NCT adapter and no teacher ControlNet: each way says why it is
    unavailable instead of failing the whole call; no control image at all is a one-line error."""
    from gradio_client import Client, handle_file

    from tests.serving import serving
    from ui.services import Services

    services = Services(outputs=tmp_path / "out", default_model=str(tiny_student), extra_models=[str(tiny_student)])
    with serving(services) as url:
        client = Client(url, verbose=False)
        layout = tmp_path / "layout.png"
        _shapes_png((64, 64)).save(layout)
        cells, summary = client.predict(str(tiny_student), "a red circle", "0", handle_file(str(layout)), None,
                                        "canny", 100, 200, 1.0, 2, api_name="/control")
        assert summary.count("unavailable") >= 2 and "NCT" in summary
        with pytest.raises(Exception, match="no control image"):
            client.predict(str(tiny_student), "a red circle", "0", None, None, "canny", 100, 200, 1.0, 2,
                           api_name="/control")
