"""Serve the page for a test: build the demo, launch it on a free loopback port, close it after."""
from __future__ import annotations

import socket
from contextlib import contextmanager

from ui import build_demo, launch_kwargs, queue


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(services):
    """Yield the page's URL while `services`' demo runs (queued, as `app.py` serves it)."""
    demo = build_demo(services)
    port = free_port()
    queue(demo).launch(**launch_kwargs(services, port=port), prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()
