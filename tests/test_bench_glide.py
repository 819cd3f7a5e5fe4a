"""scripts/bench_glide.py trains the full-size base model (385M) for a step on the CPU: slow."""

from __future__ import annotations

import math

import pytest

from scripts.bench_glide import main


@pytest.mark.slow
def test_full_size_base_model_takes_a_training_step(capsys):
    rows = main(["--steps", "1", "--batch", "1", "--precisions", "fp32"])
    assert [r["checkpointing"] for r in rows] == [False, True]
    assert all(r["params"] == 385_030_726 and math.isfinite(r["loss"]) and r["ms"] > 0 for r in rows)
    assert "GLIDE base (385,030,726 parameters)" in capsys.readouterr().out
