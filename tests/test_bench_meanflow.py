"""scripts/bench_meanflow.py end to end at a tiny size: every CPU part runs and prints its tables."""

from __future__ import annotations

import json

import pytest

from scripts.bench_meanflow import (
    FM_STEP,
    MF_AUTOCAST_JVP,
    MF_FULL,
    MF_GRAPH,
    MF_SELECTIVE,
    dit_variants,
    main,
    step_variants,
)

TINY_2D = ["--steps", "20", "--seeds", "0", "--datasets", "moons", "--eval-samples", "256"]
TINY_UNET = ["--unet-steps", "4", "--log-every", "2", "--repeats", "2", "--unet-batch", "8", "--unet-channels", "32",
             "--unet-res-blocks", "1"]  # fmt: skip


@pytest.mark.slow  # a benchmark's smoke run, like the other bench_* ones: keeps the default suite under 10 min
def test_tiny_run_prints_every_table_and_writes_every_run(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["--parts", "2d", "unet", "dit", *TINY_2D, *TINY_UNET, "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| moons | MeanFlow | EMA (default) |" in printed and "| moons | OT-FM | raw |" in printed
    assert printed.count("| moons | EMA (default) |") == 1 and ("PASS" in printed or "FAIL" in printed)
    assert "DiT-B/2 step cost: skipped (needs --device cuda)" in printed
    for variant in (FM_STEP, MF_SELECTIVE, MF_FULL):
        assert f"| {variant.name} |" in printed

    report = json.loads(out.read_text())
    assert len(report["2d"]) == 3 * 2  # three methods, each scored with EMA and raw weights
    assert {r["weights"] for r in report["2d"]} == {"EMA (default)", "raw"}
    assert len(report["unet"]) == 3 * 2  # three variants, two repeats
    assert all(r["ms_per_step"] > 0 and r["fastest_window_ms"] <= r["ms_per_step"] for r in report["unet"])
    assert report["dit"] == []


def test_cuda_adds_the_graph_row_and_dit_the_autocast_jvp_row():
    cpu, _ = step_variants("cpu")
    cuda, notes = step_variants("cuda")
    assert cpu == [FM_STEP, MF_SELECTIVE, MF_FULL]
    assert cuda == [*cpu, MF_GRAPH] and not notes  # configs/loss/meanflow.yaml has use_cuda_graph
    assert dit_variants(cuda) == [*cuda, MF_AUTOCAST_JVP]
