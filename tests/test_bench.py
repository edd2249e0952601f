"""The benchmark runs end to end on a tiny student/teacher pair (it measures; it does not assert speed)."""
import json

from bench.__main__ import main


def test_bench_student_vs_teacher_writes_results(tmp_path, tiny_student):
    out = tmp_path / "bench.json"
    assert main(["--student", str(tiny_student), "--batches", "1,2", "--repeats", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["batch"] for r in res["rows"]] == [1, 2]
    assert all(r["student_images_per_s"] > 0 and r["ratio"] > 0 for r in res["rows"])
