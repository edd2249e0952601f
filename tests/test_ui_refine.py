"""The /refine and /evaluate endpoints as a gradio_client user calls them."""
import json

import pytest
from gradio_client import Client

from tests.serving import serving
from ui.services import Services


@pytest.fixture(scope="module")
def client(shapes_student, tmp_path_factory):
    services = Services(outputs=tmp_path_factory.mktemp("outputs"), default_model=str(shapes_student),
                        extra_models=[str(shapes_student)])
    with serving(services) as url:
        yield Client(url, verbose=False)


def test_refine_endpoint_returns_best_image_and_noise(client, shapes_student):
    from pipelines import generation, loading

    image, before_after, plot, summary, noise = client.predict(
        str(shapes_student), "a red circle", "2", 1, "clip=0.01", 3, 5.0, 0, api_name="/refine")
    assert "Done" in summary and "best iterate" in summary
    tensor, settings = loading.load_noise(noise)
    assert settings["seed"] == 2 and settings["reno"]["iterations"] == 3
    again = generation.generate(settings["model"], settings["prompt"], seed=2, noise=tensor, device="cpu")
    from PIL import Image
    import numpy as np

    assert np.array_equal(np.asarray(Image.open(image).convert("RGB")), np.asarray(again.images[0]))


@pytest.mark.parametrize("args, words", [
    (("a red circle", "0", 1, "clip=x", 3, 5.0, 0), "not a number"),
    (("a red circle", "0", 1, "aesthetic=1", 3, 5.0, 0), "unknown reward"),
    (("a red circle", "0", 1, "clip=1", 0, 5.0, 0), "minimum value 1"),  # gradio checks slider bounds
    (("a red circle", "0", 1, "clip=1", 3, 0.0, 0), "minimum value"),
])
def test_refine_bad_input_one_line(client, shapes_student, args, words):
    with pytest.raises(Exception) as e:
        client.predict(str(shapes_student), *args, api_name="/refine")
    message = str(e.value).strip()
    assert words in message and "\n" not in message


def test_refine_refuses_a_teacher(client):
    with pytest.raises(Exception) as e:
        client.predict("shapes-64-teacher", "a red circle", "0", 1, "clip=1", 3, 5.0, 0, api_name="/refine")
    assert "teacher" in str(e.value)


def test_evaluate_endpoint(client, shapes_student):
    table, summary = client.predict(str(shapes_student), "my prompts", "a red circle\ntwo blue squares", 604, 1, "0",
                                    False, 2, api_name="/evaluate")
    summary = summary if isinstance(summary, dict) else json.loads(summary)
    assert summary["num_images"] == 2 and "overall" in table
    table, summary = client.predict(str(shapes_student), "my prompts", "a red circle", 1, 1, "0", True, 2,
                                    api_name="/evaluate")
    assert "ReNO" in table
    with pytest.raises(Exception) as e:
        client.predict(str(shapes_student), "my prompts", "a purple dragon", 1, 1, "0", False, 2, api_name="/evaluate")
    assert "line 1" in str(e.value)
