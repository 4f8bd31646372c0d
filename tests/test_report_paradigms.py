"""The report's tables of the other learning paradigms: self-supervised pretraining (stage=ssl) and few-shot
recognition (stage=fewshot), read from the flat metrics.json files those stages write, wherever the jobs live."""
from __future__ import annotations

import json

import pytest

from lightning_modules.report.fewshot import fewshot_markdown, fewshot_metrics, fewshot_run


def _write(folder, metrics):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))


def _fewshot(backbone, acc1, acc5, ci=0.02, n_way=8, episodes=600):
    return {"backbone": backbone, "n_way": n_way, "num_episodes": episodes,
            "1shot/prototype/acc": acc1, "1shot/prototype/ci95": ci, "1shot/linear_probe/acc": acc1 + 0.01,
            "1shot/linear_probe/ci95": ci, "5shot/prototype/acc": acc5, "5shot/prototype/ci95": ci}


def _ssl(mode, scale, seed, acc):
    return {"probe/pretrained/test/acc": acc, "probe/pretrained/test/mean_class_acc": acc - 0.1,
            "probe/pretrained/test/macro_f1": acc - 0.1, "probe/random_init/test/acc": 0.2, "data/mix/mode": mode,
            "data/mix/scale": scale, "seed": seed, "optimizer_steps": 300, "global_batch_size": 64}


def test_fewshot_rows_name_their_backbone_and_cells_carry_the_interval():
    runs = [fewshot_run("0", _fewshot("/runs/toy/student_mix/student_mix.ckpt", 0.24, 0.31)),
            fewshot_run("1", _fewshot("random", 0.125, 0.13))]
    assert fewshot_run("x", {"test/acc": 0.5}) is None  # another stage's metrics
    lines = fewshot_markdown(runs)
    assert lines[2] == "| backbone | job | 1-shot linear probe | 1-shot prototype | 5-shot prototype |"
    assert lines[4] == "| student_mix | 0 | 25.0 ± 2.0 | 24.0 ± 2.0 | 31.0 ± 2.0 |"
    assert lines[5] == "| random | 1 | 13.5 ± 2.0 | 12.5 ± 2.0 | 13.0 ± 2.0 |"
    assert "8-way episodes, 600 per K" in lines[7] and not any(line.startswith("**Warning") for line in lines)
    twins = fewshot_markdown([fewshot_run("a", _fewshot("/o/ssl_real/0/ssl/ssl.ckpt", 0.1, 0.1)),
                              fewshot_run("b", _fewshot("/o/ssl_concat/0/ssl/ssl.ckpt", 0.1, 0.1))])
    assert twins[4].startswith("| ssl_real/0/ssl | a |") and twins[5].startswith("| ssl_concat/0/ssl | b |")
    other = fewshot_run("2", _fewshot("random", 0.2, 0.3, episodes=100))
    assert any(line.startswith("**Warning") for line in fewshot_markdown([*runs, other]))
    assert fewshot_metrics(runs)["fewshot/student_mix/5shot/prototype"] == pytest.approx(0.31)
    assert fewshot_markdown([]) == []


def test_the_report_shows_ssl_and_fewshot_tables_from_sweep_folders(tmp_path):
    from omegaconf import OmegaConf

    from lightning_modules.stages.report import run_report

    run = tmp_path / "run"
    _write(run / "teacher", {"test/acc": 0.6})
    sweep = tmp_path / "ssl_sweep"
    for num, (mode, scale, seed, acc) in enumerate([("real_only", 1.0, 0, 0.40), ("real_only", 1.0, 1, 0.42),
                                                    ("concat", 5.0, 0, 0.45), ("concat", 5.0, 1, 0.47)]):
        _write(sweep / str(num) / "ssl", _ssl(mode, scale, seed, acc))
    fewshot = tmp_path / "fewshot_sweep"
    _write(fewshot / "0" / "fewshot", _fewshot(str(run / "ssl" / "ssl.ckpt"), 0.3, 0.4))
    _write(fewshot / "1" / "fewshot", _fewshot("random", 0.125, 0.13))
    cfg = OmegaConf.create({"experiment_name": "t", "data": {"format": "imagefolder"}, "paths": {"run_dir": str(run)},
                            "report": {"dirs": [str(sweep), str(fewshot)], "baseline": None, "grid_per_class": 3}})
    run_report(cfg)
    text = (run / "report" / "results.md").read_text()
    ssl_part = text.split("## Self-supervised pretraining", 1)[1].split("## Few-shot", 1)[0]
    assert "| real only | 0.4100 ± 0.0141 (n=2) |" in ssl_part and "| +5.00 |" in ssl_part
    few = text.split("## Few-shot recognition", 1)[1]
    assert "| ssl | 0/fewshot | 31.0 ± 2.0 | 30.0 ± 2.0 | 40.0 ± 2.0 |" in few
    merged = json.loads((run / "report" / "metrics.json").read_text())
    assert merged["ssl/real + synthetic ×5/probe_test_acc"] == pytest.approx(0.46)
    assert merged["fewshot/random/1shot/prototype"] == pytest.approx(0.125)
