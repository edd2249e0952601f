"""The CLI as a user runs it (subprocess): generate on tiny SD/SDXL folders, evaluate, errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, check=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipelines", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl"])
def test_generate_prints_timings_and_writes_png_with_settings(request, fixture, tmp_path):
    from pipelines.generation import read_settings

    model = request.getfixturevalue(fixture)
    out = tmp_path / "img.png"
    proc = cli("generate", "--model", model, "--prompt", "a red circle", "--seed", 3, "--steps", 2,
               "--height", 64, "--width", 64, "--batch-size", 2, "--out", out, "--json")
    report = json.loads(proc.stdout)
    assert set(report["timings"]) == {"text_encoding", "denoising", "decoding", "total"}
    assert report["settings"]["steps"] == 2 and len(report["files"]) == 2
    assert read_settings(tmp_path / "img_1.png")["seed"] == 4


@pytest.mark.parametrize("args,match", [
    (["--steps", "0"], "steps 0"), (["--seed", "abc"], "not a whole number"), (["--model", "no/model"], "unknown model"),
    (["--width", "100000"], "width 100000")])
def test_generate_errors_are_one_line(tiny_sd, args, match):
    proc = cli("generate", "--model", tiny_sd, "--prompt", "a cat", "--height", 64, "--width", 64, *args, check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert match in last and "Traceback" not in proc.stderr


def test_evaluate_renderer_writes_summary_images_and_results(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n# comment\ntwo blue stars\na heart left of a square\n")
    out = tmp_path / "eval.json"
    cli("evaluate", "--model", "renderer", "--prompts", prompts, "--images-per-prompt", 2, "--json", out,
        "--save-images", tmp_path / "imgs")
    summary = json.loads(out.read_text())
    assert summary["overall"] == 1.0 and summary["num_images"] == 6
    assert set(summary["per_category"]) == {"colors", "counting", "position"}
    assert "mean_seconds_per_image" in summary
    assert (tmp_path / "imgs" / "2_1.png").is_file()
    rows = [json.loads(x) for x in (tmp_path / "imgs" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"prompt", "passed", "reason"} <= set(rows[0])


def test_fd_between_evaluate_folders_is_zero_for_the_same_images_and_grows_for_others(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\ntwo blue stars\na heart left of a square\na green triangle\n")
    for name, seed in (("a", 0), ("b", 0), ("c", 50)):
        cli("evaluate", "--model", "renderer", "--prompts", prompts, "--images-per-prompt", 3, "--seed", seed,
            "--json", tmp_path / f"{name}.json", "--save-images", tmp_path / name)
    same = json.loads(cli("fd", tmp_path / "a", tmp_path / "b").stdout)
    other = json.loads(cli("fd", tmp_path / "a", tmp_path / "c").stdout)
    assert same["pairs"] == 12 and abs(same["fd"]) < 1e-3
    assert other["fd"] > 10 * max(abs(same["fd"]), 1e-3)
    proc = cli("fd", tmp_path / "a", tmp_path / "missing", check=False)
    assert proc.returncode == 2 and "results.jsonl" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_evaluate_rejects_prompts_outside_the_grammar(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na photo of a cat\n")
    proc = cli("evaluate", "--model", "renderer", "--prompts", prompts, "--json", tmp_path / "o.json", check=False)
    assert proc.returncode == 2 and "line 2" in proc.stderr and "outside the shapes grammar" in proc.stderr
