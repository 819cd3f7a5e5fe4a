"""MeanFlow under DistributedDataParallel: 2 CPU processes (gloo) give the gradient of one process
that averages the two halves. py-meanflow reported that a jvp inside DDP skipped the gradient
all-reduce on some torch versions; this guards the versions we run on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from losses.meanflow import MeanFlowLoss
from models.mlp import MLP

SETTINGS = [dict(ratio=1.0, full_batch_jvp=True), dict(ratio=0.5, full_batch_jvp=False)]


def _data() -> torch.Tensor:
    return torch.randn(64, 2, generator=torch.Generator().manual_seed(1))


def _grads(model: torch.nn.Module, call: torch.nn.Module, x: torch.Tensor, seed: int, kwargs: dict) -> list[np.ndarray]:
    torch.manual_seed(seed)
    MeanFlowLoss(**kwargs)(call, {"x1": x}).loss.backward()
    return [p.grad.numpy().copy() for p in model.parameters()]


def _worker(rank: int, init_file: str, queue, kwargs: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = MLP(2, 32, 2)
    half = _data()[rank * 32 : (rank + 1) * 32]
    queue.put((rank, _grads(model, DistributedDataParallel(model), half, 100 + rank, kwargs)))
    dist.barrier()  # neither rank closes its gloo connections while the other still uses them
    dist.destroy_process_group()


@pytest.mark.parametrize("kwargs", SETTINGS, ids=["full-batch-jvp", "selective-jvp"])
def test_meanflow_gradients_are_all_reduced_under_ddp(tmp_path, kwargs):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, str(tmp_path / "pg"), queue, kwargs)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    torch.manual_seed(0)
    model = MLP(2, 32, 2)
    reference = []
    for rank in range(2):
        model.zero_grad()
        reference.append(_grads(model, model, _data()[rank * 32 : (rank + 1) * 32], 100 + rank, kwargs))
    for g0, g1, ref0, ref1 in zip(results[0], results[1], *reference, strict=True):
        np.testing.assert_allclose(g0, g1)  # synchronised
        np.testing.assert_allclose(g0, (ref0 + ref1) / 2, atol=1e-6)  # and the right average
