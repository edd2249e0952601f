"""OneStep Studio: `python app.py` (or `make run`) serves the UI at http://127.0.0.1:7860.

Thin on purpose: parse arguments, build the demo, launch only under __main__. `demo` is module-level
so a Hugging Face Space (sdk: gradio, app_file: app.py) finds it.
"""
from __future__ import annotations

import argparse
import os

from ui import build_demo, launch_kwargs, queue

demo = build_demo()


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="OneStep Studio web UI")
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    ap.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    return ap.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    queue(demo).launch(**launch_kwargs(demo.services, port=args.port, share=args.share))
