"""The benchmark runs end to end on a tiny student/teacher pair (it measures; it does not assert speed)."""
import json

from bench.__main__ import main


def test_bench_student_vs_teacher_writes_results(tmp_path, tiny_sd):
    from training.config import Dmd2Config
    from training.methods import dmd2

    cfg = Dmd2Config(teacher=str(tiny_sd), run_dir=str(tmp_path / "run"), prompts="shapes", steps=1, batch_size=1,
                     height=64, width=64, warmup=1)
    student = dmd2.export(dmd2.train(cfg), cfg, tmp_path / "student")
    meta = json.loads((student / "onestep.json").read_text())
    meta["resolution"] = 64
    (student / "onestep.json").write_text(json.dumps(meta))
    out = tmp_path / "bench.json"
    assert main(["--student", str(student), "--batches", "1,2", "--repeats", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["batch"] for r in res["rows"]] == [1, 2]
    assert all(r["student_images_per_s"] > 0 and r["ratio"] > 0 for r in res["rows"])
