"""scripts/bench_eval.py at a tiny size: every table is measured and both FID paths agree."""

from __future__ import annotations

import json

import pytest

from scripts.bench_eval import main


@pytest.mark.slow  # a benchmark at a tiny size: 20-40 s of Inception passes, like the other benchmarks' smoke runs
def test_tiny_run_measures_every_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = main(["--images", "4", "--repeats", "1", "--batch-size", "4", "--sample-batch", "4", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| clean |" in printed and "| legacy_tensorflow |" in printed and "target <= 1.05" in printed
    assert [row["nfe"] for row in results["sampling"]] == [1, 10]
    assert all(row["s_per_1000"] > 0 for row in results["features"] + results["sampling"])
    assert all(row["same_fid"] for row in results["overhead"])  # ours and clean-fid's compute_fid agree
    assert json.loads(out.read_text())["overhead"][1]["network"] == "pooled-projection"
