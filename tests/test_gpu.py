"""CUDA paths: mixed precision, TF32, loss scaling, CUDA graphs. Skipped cleanly without a GPU."""

from __future__ import annotations

import pytest
import torch

from training.checkpoint import load_checkpoint
from training.train import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GPU = ("device=cuda", "model.hidden=256", "dataloaders.num_train=4096", "dataloaders.batch_size=256", "epochs=3")


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "fp16"])
def test_each_precision_trains_on_cuda(make_cfg, precision):
    metrics, objects = train(make_cfg(*GPU, f"precision={precision}"))
    losses = objects["trainer"].losses
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < sum(losses[:5])
    assert torch.backends.cuda.matmul.allow_tf32 == (precision == "tf32")


def test_fp16_grad_scaler_state_is_checkpointed(make_cfg):
    _, objects = train(make_cfg(*GPU, "precision=fp16"))
    scaler = load_checkpoint(objects["checkpoint"])["scaler"]
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] >= 0
    assert objects["trainer"].scaler.is_enabled()


def test_deterministic_cuda_runs_are_bit_identical(make_cfg):
    first = train(make_cfg(*GPU, "deterministic=true"))[1]["trainer"].losses
    second = train(make_cfg(*GPU, "deterministic=true", "overwrite=true"))[1]["trainer"].losses
    assert first == second


def test_cuda_graphs_through_compile_reduce_overhead(make_cfg):
    metrics, objects = train(make_cfg(*GPU, "compile=true", "compile_mode=reduce-overhead"))
    assert metrics["train/final_loss"] < 10
    assert not any("_orig_mod" in k for k in load_checkpoint(objects["checkpoint"])["model"])
