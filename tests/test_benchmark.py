"""training/benchmark.py, the harness of scripts/bench_*.py: medians over repeats, rotated and
alternating order, peak memory and the markdown tables."""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import count
from types import SimpleNamespace

import pytest
import torch

from training import benchmark as bench


def test_time_repeats_times_each_repeat_after_untimed_warmup() -> None:
    calls = count()
    seconds, last = bench.time_repeats(lambda: next(calls), repeats=3, warmup=2)
    assert len(seconds) == 3 and all(s >= 0 for s in seconds)
    assert last == 4  # two warm-up calls (0, 1), then three timed ones (2, 3, 4)


def test_median_of_repeats_numbers_dicts_and_missing_values() -> None:
    assert bench.median([3.0, 1.0, 2.0]) == 2.0
    assert bench.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert bench.median([None, 5.0, None, 1.0]) == 3.0  # only the runs that measured it
    assert bench.median([None, None]) is None
    assert bench.median([{1: 1.0, 10: 4.0}, {1: 3.0, 10: 2.0}, {1: 2.0, 10: 3.0}]) == {1: 2.0, 10: 3.0}


@dataclass
class Run:
    dataset: str
    impl: str
    ms: float
    ed: dict[int, float]
    extra: float | None = None


def test_medians_by_groups_in_first_seen_order() -> None:
    runs = [
        Run("moons", "ours", 3.0, {1: 0.3}),
        Run("moons", "theirs", 9.0, {1: 0.2}, extra=7.0),
        Run("moons", "ours", 1.0, {1: 0.1}),
        Run("moons", "ours", 2.0, {1: 0.2}),
        Run("moons", "theirs", 5.0, {1: 0.4}, extra=3.0),
    ]
    summary = bench.medians_by(runs, lambda r: (r.dataset, r.impl), ("ms", "ed", "extra"))
    assert list(summary) == [("moons", "ours"), ("moons", "theirs")]
    assert summary[("moons", "ours")] == {"runs": 3, "ms": 2.0, "ed": {1: 0.2}, "extra": None}
    assert summary[("moons", "theirs")] == {"runs": 2, "ms": 7.0, "ed": {1: pytest.approx(0.3)}, "extra": 5.0}


def test_rotated_and_alternating_order() -> None:
    assert [bench.rotated("abc", turn) for turn in range(4)] == [list("abc"), list("bca"), list("cab"), list("abc")]
    assert list(bench.alternating(["ours", "theirs"], 3)) == [
        ("ours", 0), ("theirs", 0),
        ("theirs", 1), ("ours", 1),
        ("ours", 2), ("theirs", 2),
    ]  # fmt: skip


def test_side_by_side_alternates_which_goes_first() -> None:
    order: list[str] = []
    fns = {name: (lambda name=name: order.append(name) or len(order)) for name in ("ours", "theirs")}
    seconds, results = bench.side_by_side(fns, repeats=4)
    assert order == ["ours", "theirs", "theirs", "ours"] * 2
    assert {k: len(v) for k, v in seconds.items()} == {"ours": 4, "theirs": 4}
    assert results == {"ours": [1, 4, 5, 8], "theirs": [2, 3, 6, 7]}


def test_markdown_table_aligns_each_column() -> None:
    table = bench.markdown_table(["name", "ms", "verdict"], [["a", 1.5, "PASS"], ["b", "2", ""]], "lrc")
    assert table.splitlines() == [
        "| name | ms | verdict |",
        "| --- | ---: | :---: |",
        "| a | 1.5 | PASS |",
        "| b | 2 |  |",
    ]
    with pytest.raises(ValueError, match="3 columns, the header 2"):
        bench.markdown_table(["a", "b"], [], "lrr")


def test_verdict_is_at_most_the_target() -> None:
    assert [bench.verdict(r, 1.0) for r in (0.9, 1.0, 1.1)] == ["PASS", "PASS", "FAIL"]


def test_time_steps_median_loss_and_cpu_peak_memory() -> None:
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = {"x1": torch.randn(8, 2)}

    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> SimpleNamespace:
        return SimpleNamespace(loss=(model(batch["x1"]) - batch["x1"]).square().mean())

    timing = bench.time_steps(model, loss_fn, data, optimizer, bench.precision_preset("fp32", device), device, 3)
    assert len(timing.seconds) == 3 and timing.median_ms == pytest.approx(1000 * sorted(timing.seconds)[1])
    assert torch.isfinite(torch.tensor(timing.loss))
    assert 0 < timing.peak_mb == pytest.approx(bench.peak_memory_mb(device), rel=0.5)  # the process's peak RSS


def test_report_is_rewritten_with_environment_and_runs(tmp_path) -> None:
    path = tmp_path / "out" / "bench.json"
    bench.write_report(
        path, bench.environment({"steps": 3, "out": path}, "cpu"), runs=[Run("moons", "ours", 1.0, {1: 0.5})]
    )
    report = json.loads(path.read_text())
    assert report["environment"]["steps"] == 3 and report["environment"]["out"] == str(path)
    assert report["environment"]["gpu"] is None and report["environment"]["torch"] == torch.__version__
    assert report["runs"] == [{"dataset": "moons", "impl": "ours", "ms": 1.0, "ed": {"1": 0.5}, "extra": None}]


def test_run_config_keeps_the_run_to_itself_in_the_toy_setup(tmp_path) -> None:
    overrides = [*bench.toy_overrides("moons", steps=7, eval_samples=64, nfe=(1, 10)), "seed=3"]
    cfg = bench.run_config("toy", overrides, "cpu", tmp_path)
    assert cfg.run_name == "toy" and cfg.paths.run_dir == f"{tmp_path}/runs/toy" and cfg.overwrite
    assert not cfg.trackio.enabled and cfg.checkpoint.archive_every_epochs == 0
    assert cfg.dataloaders.num_train == 7 * bench.TOY_BATCH and cfg.max_steps == 7 and cfg.seed == 3
    assert list(cfg.eval.nfe) == [1, 10] and cfg.trainer.grad_clip is None


@pytest.mark.skipif(not bench.CLEAR_REFS.exists(), reason="the RSS high-water mark can be reset on Linux only")
def test_the_cpu_peak_restarts_at_reset_and_sees_a_transient_allocation() -> None:
    cpu = torch.device("cpu")
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del big
    bench.reset_peak_memory(cpu)
    start = bench.current_memory_mb(cpu)
    assert bench.peak_memory_mb(cpu) - start < 32  # the earlier 64 MiB no longer counts
    transient = torch.ones(128 * 2**20 // 4)
    del transient
    assert bench.peak_memory_mb(cpu) - start > 100  # a freed allocation between reset and read counts


@pytest.mark.skipif(not bench.CLEAR_REFS.exists(), reason="the RSS high-water mark can be reset on Linux only")
def test_a_step_that_reuses_freed_memory_still_shows_its_peak() -> None:
    """glibc keeps freed heap memory resident; without malloc_trim the second allocation would not raise RSS."""
    cpu = torch.device("cpu")
    for _ in range(2):
        chunks = [torch.ones(2**20 // 4) for _ in range(96)]  # 96 x 1 MiB from the heap, not one mmap
        del chunks
        bench.reset_peak_memory(cpu)
        start = bench.current_memory_mb(cpu)
        chunks = [torch.ones(2**20 // 4) for _ in range(96)]
        del chunks
        assert bench.peak_memory_mb(cpu) - start > 64
