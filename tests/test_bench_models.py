"""scripts/bench_models.py at a tiny size: both pairs run every workload and print every table; the
diffusers models behind our contract are the ones a user would pick (their own classes, labels mapped)."""

from __future__ import annotations

import json

import torch

from scripts.bench_models import NUM_CLASSES, main, null_last, parameters, parse_args, unet_pair

TINY = ["--repeats", "2", "--steps", "1", "--warmup", "1", "--unet-channels", "8", "--unet-batch", "4",
        "--dit-width", "32", "--dit-depth", "1", "--dit-heads", "2", "--dit-size", "8", "--dit-batch", "4"]  # fmt: skip


def test_tiny_run_prints_every_table_and_writes_every_number(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main([*TINY, "--out", str(out)])
    printed = capsys.readouterr().out
    for workload in ("fm", "meanflow", "sample x10", "fm, checkpointed"):
        assert f"| UNet | fp32 | {workload} |" in printed and f"| DiT (32x1) | fp32 | {workload} |" in printed
    assert "| UNet | fp32 | ours |" in printed and "MeanFlow / FM" in printed and "memory saved" in printed
    assert "utilisation" not in printed  # CUDA only
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 4  # two pairs, four workloads
    for row in rows:
        assert all(len(ms) == 2 and min(ms) > 0 for ms in row["ms"].values())  # two repeats, each timed
        assert set(row["ms"]) == ({"ours"} if row["workload"] == "fm, checkpointed" else {"ours", "diffusers"})


def test_the_default_unet_pair_is_within_ten_percent_in_parameters():
    pair = unet_pair(parse_args([]))
    ours, theirs = parameters(pair.ours(False)), parameters(pair.theirs())
    assert abs(ours / theirs - 1) <= 0.10


def test_null_and_dropped_labels_map_to_diffusers_last_row():
    labels = null_last(torch.tensor([3, -1, 0]), 3, torch.device("cpu"))
    assert labels.tolist() == [3, NUM_CLASSES, 0]
    assert null_last(None, 2, torch.device("cpu")).tolist() == [NUM_CLASSES, NUM_CLASSES]
