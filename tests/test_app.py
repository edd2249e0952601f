"""Launcher flags: loopback by default, --listen only with --auth."""
import pytest


def test_listen_requires_auth_and_defaults_are_loopback(monkeypatch):
    import app

    monkeypatch.delenv("SPACE_ID", raising=False)
    assert app.host_for(app.parse_args([])) == "127.0.0.1"
    with pytest.raises(SystemExit):
        app.parse_args(["--listen"])
    with pytest.raises(SystemExit):
        app.parse_args(["--listen", "--auth", "nocolon"])
    assert app.host_for(app.parse_args(["--listen", "--auth", "me:secret"])) == "0.0.0.0"
    monkeypatch.setenv("SPACE_ID", "someone/onestep")
    assert app.host_for(app.parse_args([])) == "0.0.0.0"


def test_module_level_demo_for_spaces():
    import gradio as gr

    import app

    assert isinstance(app.demo, gr.Blocks)
