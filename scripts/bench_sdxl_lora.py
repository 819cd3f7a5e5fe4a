"""What SDXL LoRA training costs: the weights' memory per component (real architecture sizes, built on
the meta device, nothing read) and, where a CUDA GPU is available, peak memory and step time of
LoRA training steps at 512 px rank 4 and 1024 px rank 16.

    python scripts/bench_sdxl_lora.py --device cuda                 # both tables (random weights)
    python scripts/bench_sdxl_lora.py                              # the weights table only (CPU)
    python scripts/bench_sdxl_lora.py --tiny --device cpu --steps 2   # the step loop on a tiny SDXL (smoke)

Steps use random weights (a step's cost does not depend on them), batch 1, the training recipe of
``experiment=sdxl_lora``: UNet weights bf16 under bf16 autocast, text encoders bf16, VAE fp32, LoRA
fp32 on the UNet's attention (``attention_out``), gradient checkpointing, SDPA, AdamW; every step
encodes its image with the VAE and its caption with both text encoders (no cache). Median of
``--steps`` after one warm-up; peak memory is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from adapters.sdxl import SDXLLoRA, SDXLTokenizer
from adapters.sdxl_arch import SDXL_BASE, TINY_SDXL
from adapters.sdxl_components import build_random
from adapters.sdxl_lora import add_lora, lora_config, unet_targets
from losses.sdxl import SDXLDiffusionLoss
from training.benchmark import markdown_table, precision_preset, time_steps

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
RECIPE = {"unet": "bf16", "text_encoder": "bf16", "text_encoder_2": "bf16", "vae": "fp32"}
CASES = ((512, 4), (1024, 16))


def weights_table(configs: dict[str, dict[str, Any]], folder: Path) -> list[dict[str, Any]]:
    """Parameters and resident bytes of each component in the recipe's dtype, and of the LoRA."""
    with torch.device("meta"):
        parts = build_random(configs, folder)
    rows = []
    for name, dtype in RECIPE.items():
        n = sum(p.numel() for p in getattr(parts, name).parameters())
        rows.append({"part": name, "params": n, "dtype": dtype, "gb": n * DTYPE_BYTES[dtype] / 1e9})
    for rank in sorted({r for _, r in CASES}):
        with torch.device("meta"):
            unet = build_random(configs, folder).unet
        n = add_lora(unet, lora_config(rank, 16, 0.0, unet_targets("attention_out")))
        # weights + grads + AdamW's two moments, all fp32
        rows.append({"part": f"LoRA r{rank} (+grad, AdamW)", "params": n, "dtype": "fp32", "gb": 4 * n * 4 / 1e9})
    return rows


def step_row(configs: dict[str, dict[str, Any]], folder: Path, size: int, rank: int, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with device:
        parts = build_random(configs, folder)
    cpu = device.type != "cuda"
    model = SDXLLoRA(parts, lora_rank=rank, lora_alpha=16, unet_dtype="float32" if cpu else "bfloat16",
                     text_encoder_dtype="float32" if cpu else "bfloat16").to(device)  # fmt: skip
    precision = precision_preset("fp32" if cpu else "bf16", device)
    tokens, _ = SDXLTokenizer(model.tokenizers)(["a photo of an astronaut riding a horse on the moon"])
    batch = {
        "x1": torch.rand(1, 3, size, size, device=device) * 2 - 1,
        "cond": {"tokens": tokens.to(device), "sizes": torch.tensor([[size, size, 0, 0, size, size]], device=device)},
    }
    optimizer = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.requires_grad]}], lr=1e-4)
    timing = time_steps(model, SDXLDiffusionLoss(), batch, optimizer, precision, device, args.steps)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    del model, parts, optimizer
    return {"size": size, "rank": rank, "trained": trained, "ms": timing.median_ms, "memory_mb": timing.peak_mb}


def main(argv: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="a tiny SDXL of the same layout (tests; CPU)")
    args = parser.parse_args(argv)
    configs = TINY_SDXL if args.tiny else SDXL_BASE
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        weights = weights_table(configs, folder)
        print(f"\nSDXL{' (tiny)' if args.tiny else ''} weights resident during LoRA training")
        cells = [[r["part"], f"{r['params']:,}", r["dtype"], f"{r['gb']:.3f}"] for r in weights]
        print(markdown_table(["part", "parameters", "dtype", "GB"], cells, "lrlr"))
        if args.device != "cuda" and not args.tiny:
            print("\nstep time and peak memory: CUDA only (pass --device cuda on a GPU machine)")
            return weights, []
        rows = [step_row(configs, folder, size // (8 if args.tiny else 1), rank, args) for size, rank in CASES]
    print(f"\nLoRA training steps, batch 1, {args.device}")
    header = ["image px", "rank", "trained parameters", "ms / step", "peak memory MB"]
    print(markdown_table(header, [[r["size"], r["rank"], f"{r['trained']:,}", f"{r['ms']:.0f}", f"{r['memory_mb']:.0f}"]
                                  for r in rows], "rrrrr"))  # fmt: skip
    return weights, rows


if __name__ == "__main__":
    main()
