"""CUDA paths: mixed precision, TF32, loss scaling, CUDA graphs. Skipped cleanly without a GPU."""

from __future__ import annotations

import pytest
import torch

from models.layers import jvp_safe_kernels
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


def test_meanflow_cuda_graph_tangent_matches_the_eager_jvp_and_trains(make_cfg):
    from losses.meanflow import MeanFlowLoss
    from models.unet import UNet

    torch.manual_seed(0)
    model = UNet(in_channels=1, image_size=16, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(8,), norm_groups=4, dropout=0.0).cuda()  # fmt: skip
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, v = torch.randn(8, 1, 16, 16, device="cuda"), torch.randn(8, 1, 16, 16, device="cuda")
    t, r = torch.rand(8, device="cuda") * 0.5, torch.rand(8, device="cuda") * 0.5 + 0.5
    graphed = MeanFlowLoss(full_batch_jvp=True, use_cuda_graph=True)
    eager = MeanFlowLoss(full_batch_jvp=True)
    for _ in range(2):  # the second call replays the captured graph
        replayed = graphed._graphed_tangent(model, x, t, r, v, None)
        torch.testing.assert_close(replayed, eager._jvp(model, x, t, r, v, None)[1], rtol=1e-4, atol=1e-5)
    metrics, _ = train(make_cfg("device=cuda", "dataloaders=digits", "model=unet", "model.channels=16",
                                "model.channel_mult=[1,2]", "model.num_res_blocks=1", "model.attention_resolutions=[8]",
                                "model.norm_groups=4", "loss=meanflow", "solver=meanflow", "loss.full_batch_jvp=true",
                                "loss.use_cuda_graph=true", "precision=bf16", "eval=image", "eval.nfe=[1]",
                                "eval.num_samples=64", "epochs=2"))  # fmt: skip
    assert metrics["train/final_loss"] < 100


@pytest.mark.parametrize("name", ["unet", "cnn", "dit"])
def test_jvp_through_every_image_model_on_cuda_in_fp32_and_bf16(name):
    from models.cnn import SmallCNN
    from models.dit import DiT
    from models.unet import UNet

    torch.manual_seed(0)
    make = {
        "unet": lambda: UNet(in_channels=3, image_size=8, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                             attention_resolutions=(4,), norm_groups=4, dropout=0.0, num_classes=10),
        "cnn": lambda: SmallCNN(in_channels=3, channels=16, num_blocks=2, norm_groups=4, num_classes=10),
        "dit": lambda: DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                           num_classes=10),
    }[name]  # fmt: skip
    model = make().double()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, v = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randn(4, 3, 8, 8, dtype=torch.float64)
    t, r = torch.rand(4, dtype=torch.float64) * 0.5, torch.rand(4, dtype=torch.float64) * 0.5 + 0.5
    cond = torch.tensor([0, 3, 5, 9])
    tangents = (v, torch.ones_like(t), torch.zeros_like(r))
    with jvp_safe_kernels():
        _, reference = torch.func.jvp(lambda *a: model(*a, cond), (x, t, r), tangents)
    cuda = model.float().cuda()
    args = [a.float().cuda() for a in (x, t, r)]
    tan = [a.float().cuda() for a in tangents]
    with jvp_safe_kernels():
        _, fp32 = torch.func.jvp(lambda *a: cuda(*a, cond.cuda()), tuple(args), tuple(tan))
    assert (fp32.double().cpu() - reference).norm() < 1e-4 * reference.norm()
    with torch.autocast("cuda", dtype=torch.bfloat16), jvp_safe_kernels():
        _, bf16 = torch.func.jvp(lambda *a: cuda(*a, cond.cuda()), tuple(args), tuple(tan))
    assert torch.isfinite(bf16).all()
    assert (bf16.double().cpu() - reference).norm() < 0.1 * reference.norm()
