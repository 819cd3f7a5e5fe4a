"""Multi-process training on CPU (gloo, 2 processes): DDP and FSDP runs match one process on the
global batch, checkpoints move between process counts, rank 0 alone writes outputs, and the
launch-time errors.

The 2-process jobs share one spawn (process start-up is most of their cost). Each worker sets the
variables torchrun sets, so ``train(cfg)`` joins the group itself, as under torchrun.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import tiny_config

from dataloaders.base import process_shard
from losses.flow_matching import FlowMatchingLoss
from losses.meanflow import MeanFlowLoss
from training import distributed
from training.errors import UserError
from training.train import train

ROOT = Path(__file__).resolve().parents[1]
# 512 samples, global batch 128: 4 steps an epoch, 8 in all; evaluation shrunk further
SMALL = ["dataloaders.num_train=512", "dataloaders.batch_size=128", "model.hidden=32", "eval.num_samples=64"]
# one process reproduces two: micro-batches of 64 are the ranks' halves of each global batch of 128
ONE_PROCESS = ["dataloaders.batch_size=64", "trainer.grad_accum=2"]
LOSSES = {
    "fm": ["loss._target_=test_ddp.SeededFM"],
    "meanflow": ["loss=meanflow", "loss._target_=test_ddp.SeededMeanFlow"],
}
ED4 = "eval/energy_distance@nfe4"
TOLERANCE = 1e-5  # absolute, on every parameter after 8 AdamW steps in fp32


class _Seeded:
    """Reseeds the global RNG before each loss call, so that micro-batch k of rank r in an
    N-process run draws the noise and times that micro-batch k*N + r draws in one process
    with grad_accum=N (each rank otherwise has its own stream)."""

    calls = 0

    def __call__(self, model, batch):  # type: ignore[no-untyped-def]
        rank, world = process_shard()
        torch.manual_seed(1000 + self.calls * world + rank)
        self.calls += 1
        return super().__call__(model, batch)  # type: ignore[misc]


class SeededFM(_Seeded, FlowMatchingLoss):
    pass


class SeededMeanFlow(_Seeded, MeanFlowLoss):
    pass


def _params(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, jobs: list[tuple[str, Path, list[str], int]], queue) -> None:  # type: ignore[no-untyped-def]
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1")  # fmt: skip
    torch.set_num_threads(1)
    for name, tmp, overrides, port in jobs:
        os.environ["MASTER_PORT"] = str(port)  # a store per job: a rank done early must not join the last one
        cfg = tiny_config(tmp, [*overrides, f"paths.run_dir={tmp}/run_rank{rank}"])
        try:
            _, objects = train(cfg)
            sharded = distributed.is_sharded(objects["model"])  # its full weights are in the checkpoint
            queue.put((rank, name, "sharded" if sharded else _params(objects["model"])))
        except UserError as e:
            queue.put((rank, name, str(e)))
        except Exception as e:  # report it, or the parent would wait for the rank until its timeout
            queue.put((rank, name, f"crashed: {type(e).__name__}: {e}"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One-process references, then one spawn of 2 processes running every multi-process job."""
    tmp = tmp_path_factory.mktemp("ddp")
    results: dict = {}
    for loss, override in LOSSES.items():
        _, objects = train(tiny_config(tmp / f"one_{loss}", [*SMALL, *override, *ONE_PROCESS]))
        results[f"one_{loss}"] = _params(objects["model"])
    jobs = [(f"two_{loss}", tmp / f"two_{loss}", [*SMALL, *override]) for loss, override in LOSSES.items()]
    jobs += [
        ("two_fsdp", tmp / "two_fsdp", [*SMALL, *LOSSES["fm"], "trainer.strategy=fsdp"]),
        # the one-process fm run continues for an epoch in two processes
        ("two_resumed", tmp / "one_fm", [*SMALL, *LOSSES["fm"], "resume=true", "epochs=3"]),
        ("odd_batch", tmp / "odd", [*SMALL, "dataloaders.batch_size=127"]),
        # rank 0 scores; every rank must stop at the same step and take part in writing best.pt (a collective)
        (
            "early_fsdp",
            tmp / "early_fsdp",
            [
                *SMALL,
                *LOSSES["fm"],
                "trainer.strategy=fsdp",
                "epochs=4",
                f"early_stopping.metric={ED4}",
                "early_stopping.min_delta=10",
                "early_stopping.patience=1",
                f"checkpoint.keep_best={ED4}",
            ],
        ),
        # SIGTERM reaches rank 0 alone, at step 5: both ranks stop after step 5
        (
            "sigterm",
            tmp / "sigterm",
            [
                *SMALL,
                "+adapter_training._target_=helpers.SignalAt",
                "+adapter_training.step=5",
                "+adapter_training.rank=0",
            ],
        ),
    ]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with_ports = [(*job, _free_port()) for job in jobs]
    procs = [ctx.Process(target=_worker, args=(r, with_ports, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for _ in range(2 * len(jobs)):
        rank, name, value = queue.get(timeout=60)
        results[f"{name}/{rank}"] = value
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return {"tmp": tmp, **results}


def _assert_close(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert isinstance(a, dict), a
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=TOLERANCE, err_msg=k)


@pytest.mark.parametrize("loss", ["fm", "meanflow"])
def test_two_processes_match_one_on_the_global_batch(runs, loss):
    _assert_close(runs[f"two_{loss}/0"], runs[f"one_{loss}"])
    _assert_close(runs[f"two_{loss}/1"], runs[f"two_{loss}/0"])  # and the ranks agree


def test_fsdp_matches_one_process_and_saves_full_weights(runs):
    state = torch.load(next((runs["tmp"] / "two_fsdp").rglob("last.pt")), weights_only=True)
    _assert_close({k: v.numpy() for k, v in state["model"].items()}, runs["one_fm"])
    assert all(type(v) is torch.Tensor for v in (*state["model"].values(), *state["ema"].values()))
    assert all(isinstance(k, str) for k in state["optimizer"]["state"])  # keyed by name: loads anywhere


def test_rank_zero_alone_writes_outputs(runs):
    tmp = runs["tmp"] / "two_fm"
    assert (tmp / "EXPERIMENT_LOG.md").read_text().count("\n## ") == 1
    assert (tmp / "run_rank0" / "metrics.json").is_file()
    assert not (tmp / "run_rank1" / "metrics.json").exists()
    assert len(list(tmp.rglob("last.pt"))) == 1


@pytest.mark.parametrize("source", ["two_fm", "two_fsdp"])
def test_a_multi_process_checkpoint_resumes_in_one_process(runs, source):
    metrics, objects = train(tiny_config(runs["tmp"] / source, [*SMALL, *LOSSES["fm"], "resume=true", "epochs=3"]))
    assert metrics["train/steps"] == 12
    assert objects["trainer"].step == 12


def test_a_one_process_checkpoint_resumes_in_two(runs):
    assert isinstance(runs["two_resumed/0"], dict)
    log = (runs["tmp"] / "one_fm" / "EXPERIMENT_LOG.md").read_text()
    assert log.count("\n## ") == 2 and "train/steps | 12" in log


def test_early_stopping_and_best_pt_under_fsdp(runs):
    """Evaluations after epochs 1-3 (4 steps each); only the first improves by 10: both ranks stop at step 8."""
    assert runs["early_fsdp/0"] == runs["early_fsdp/1"] == "sharded"
    folder = next((runs["tmp"] / "early_fsdp").rglob("last.pt")).parent
    last, best = (torch.load(folder / name, weights_only=True) for name in ("last.pt", "best.pt"))
    assert last["step"] == 8 and best["step"] in (4, 8)
    assert best["metrics"][ED4] <= last["metrics"][ED4]  # the final evaluation competed too


def test_a_batch_that_does_not_split_over_the_processes_is_refused(runs):
    for rank in (0, 1):
        message = runs[f"odd_batch/{rank}"]
        assert message == "dataloaders.batch_size=127 does not split over 2 processes; use a multiple of 2"


def test_more_devices_than_the_machine_has_is_one_line_naming_both():
    n = os.cpu_count() or 1
    with pytest.raises(UserError, match=rf"^trainer.devices={n + 1} but this machine has {n} CPU cores;"):
        distributed.relaunch_with_torchrun(["launcher.py", "run_name=x"], n + 1, "cpu")


def test_notebook_kernels_refuse_multi_process_runs(monkeypatch):
    monkeypatch.setitem(sys.modules, "ipykernel", sys)
    monkeypatch.delenv("ALLOW_NOTEBOOK_DDP", raising=False)
    with pytest.raises(UserError, match="notebook kernel"):
        distributed.relaunch_with_torchrun(["launcher.py"], 2, "cpu")
    monkeypatch.setenv("ALLOW_NOTEBOOK_DDP", "1")
    with pytest.raises(UserError, match="this machine has"):  # past the notebook rule
        distributed.relaunch_with_torchrun(["launcher.py"], 10_000, "cpu")


def test_devices_2_relaunches_the_launcher_under_torchrun(tmp_path):
    """``python launcher.py ... trainer.devices=2`` starts torchrun itself; rank 0 alone writes."""
    tiny = [o for o in tiny_config(tmp_path).overrides if not o.startswith("paths.run_dir")]
    argv = [sys.executable, str(ROOT / "launcher.py"), *tiny, *SMALL, "trainer.devices=2", "device=cpu",
            f"hydra.run.dir={tmp_path}/run"]  # fmt: skip
    assert distributed.needs_relaunch(2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "EXPERIMENT_LOG.md").read_text().count("\n## ") == 1
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert out.stdout.count("energy distance") == 1  # the table, from rank 0 only


def test_fsdp_refuses_the_selective_meanflow_jvp(make_cfg):
    """Its jvp is skipped on a batch without r != t samples: ranks would disagree on FSDP's all-gathers."""
    with pytest.raises(UserError, match="strategy=fsdp .* loss.full_batch_jvp=true"):
        train(make_cfg("loss=meanflow", "solver=meanflow", "trainer.strategy=fsdp"))


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(runs):
    last = runs["tmp"] / "sigterm" / "outputs" / "ckpts" / "mlp" / "test" / "last.pt"
    assert runs["sigterm/0"] == (f"interrupted by SIGTERM at step 5: {last} holds it; resume with: "
                                 "python launcher.py run_name=test resume=true")  # fmt: skip
    assert runs["sigterm/1"].startswith("interrupted by a signal on another rank at step 5: ")
    assert torch.load(last, weights_only=True)["step"] == 5
