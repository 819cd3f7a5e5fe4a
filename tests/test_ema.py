import torch
from torch import nn

from training.ema import EMA


def test_ema_follows_early_weights_then_decays_slowly():
    model = nn.Linear(2, 2)
    ema = EMA(model, 0.999)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for n in range(300):
        ema.update(model, n)
    # a constant 0.999 would sit at 1 - 0.999**300 = 0.26 of the way; the warmup is nearly there
    assert ema.module.weight.min() > 0.9
    late = EMA(model, 0.999)
    with torch.no_grad():
        model.weight.fill_(2.0)
    late.update(model, 10_000)  # past warmup: moves by 1 - decay
    torch.testing.assert_close(late.module.weight, torch.full((2, 2), 1.001))


def test_ema_is_frozen_and_copies_integer_buffers():
    model = nn.BatchNorm1d(3)
    ema = EMA(model, 0.9)
    model(torch.randn(8, 3))
    model(torch.randn(8, 3))
    ema.update(model, 0)
    assert ema.module.num_batches_tracked.item() == 2
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_state_round_trips():
    model = nn.Linear(3, 1)
    ema = EMA(model, 0.99)
    other = EMA(nn.Linear(3, 1), 0.99)
    other.load_state_dict(ema.state_dict())
    torch.testing.assert_close(other.module.weight, ema.module.weight)


def test_frozen_parameters_are_shared_not_copied():
    """A LoRA-style model: the frozen base is the model's own tensors, only trainable weights average."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[0].requires_grad_(False)
    ema = EMA(model, decay=0.5)
    assert ema.module[0].weight is model[0].weight and ema.module[1].weight is not model[1].weight
    before = ema.module[1].weight.clone()
    with torch.no_grad():
        model[1].weight.add_(1.0)
    ema.update(model, num_updates=100)
    assert torch.allclose(ema.module[1].weight, before + 0.5)
    assert torch.equal(ema.module[0].weight, model[0].weight)
