"""The benchmark runs end to end on a tiny student (it measures; it does not assert speed): every
section produces its numbers, the results JSON and the README table are written."""
import json

import numpy as np
import pytest

from bench import report
from bench.__main__ import machine_name, main


def test_bench_student_vs_teacher_writes_results(tmp_path, tiny_student, monkeypatch):
    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    assert main(["--student", str(tiny_student), "--batches", "1,2", "--repeats", "1", "--seconds", "0",
                 "--skip", "cold,reno,control,nasa", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["batch"] for r in res["rows"]] == [1, 2]
    assert all(r["student_images_per_s"] > 0 and r["ratio"] > 0 for r in res["rows"])
    assert res["nasa"] == {"skipped": True}


def test_bench_every_section_on_a_shapes_student(tmp_path, shapes_student, monkeypatch, capsys):
    """shapes_student: a tiny student whose teacher is shapes-64-teacher, so ReNO uses the tiny CLIP."""
    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    assert main(["--student", str(shapes_student), "--batches", "1,2", "--repeats", "1", "--seconds", "0",
                 "--note", "tiny test student", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    errors = {k: v["error"] for k, v in res.items() if isinstance(v, dict) and "error" in v}
    assert not errors
    st = res["student_throughput"]
    for row in st["rows"]:
        assert all(row[k]["images_per_s"] > 0 for k in ("eager", "torch_cached", "onnx"))
        assert row["onnx_vs_eager"] > 0
    te = res["teacher"]
    assert te["teacher_nfe"] == 50 and te["nfe_ratio"] == 50  # 25 steps, CFG: two UNet evaluations a step
    assert all(r["speedup"] > 0 and r["speedup_over_nfe_ratio"] == pytest.approx(r["speedup"] / 50) for r in te["rows"])
    assert set(res["nasa"]) >= {"torch", "onnx"} and res["nasa"]["onnx"]["nasa_ratio"] > 0
    from pipelines.reno import RenoConfig

    reno = res["reno"]  # the whole default budget, with the model's default rewards
    assert reno["iterations"] == RenoConfig().iterations and reno["seconds"] > reno["seconds_per_iteration"] > 0
    assert reno["budget_ratio_vs_onnx"] > 1  # 50 gradient steps cost more than one generation
    assert res["control"]["batch1"]["overhead"] > 0
    assert res["cold_start"]["torch"]["seconds"] > res["cold_start"]["torch"]["first_image_seconds"] > 0
    assert res["cold_start"]["onnx"]["seconds"] > 0
    fl = res["flops"]
    assert fl["gflop_per_image"]["total"] == pytest.approx(sum(v for k, v in fl["gflop_per_image"].items() if k != "total"))
    assert fl["matmul_peak"]["gflops_per_s"] > 0 and 0 < fl["rows"][0]["onnx_fraction_of_peak"]
    table = capsys.readouterr().out
    assert "ONNX Runtime img/s" in table and "tiny test student" in table and "cold start" in table
    assert "ReNO, the whole default budget" in table
    # the README section is replaced between its markers, the rest kept
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.START}\nold table\n{report.END}\nrest\n")
    report.update_readme(res, readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old table" not in text
    assert "| 2 |" in text and res["machine"] in text


def test_bench_bad_arguments_are_one_line(capsys):
    assert main(["--batches", "0,99"]) == 2
    assert main(["--skip", "everything"]) == 2
    assert main(["--student", "no/such"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "allowed" in err[0] and "allowed" in err[1] and "unknown model" in err[2]


def test_machine_name_is_a_short_slug():
    name = machine_name()
    assert name == name.lower() and " " not in name and len(name) < 60


def test_reward_rank_counts_pass_fail_pairs_within_each_prompt(tmp_path, capsys):
    """bench.reward_rank: only prompts with both outcomes count; each (pass, fail) pair is right when the
    passing image scores higher; a folder without results.jsonl is a one-line error."""
    from PIL import Image

    from bench import reward_rank
    from shapes import render

    rows = []
    # "a red circle": its own render passes, a blue square's fails; "a star": one image, all passing (skipped)
    for index, image, prompt, drawn, passed, category in [(0, 0, "a red circle", "a red circle", True, "colors"),
                                                          (0, 1, "a red circle", "a blue square", False, "colors"),
                                                          (1, 0, "a star", "a star", True, "single_object")]:
        Image.fromarray(render(drawn, seed=image)).save(tmp_path / f"{index}_{image}.png")
        rows.append({"prompt_index": index, "image_index": image, "prompt": prompt, "category": category,
                     "passed": passed})
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert reward_rank.pairwise_accuracy([3.0, 1.0, 1.0], [True, False, True]) == [1.0, 0.5]
    res = reward_rank.rank(tmp_path, ["clip"], "shapes-64")
    assert res["prompts"] == 1 and set(res["rewards"]["clip"]) == {"all", "colors"}
    assert res["rewards"]["clip"]["all"]["pairs"] == 1
    assert res["rewards"]["clip"]["all"]["accuracy"] in (0.0, 0.5, 1.0)
    assert reward_rank.main([str(tmp_path / "nowhere")]) == 2
    assert "has no results.jsonl" in capsys.readouterr().err


def test_reno_trajectory_judges_every_iterate_and_each_selector(tmp_path, capsys):
    """bench.reno_trajectory: start / best / last / any / mean and a selector's choice from per-iterate verdicts;
    a real (short) run on the shipped student; a bad reward weight is a one-line error."""
    from bench import reno_trajectory as rt

    row = {"prompt": "a star", "category": "single_object", "passed": [False, True, False], "best_iteration": 2,
           "scores": {"contrast": [0.0, 5.0, 1.0]}}
    assert rt.outcomes(row) == {"start": 0.0, "best": 0.0, "last": 0.0, "any": 1.0, "mean": 1 / 3,
                                "by contrast": 1.0}
    res = rt.run(["a red circle", "a square left of a star"], "shapes-64", "clip=0.01", ["contrast"],
                 rt.RenoConfig(iterations=3))
    rows, summary = res["rows"], res["summary"]
    assert [len(r["passed"]) for r in rows] == [3, 3] and all(len(r["scores"]["contrast"]) == 3 for r in rows)
    assert all(0 <= r["best_iteration"] < 3 for r in rows)
    assert summary["all"]["prompts"] == 2 and {"colors", "position"} <= set(summary)
    assert summary["all"]["any"] >= max(summary["all"][k] for k in ("start", "best", "last", "by contrast"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    assert rt.main(["--prompts", str(prompts), "--rewards", "clip=lots"]) == 2
    assert "is not a number" in capsys.readouterr().err
    assert rt.main(["--prompts", str(prompts), "--limit", "-1"]) == 2
    assert "--limit -1 is negative" in capsys.readouterr().err
    assert rt.main(["--prompts", str(prompts), "--save-iterates", str(tmp_path / "it.pkl")]) == 2
    assert "must end in .npz" in capsys.readouterr().err
    assert rt.main(["--prompts", str(prompts), "--save-iterates", str(tmp_path / "no" / "it.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err
    saved = tmp_path / "it.npz"
    assert rt.main(["--prompts", str(prompts), "--iterations", "2", "--save-iterates", str(saved),
                    "--json", str(tmp_path / "t.json")]) == 0
    data = np.load(saved)  # no pickles: allow_pickle stays False
    kept = json.loads((tmp_path / "t.json").read_text())["rows"][0]
    assert data["images"].shape == (1, 2, 64, 64, 3) and data["images"].dtype == np.uint8
    assert data["passed"].tolist() == [kept["passed"]] and data["best"].tolist() == [kept["best_iteration"]]
    assert data["prompts"].tolist() == ["a red circle"]
    from shapes import judge

    assert [bool(judge("a red circle", im)[0]) for im in data["images"][0]] == kept["passed"]
