"""The page's API as a client uses it: bad input gives one-line errors and the next call still works."""
from pathlib import Path

import pytest
from gradio_client import Client

from tests.serving import serving
from ui import launch_kwargs
from ui.services import Services, make_services


@pytest.fixture(scope="module")
def served(tiny_sd, tmp_path_factory):
    services = Services(outputs=tmp_path_factory.mktemp("outputs"), default_model=str(tiny_sd),
                        extra_models=[str(tiny_sd)])
    with serving(services) as url:
        yield url, services


@pytest.fixture(scope="module")
def client(served):
    return Client(served[0], verbose=False)


def call(client, model, prompt="a red circle", negative="", seed="1", randomize=False, steps=1, size=64, batch=1):
    return client.predict(model, prompt, negative, seed, randomize, steps, size, batch, api_name="/generate")


def test_valid_generation_writes_png_with_settings(client, served, tiny_sd):
    from pipelines.generation import read_settings

    gallery, timing, seed = call(client, str(tiny_sd), batch=2)
    assert len(gallery) == 2 and "images/s" in timing and seed == "1"
    settings = read_settings(next(served[1].outputs.glob("*-2.png")))
    assert settings["seed"] == 2 and settings["prompt"] == "a red circle"


def test_tiny_decoder_is_recorded_in_the_png_and_restored(client, served):
    """The embedded student with its tiny decoder: another picture than the VAE's, and the PNG says so."""
    from pipelines.generation import read_settings

    args = ("shapes-64", "two blue stars", "", "7", False, 1, 64, 1, "nasa", 0.5)
    tiny, timing, _ = client.predict(*args, True, api_name="/generate")
    plain, _, _ = client.predict(*args, False, api_name="/generate")
    settings = read_settings(tiny[0]["image"])
    assert settings["decoder"] == "tiny" and "decoder" not in read_settings(plain[0]["image"])
    assert Path(tiny[0]["image"]).read_bytes() != Path(plain[0]["image"]).read_bytes()


@pytest.mark.parametrize("kwargs", [
    {"steps": 0}, {"steps": 10**6}, {"size": 100000}, {"seed": "abc"}, {"seed": str(2**70)},
    {"prompt": "x" * 100_000}, {"model": "no/such-model"}])
def test_bad_input_gives_one_line_error_then_next_call_works(client, tiny_sd, kwargs):
    args = {"model": str(tiny_sd)} | kwargs
    with pytest.raises(Exception) as e:
        call(client, **args)
    message = str(e.value).strip()
    assert message and "\n" not in message and "Traceback" not in message
    gallery, _, _ = call(client, str(tiny_sd))
    assert len(gallery) == 1


def test_broken_model_folder_error_keeps_serving(client, tiny_sd, copy_model):
    bad = copy_model(tiny_sd)
    f = next((bad / "unet").glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(Exception, match="truncated"):
        call(client, str(bad))
    gallery, _, _ = call(client, str(tiny_sd))
    assert len(gallery) == 1


def test_launch_defaults_are_safe(served):
    kw = launch_kwargs(served[1])
    assert kw["server_name"] == "127.0.0.1" and kw["share"] is False and kw["show_error"] is False
    assert kw["allowed_paths"] == [str(served[1].outputs.resolve())] and kw["max_file_size"]


def test_default_model_notice_when_student_missing(monkeypatch):
    from pipelines import registry

    monkeypatch.setattr(registry, "installed", lambda spec: spec.id == "shapes-64-teacher")
    svc = make_services()
    assert svc.default_model == "shapes-64-teacher" and "not built yet" in svc.notice
    monkeypatch.setattr(registry, "installed", lambda spec: False)
    assert "No embedded model" in make_services().notice


def test_compare_student_beside_teacher_from_same_noise(tiny_student, tmp_path):
    from pipelines import compare

    res = compare.compare(str(tiny_student), "a red circle", seed=3, teacher_steps=3, guidance_scale=2.0)
    assert res["student"].image.size == res["teacher"].image.size == (64, 64)
    assert res["speedup"] > 0 and [x.label for x in res["strip"]] == ["1 step(s)", "2 step(s)", "4 step(s)"]
    assert res["student"].shapeeval.startswith(("pass", "fail"))  # the prompt is in the grammar
    assert compare.compare(str(tiny_student), "a photo of a cat", strip=False, teacher_steps=2)["student"].shapeeval == ""
    assert res["student"].clip_score is None  # not a model of the shapes world: no shapes CLIP score


def test_compare_api_and_model_without_teacher(tiny_sd, tiny_student, tmp_path):
    services = Services(outputs=tmp_path / "out", default_model=str(tiny_sd), extra_models=[str(tiny_student)])
    with serving(services) as url:
        client = Client(url, verbose=False)
        pair, summary, strip = client.predict(str(tiny_student), "a red circle", "0", 1, 3, 2.0, api_name="/compare")
        assert len(pair) == 2 and "Speedup" in summary and len(strip) == 3
        with pytest.raises(Exception, match="no teacher"):
            client.predict(str(tiny_sd), "a red circle", "0", 1, 3, 2.0, api_name="/compare")


def test_readme_api_example_runs(tiny_student, shapes_student, tmp_path):
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", readme, re.S).group(1)
    services = Services(outputs=tmp_path / "out", default_model=str(tiny_student),
                        extra_models=[str(tiny_student), str(shapes_student)])
    with serving(services) as url:
        code = code.replace("http://127.0.0.1:7860/", url).replace(", 25, 5.0", ", 2, 2.0")
        scope = {"MODEL": str(shapes_student), "STUDENT": str(tiny_student)}
        exec(compile(code, "README.md", "exec"), scope)
        assert len(scope["images"]) == 1 and "images/s" in scope["timing"] and len(scope["pair"]) == 2
        assert "best iterate" in scope["done"] and scope["noise"].endswith(".safetensors")
        assert "colors" in scope["table"] and scope["summary"]["num_images"] == 2
