"""What the GLIDE CLIP adapter costs: its size per CLIP model, and full-size training steps per phase
beside plain GLIDE fine-tuning, in one process.

    python scripts/bench_clip_adapter.py --device cuda --batch 4           # tf32 by default on CUDA
    python scripts/bench_clip_adapter.py --steps 2 --batch 1               # CPU

Sizes come from the real architectures built on the meta device (no weights are read): the adapter's
parameters and its adapter-only file in float32. Steps use random weights (a step's cost does not
depend on them) and random unit-norm CLIP embeddings: plain GLIDE is ``DiffusionLoss`` training
every parameter; each adapter phase is ``ClipAdapterKLLoss`` (the adapted pass, plus a no-grad pass
without the adapter for the KL) with the phase's parameters trained (``ClipAdapterTraining``), under
the precision preset, with backward, per-group clipping and AdamW. Median of ``--steps`` steps after
one warm-up; peak memory is ``max_memory_allocated`` on CUDA, the process's peak RSS on the CPU.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from adapters.glide_clip import GlideClipUNet, is_adapter_key
from losses.clip_adapter_kl import ClipAdapterKLLoss
from losses.diffusion import DiffusionLoss
from models.glide import GlideUNet
from training.benchmark import markdown_table, precision_preset, time_steps
from training.callbacks.clip_adapter import PHASES, ClipAdapterTraining
from training.compose import compose_config

CLIP_MODELS = ("ViT-B-32", "ViT-L-14", "RN50")


def adapter_sizes() -> list[dict[str, Any]]:
    rows = []
    for name in CLIP_MODELS:
        with torch.device("meta"):
            model = instantiate(compose_config(["model=glide_base_clip", "model.from_scratch=true",
                                               f"model.clip_model_name={name}"]).model)  # fmt: skip
        sets = model.parameter_sets()
        n_mlp = sum(p.numel() for _, p in sets["adapter_mlp"])
        n_attn = sum(p.numel() for _, p in sets["clip_attention"])
        n_all = sum(p.numel() for n, p in model.named_parameters() if is_adapter_key(n))
        rows.append({"clip": name, "dim": model.clip_dim, "mlp": n_mlp, "attention": n_attn, "mb": 4 * n_all / 2**20})
    return rows


def batch(model: GlideUNet, size: int, device: torch.device) -> dict[str, Any]:
    """Random images and 20-token captions: a step's cost does not depend on the values."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50256, (size, model.text_ctx), generator=g)
    mask = torch.arange(model.text_ctx).expand(size, -1) < 20
    x1 = torch.rand(size, 3, model.image_size, model.image_size, generator=g) * 2 - 1
    return {"x1": x1.to(device), "cond": {"tokens": tokens.to(device), "mask": mask.to(device)}}


def step_time(args: argparse.Namespace, phase: str | None) -> dict[str, Any]:
    device = torch.device(args.device)
    precision = precision_preset(args.precision, device)
    target = "glide_base" if phase is None else "glide_base_clip"
    model: GlideUNet = instantiate(compose_config([f"model={target}", "model.from_scratch=true",
                                                   "model.adapter_warmup_steps=0"] if phase else
                                                  [f"model={target}", "model.from_scratch=true"]).model)  # fmt: skip
    model = model.to(device).train()
    data = batch(model, args.batch, device)
    if phase is None:
        groups: list[dict[str, Any]] = [{"params": list(model.parameters()), "grad_clip": 1.0}]
        loss_fn: DiffusionLoss = DiffusionLoss()
    else:
        assert isinstance(model, GlideClipUNet)
        groups = ClipAdapterTraining(phase=phase).param_groups(model)
        loss_fn = ClipAdapterKLLoss()
        g = torch.Generator().manual_seed(1)
        data["cond"]["clip"] = F.normalize(torch.randn(args.batch, model.clip_dim, generator=g), dim=-1).to(device)
    optimizer = torch.optim.AdamW(groups, lr=1e-5)
    timing = time_steps(model, loss_fn, data, optimizer, precision, device, args.steps)
    trained = sum(p.numel() for g in groups for p in g["params"])
    del model, optimizer
    return {"phase": phase or "plain GLIDE (diffusion)", "trained": trained, "ms": timing.median_ms,
            "memory_mb": timing.peak_mb}  # fmt: skip


def main(argv: list[str] | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", help="default: tf32 on CUDA, fp32 on the CPU")
    parser.add_argument("--sizes-only", action="store_true", help="only the adapter sizes (no training steps)")
    args = parser.parse_args(argv)
    args.precision = args.precision or ("tf32" if args.device == "cuda" else "fp32")
    torch.manual_seed(0)
    sizes = adapter_sizes()
    print("\nCLIP adapter on GLIDE base (adapter_tokens 4, hidden = CLIP width)")
    header = ["CLIP model", "width", "MLP + token projection", "CLIP K/V + gates", "adapter file (fp32) MB"]
    print(markdown_table(header, [[r["clip"], r["dim"], f"{r['mlp']:,}", f"{r['attention']:,}", f"{r['mb']:.1f}"]
                                  for r in sizes], "lrrrr"))  # fmt: skip
    if args.sizes_only:
        return sizes, []
    rows = [step_time(args, phase) for phase in (None, *PHASES)]
    print(f"\nGLIDE base + ViT-L-14 adapter, batch {args.batch}, {args.device}, {args.precision}")
    header = ["training", "trained parameters", "ms / step", "peak memory MB"]
    print(markdown_table(header, [[r["phase"], f"{r['trained']:,}", f"{r['ms']:.0f}", f"{r['memory_mb']:.0f}"]
                                  for r in rows], "lrrr"))  # fmt: skip
    return sizes, rows


if __name__ == "__main__":
    main()
