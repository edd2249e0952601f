"""OneStep Studio: `python app.py` (or `make run`) serves the UI at http://127.0.0.1:7860.

Thin on purpose: parse arguments, build the demo, launch only under __main__. `demo` is module-level
so a Hugging Face Space (sdk: gradio, app_file: app.py) finds it.
"""
from __future__ import annotations

import argparse
import os

from ui import build_demo, launch_kwargs, queue
from ui.services import make_services


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="OneStep Studio web UI")
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    ap.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    ap.add_argument("--listen", action="store_true", help="serve on all interfaces (needs --auth)")
    ap.add_argument("--auth", default=None, help="user:password required to open the page")
    ap.add_argument("--enable-training", action="store_true",
                    help="keep the Train tab when serving beyond loopback (--listen, Spaces); it runs jobs here")
    args = ap.parse_args(argv)
    if args.auth is not None and ":" not in args.auth:
        ap.error("--auth must be user:password")
    if args.listen and not args.auth:
        ap.error("--listen exposes the app to your network; it needs --auth user:password")
    return args


def host_for(args) -> str:
    """Loopback unless --listen, or on a Hugging Face Space (which fronts the app itself)."""
    if args.listen:
        return "0.0.0.0"
    if os.environ.get("SPACE_ID"):
        return os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0")
    return "127.0.0.1"


def training_allowed(args) -> bool:
    """The Train tab starts processes on this machine: on loopback always, when exposed (--listen, --share,
    a Space) only when asked (--enable-training, or ONESTEP_ENABLE_TRAINING=1 on a Space: no flags there)."""
    asked = args.enable_training or os.environ.get("ONESTEP_ENABLE_TRAINING", "") in ("1", "true", "yes")
    return (host_for(args) == "127.0.0.1" and not args.share) or asked


# the real flags when run as a program; none on import (a Space imports `demo`, which has no flags)
ARGS = parse_args(None if __name__ == "__main__" else [])
demo = build_demo(make_services(training=training_allowed(ARGS)))


if __name__ == "__main__":
    kwargs = launch_kwargs(demo.services, host=host_for(ARGS), port=ARGS.port, share=ARGS.share)
    if ARGS.auth:
        user, _, password = ARGS.auth.partition(":")
        kwargs["auth"] = (user, password)
    queue(demo).launch(**kwargs)
