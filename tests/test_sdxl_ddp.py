"""SDXL LoRA under DDP (gloo, 2 CPU processes): peft's LoRA layers on a frozen, gradient-checkpointed
UNet train in both processes and stay identical (their gradients are all-reduced). Slow: a spawn of
two processes that each load the tiny SDXL."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp
from test_ddp import _free_port, _worker

from tests.sdxl_helpers import FP32, save_tiny_sdxl
from tests.test_sdxl_lora import captioned  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


def test_two_processes_train_one_lora(tmp_path: Path, captioned: Path) -> None:  # noqa: F811
    sdxl = save_tiny_sdxl(tmp_path / "sdxl")
    overrides = ["experiment=sdxl_lora", f"model.pretrained={sdxl}", *FP32, "precision=fp32",
                 f"dataloaders.root={captioned}", "dataloaders.num_workers=0", "dataloaders.num_eval=2",
                 "dataloaders.image_size=64", "dataloaders.batch_size=2", "trainer.grad_accum=1", "max_steps=3",
                 "eval.num_inference_steps=2", "eval.samples_per_prompt=1", "eval.every_epochs=0"]  # fmt: skip
    jobs = [("sdxl", tmp_path / "run", overrides, _free_port())]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, jobs, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((rank, value) for rank, _, value in (queue.get(timeout=300) for _ in range(2)))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    a, b = results[0], results[1]
    assert isinstance(a, dict) and isinstance(b, dict), (a, b)
    assert a.keys() == b.keys() and all(".lora_" in k for k in a)
    assert all(np.array_equal(a[k], b[k]) for k in a)  # the replicas stayed in step
    assert any(np.abs(a[k]).sum() > 0 for k in a if "lora_B" in k)  # and trained (lora_B starts at zero)
