import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from training.ema import ema_with_warmup


def test_ema_follows_early_weights_then_decays_slowly():
    model = nn.Linear(2, 2)
    ema = AveragedModel(model, multi_avg_fn=ema_with_warmup(0.999), use_buffers=True)
    ema.update_parameters(model)  # first update copies
    for _ in range(300):
        with torch.no_grad():
            model.weight.fill_(1.0)
        ema.update_parameters(model)
    # a constant 0.999 would sit at 1 - 0.999**300 = 0.26 of the way; the warmup is nearly there
    assert ema.module.weight.min() > 0.9


def test_ema_copies_integer_buffers():
    model = nn.BatchNorm1d(3)
    ema = AveragedModel(model, multi_avg_fn=ema_with_warmup(0.9), use_buffers=True)
    model(torch.randn(8, 3))
    model(torch.randn(8, 3))
    ema.update_parameters(model)
    ema.update_parameters(model)
    assert ema.module.num_batches_tracked.item() == 2
