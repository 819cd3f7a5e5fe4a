"""scripts/bench_sdxl_lora.py: SDXL base's published parameter counts from the architecture configs the
benchmark builds (on the meta device), and its step loop on a tiny SDXL (slow)."""

from __future__ import annotations

import pytest

from scripts.bench_sdxl_lora import main


def test_weights_table_has_sdxl_base_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    weights, steps = main(["--device", "cpu"])
    params = {r["part"]: r["params"] for r in weights}
    # stabilityai/stable-diffusion-xl-base-1.0: UNet, CLIP-L, OpenCLIP-G (with projection), VAE
    assert params["unet"] == 2_567_463_684 and params["vae"] == 83_653_863
    assert params["text_encoder"] == 123_060_480 and params["text_encoder_2"] == 694_659_840
    assert params["LoRA r16 (+grad, AdamW)"] == 4 * params["LoRA r4 (+grad, AdamW)"]  # LoRA size is linear in rank
    assert steps == [] and "CUDA only" in capsys.readouterr().out


@pytest.mark.slow
def test_tiny_step_loop_on_the_cpu() -> None:
    _, steps = main(["--tiny", "--device", "cpu", "--steps", "1"])
    assert [(r["size"], r["rank"]) for r in steps] == [(64, 4), (128, 16)] and all(r["ms"] > 0 for r in steps)
