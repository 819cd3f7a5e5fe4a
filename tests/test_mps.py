"""Apple Silicon (device=mps): the MPS random state in checkpoints (and checkpoints moving between machines
with and without MPS), bf16 autocast on MPS, and what needs CUDA refused in one line. The tests that need
an Apple GPU skip elsewhere, saying so."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from training.checkpoint import load_checkpoint, save_checkpoint
from training.errors import UserError
from training.precision import Precision, mps_bf16
from training.seeding import rng_state, set_rng_state
from training.train import train

MPS = torch.backends.mps.is_available()
needs_mps = pytest.mark.skipif(not MPS, reason="needs an Apple GPU (torch.backends.mps.is_available() is False)")


def draws() -> list[float]:
    """One draw from each global generator this machine has."""
    out = [random.random(), float(np.random.rand()), torch.rand(1).item()]
    if MPS:
        out.append(torch.rand(1, device="mps").item())
    return out


def test_the_rng_state_round_trips_through_a_checkpoint_file(tmp_path):
    torch.manual_seed(3)
    state = rng_state()
    assert ("mps" in state) == MPS
    expected = draws()
    torch.save(state, tmp_path / "rng.pt")
    draws()  # move every generator on
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected


def test_a_state_with_or_without_mps_loads_on_any_machine():
    state = rng_state()
    expected = draws()
    from_apple = state if MPS else {**state, "mps": torch.zeros(8, dtype=torch.uint8)}  # ignored without MPS
    set_rng_state(from_apple)
    assert draws() == expected
    set_rng_state({k: v for k, v in state.items() if k != "mps"})  # written on a machine without MPS
    assert draws()[:3] == expected[:3]  # MPS, if here, goes on with its own stream


def test_a_checkpoint_from_an_apple_machine_resumes_here(make_cfg):
    """The run's last.pt with an MPS random state added (as an Apple machine writes it) resumes on this machine."""
    _, first = train(make_cfg("max_steps=4"))
    path = first["checkpoint"]
    state = load_checkpoint(path, "test")
    state["rng"]["mps"] = torch.mps.get_rng_state() if MPS else torch.zeros(8, dtype=torch.uint8)
    save_checkpoint(state, path)
    _, resumed = train(make_cfg("max_steps=6", "resume=true"))
    assert resumed["trainer"].step == 6


@pytest.mark.parametrize(
    ("preset", "message"),
    [
        (Precision("fp16", "float16", grad_scaler=True), "precision=fp16 needs CUDA (autocast + GradScaler); on mps"),
        (Precision("tf32", tf32=True), "precision=tf32 (TensorFloat-32) needs an NVIDIA GPU; on mps"),
    ],
)
def test_what_needs_cuda_is_refused_on_mps_in_one_line(preset, message):
    with pytest.raises(UserError) as e:
        preset.check(torch.device("mps"))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_compile_with_cuda_graphs_is_refused_off_cuda(make_cfg, tmp_path):
    device = "mps" if MPS else "cpu"
    with pytest.raises(
        UserError, match=rf"^compile_mode=reduce-overhead replays CUDA graphs, .* \(device is {device}\)"
    ):
        train(make_cfg(f"device={device}", "compile=true", "compile_mode=reduce-overhead"))
    assert not (tmp_path / "outputs").exists()


@pytest.mark.skipif(MPS and mps_bf16(), reason="checks the refusal where MPS cannot run bf16")
def test_bf16_on_mps_needs_macos_14():
    with pytest.raises(UserError, match=r"^precision=bf16 on MPS needs macOS 14 or newer"):
        Precision("bf16", "bfloat16").check(torch.device("mps"))


@needs_mps
@pytest.mark.skipif(MPS and not mps_bf16(), reason="MPS runs bf16 from macOS 14 on")
def test_bf16_autocasts_on_mps():
    precision, device = Precision("bf16", "bfloat16"), torch.device("mps")
    precision.check(device)
    a = torch.randn(8, 8, device=device)
    with precision.autocast_context(device):
        assert (a @ a).dtype == torch.bfloat16


@needs_mps
def test_training_on_mps_resumes_exactly(make_cfg):
    """The MPS random state is in last.pt: a run stopped and resumed ends with the weights of one that went through."""
    common = ["device=mps", "epochs=2", "deterministic=true"]
    _, full = train(make_cfg(*common, "run_name=full"))
    train(make_cfg(*common, "run_name=split", "max_steps=5"))
    _, resumed = train(make_cfg(*common, "run_name=split", "resume=true"))
    for a, b in zip(full["model"].parameters(), resumed["model"].parameters(), strict=True):
        assert torch.equal(a.cpu(), b.cpu())


@needs_mps
@pytest.mark.skipif(MPS and not mps_bf16(), reason="MPS runs bf16 from macOS 14 on")
def test_bf16_training_on_mps(make_cfg):
    metrics, objects = train(make_cfg("device=mps", "precision=bf16"))
    assert all(np.isfinite(objects["trainer"].losses)) and np.isfinite(metrics["eval/energy_distance@nfe4"])
