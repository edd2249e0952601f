"""Four gradio_client users on loopback for 60 s (ONESTEP_CONCURRENCY_SECONDS to change): no request
fails, and every image a user gets back is pixel for pixel the one its own prompt and seed make alone
(one user steers with a NASA negative prompt, whose attention processors live on the shared model)."""
import os
import threading
import time

from gradio_client import Client
from PIL import Image

import numpy as np

from pipelines.generation import read_settings
from tests.serving import serving
from ui.services import Services

SECONDS = float(os.environ.get("ONESTEP_CONCURRENCY_SECONDS", "60"))
PROMPTS = ["a red circle", "two blue squares", "a green circle above a red square", "a photo of a cat"]
NEGATIVES = ["", "", "", "red"]
SEEDS = 3  # each user cycles over its own 3 seeds, each with a reference image made serially first


def test_four_users_for_a_minute(tiny_student, tmp_path):
    services = Services(outputs=tmp_path / "out", default_model=str(tiny_student), extra_models=[str(tiny_student)])
    results = {i: {"ok": 0, "errors": [], "wrong": []} for i in range(len(PROMPTS))}

    def call(client, i, seed):
        gallery, _, seed_out = client.predict(str(tiny_student), PROMPTS[i], NEGATIVES[i], seed, False, 1, 64, 1,
                                              "nasa", 1.0, api_name="/generate")
        image = Image.open(gallery[0]["image"])
        return image, seed_out

    def user(i):
        client = Client(url, verbose=False)
        n = 0
        while time.monotonic() < deadline:
            seed = str(1000 * i + n % SEEDS)
            try:
                image, seed_out = call(client, i, seed)
                settings = read_settings(image)
                same = np.array_equal(np.asarray(image.convert("RGB")), reference[(i, n % SEEDS)])
                if settings["prompt"] != PROMPTS[i] or seed_out != seed or not same:
                    results[i]["wrong"].append((PROMPTS[i], seed, settings["prompt"], seed_out, same))
                else:
                    results[i]["ok"] += 1
            except Exception as e:  # any failure is a finding
                results[i]["errors"].append(repr(e)[:200])
            n += 1

    with serving(services) as url:
        alone = Client(url, verbose=False)
        reference = {(i, n): np.asarray(call(alone, i, str(1000 * i + n))[0].convert("RGB"))
                     for i in range(len(PROMPTS)) for n in range(SEEDS)}
        deadline = time.monotonic() + SECONDS
        threads = [threading.Thread(target=user, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=SECONDS + 120)
    print({i: r["ok"] for i, r in results.items()})
    for r in results.values():
        assert not r["errors"] and not r["wrong"], r
        assert r["ok"] >= 1
