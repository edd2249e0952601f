"""Four gradio_client users on loopback for 60 s (ONESTEP_CONCURRENCY_SECONDS to change): no request
fails, and every image a user gets back was made from that user's own prompt and seed."""
import os
import threading
import time

from gradio_client import Client
from PIL import Image

from pipelines.generation import read_settings
from tests.test_ui import free_port
from ui import build_demo, launch_kwargs, queue
from ui.services import Services

SECONDS = float(os.environ.get("ONESTEP_CONCURRENCY_SECONDS", "60"))
PROMPTS = ["a red circle", "two blue squares", "a green circle above a red square", "a photo of a cat"]


def test_four_users_for_a_minute(tiny_student, tmp_path):
    services = Services(outputs=tmp_path / "out", default_model=str(tiny_student), extra_models=[str(tiny_student)])
    demo = build_demo(services)
    port = free_port()
    queue(demo).launch(**launch_kwargs(services, port=port), prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    results = {i: {"ok": 0, "errors": [], "wrong": []} for i in range(len(PROMPTS))}
    deadline = time.monotonic() + SECONDS

    def user(i):
        client = Client(url, verbose=False)
        n = 0
        while time.monotonic() < deadline:
            prompt, seed = PROMPTS[i], str(1000 * i + n)
            try:
                gallery, timing, seed_out = client.predict(str(tiny_student), prompt, "", seed, False, 1, 64, 1,
                                                           api_name="/generate")
                settings = read_settings(Image.open(gallery[0]["image"]))
                if settings["prompt"] != prompt or str(settings["seed"]) != seed or seed_out != seed:
                    results[i]["wrong"].append((prompt, seed, settings["prompt"], settings["seed"]))
                else:
                    results[i]["ok"] += 1
            except Exception as e:  # any failure is a finding
                results[i]["errors"].append(repr(e)[:200])
            n += 1

    threads = [threading.Thread(target=user, args=(i,)) for i in range(len(PROMPTS))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=SECONDS + 120)
    finally:
        demo.close()
    print({i: r["ok"] for i, r in results.items()})
    for r in results.values():
        assert not r["errors"] and not r["wrong"], r
        assert r["ok"] >= 1
