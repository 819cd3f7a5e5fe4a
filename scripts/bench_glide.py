"""Full-size GLIDE fine-tuning steps: time and peak memory per precision, with and without
activation checkpointing.

    python scripts/bench_glide.py --device cuda                 # base model, batch 4, tf32/bf16/fp16
    python scripts/bench_glide.py --model upsample --batch 2 --device cuda --optimizer adamw8bit
    python scripts/bench_glide.py --steps 2 --batch 1           # CPU: shows the full model trains

The model is built from ``configs/model/glide_{base,upsample}.yaml`` with random weights
(``from_scratch``) unless ``--checkpoint`` gives the released ones: the cost of a step does not
depend on the weights. Each step is the framework's: ``DiffusionLoss`` (eps-MSE, text dropout
0.2) under the precision preset's autocast and GradScaler, backward, clipping, optimizer step.
Timings are the median of ``--steps`` steps after one warm-up step; memory is
``torch.cuda.max_memory_allocated`` on CUDA and the process's peak RSS on the CPU (a running
maximum over the whole process, so only the first CPU row's figure is that row's own).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from hydra.utils import instantiate

from losses.diffusion import DiffusionLoss
from models.glide import GlideUNet
from training.benchmark import markdown_table, precision_preset, time_steps
from training.compose import compose_config
from training.optim import adamw8bit


def build(model: str, checkpoint: str | None, use_checkpoint: bool, device: torch.device) -> GlideUNet:
    weights = [f"model.checkpoint={checkpoint}"] if checkpoint else ["model.from_scratch=true"]
    cfg = compose_config([f"model=glide_{model}", f"model.activation_checkpointing={use_checkpoint}", *weights])
    glide: GlideUNet = instantiate(cfg.model)
    return glide.to(device).train()


def batch(model: GlideUNet, size: int, device: torch.device) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    res = model.image_size
    cond: dict[str, torch.Tensor] = {
        "tokens": torch.randint(0, 50256, (size, model.text_ctx), generator=g).to(device),
        "mask": (torch.arange(model.text_ctx) < 20).expand(size, -1).to(device),
    }
    if model.super_res:
        cond["low_res"] = torch.rand(size, 3, res // 4, res // 4, generator=g).to(device) * 2 - 1
    return {"x1": (torch.rand(size, 3, res, res, generator=g) * 2 - 1).to(device), "cond": cond}


def run(args: argparse.Namespace, precision_name: str, use_checkpoint: bool) -> dict[str, Any]:
    device = torch.device(args.device)
    precision = precision_preset(precision_name, device)
    model = build(args.model, args.checkpoint, use_checkpoint, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw8bit(params, lr=1e-5) if args.optimizer == "adamw8bit" else torch.optim.AdamW(params, lr=1e-5)
    loss_fn = DiffusionLoss(noise_schedule="linear" if args.model == "upsample" else "squaredcos_cap_v2")
    timing = time_steps(model, loss_fn, batch(model, args.batch, device), optimizer, precision, device, args.steps)
    n = sum(p.numel() for p in model.parameters())
    del model, optimizer
    return {"precision": precision_name, "checkpointing": use_checkpoint, "ms": timing.median_ms,
            "memory_mb": timing.peak_mb, "params": n, "loss": timing.loss}  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base", choices=["base", "upsample"])
    parser.add_argument("--checkpoint", help="released base.pt / upsample.pt (default: random weights)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit"])
    parser.add_argument("--precisions", nargs="+", help="default: fp32 bf16 (CPU); tf32 bf16 fp16 (CUDA)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    precisions = args.precisions or (["tf32", "bf16", "fp16"] if args.device == "cuda" else ["fp32", "bf16"])
    rows = [run(args, p, c) for p in precisions for c in (False, True)]
    print(
        f"\nGLIDE {args.model} ({rows[0]['params']:,} parameters), batch {args.batch}, {args.device}, {args.optimizer}"
    )
    header = ["precision", "activation checkpointing", "ms / step", "peak memory MB", "loss"]
    print(markdown_table(header, [[r["precision"], r["checkpointing"], f"{r['ms']:.0f}", f"{r['memory_mb']:.0f}",
                                   f"{r['loss']:.4f}"] for r in rows], "llrrr"))  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
