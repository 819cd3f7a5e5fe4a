"""scripts/bench_clip_adapter.py: adapter sizes from the real architectures on the meta device (the step
timings build the full 385M GLIDE and are left to the slow test of the GLIDE benchmark's kind)."""

from __future__ import annotations

import pytest

from scripts.bench_clip_adapter import main


def test_sizes_of_the_adapter_for_each_clip_model(capsys: pytest.CaptureFixture[str]) -> None:
    sizes, steps = main(["--sizes-only"])
    assert steps == []
    assert [(r["clip"], r["dim"]) for r in sizes] == [("ViT-B-32", 512), ("ViT-L-14", 768), ("RN50", 1024)]
    for r in sizes:  # LayerNorm + two D x D layers + the projection to 4 tokens of GLIDE's 512-wide text (+ its LN)
        d = r["dim"]
        assert r["mlp"] == 2 * d + 2 * (d * d + d) + (d * 4 * 512 + 4 * 512) + 2 * 512
    assert len({r["attention"] for r in sizes}) == 1  # the K/V projections do not depend on the CLIP model
    assert "| ViT-L-14 | 768 |" in capsys.readouterr().out


@pytest.mark.slow
def test_one_full_size_step_per_phase_on_the_cpu() -> None:
    _, steps = main(["--steps", "1", "--batch", "1"])
    assert [r["phase"] for r in steps] == ["plain GLIDE (diffusion)", "adapter_only", "adapter_gates", "full"]
    assert steps[1]["trained"] < steps[2]["trained"] < steps[3]["trained"] < steps[0]["trained"]
