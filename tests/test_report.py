import json

import pytest

from lightning_modules.stages.report import collect_metrics, render_results_md


def _write(run, stage, metrics):
    (run / stage).mkdir(parents=True)
    (run / stage / "metrics.json").write_text(json.dumps(metrics))


def test_results_table_in_pipeline_order_with_skips(tmp_path):
    _write(tmp_path, "student", {"test/acc": 0.5, "data/train_size": 10})
    _write(tmp_path, "teacher", {"test/acc": 0.75, "test/au_mae": 0.4, "data/skipped/train/missing_image": 2})
    _write(tmp_path, "report", {"teacher/test/acc": 0.0})  # the report's own output is not an input
    metrics = collect_metrics(tmp_path)
    assert list(metrics) == ["teacher", "student"]
    text = render_results_md(metrics, ["confusion_teacher.png"], "t")
    rows = [line for line in text.splitlines() if line.startswith("| teacher") or line.startswith("| student")]
    assert rows[0].startswith("| teacher | 0.7500") and rows[1].startswith("| student | 0.5000")
    assert "missing_image" in text and "![confusion_teacher](confusion_teacher.png)" in text


def test_corrupt_metrics_file_is_named(tmp_path):
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match="teacher/metrics.json"):
        collect_metrics(tmp_path)
