"""Precision presets and torch.compile side by side: time per step and peak GPU memory.

    python scripts/bench_precision.py --device cuda                       # fp32, tf32, bf16, fp16
    python scripts/bench_precision.py --device cuda --compile default reduce-overhead

Each row trains the MLP on the ``kmeans`` mixture through ``training.train.train`` (the launcher's
config with overrides), so the numbers include everything the trainer does per step. ms/step is
the steady state (median over logging windows after the first, which holds warm-up and compile
time); peak memory is ``torch.cuda.max_memory_allocated``. A preset the device cannot run is
listed with the trainer's own one-line reason instead of numbers.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch

from training.benchmark import markdown_table, reset_peak_memory, run_config
from training.errors import UserError
from training.train import train

log = logging.getLogger("bench_precision")


def run(args: argparse.Namespace, precision: str, compile_mode: str | None, root: Path) -> dict[str, str]:
    name = f"{precision}" + (f"+compile:{compile_mode}" if compile_mode else "")
    epoch_batches = 20
    overrides = [
        "dataloaders=kmeans",
        f"dataloaders.dim={args.dim}",
        f"dataloaders.batch_size={args.batch}",
        f"dataloaders.num_train={args.batch * epoch_batches}",
        "dataloaders.num_eval=2000",
        f"model.hidden={args.hidden}",
        f"model.depth={args.depth}",
        f"precision={precision}",
        f"compile={compile_mode is not None}",
        f"compile_mode={compile_mode or 'default'}",
        f"epochs={args.steps // epoch_batches + 1}",
        f"max_steps={args.steps}",
        "trainer.log_every=25",
        "eval.nfe=[10]",
        "eval.num_samples=2000",
        "eval.every_epochs=0",
        "checkpoint.every_epochs=1000",
    ]
    reset_peak_memory(torch.device(args.device))
    try:
        metrics, _ = train(run_config(f"bench_{precision}_{compile_mode or 'eager'}", overrides, args.device, root))
    except UserError as e:
        return {"preset": name, "note": str(e)}
    return {
        "preset": name,
        "ms/step": f"{metrics.get('train/ms_per_step_steady', metrics['train/ms_per_step']):.3f}",
        "peak MB": f"{metrics.get('gpu/max_memory_allocated_mb', float('nan')):.0f}",
        "final loss": f"{metrics['train/final_loss']:.4f}",
        "ED@nfe10": f"{metrics['eval/energy_distance@nfe10']:.4f}",
        "note": "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "tf32", "bf16", "fp16"])
    parser.add_argument("--compile", nargs="*", default=[], metavar="MODE", help="also run these compile modes (bf16)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions:
            rows.append(run(args, precision, None, Path(tmp)))
        for mode in args.compile:
            rows.append(run(args, "bf16", mode, Path(tmp)))
    device = torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else args.device
    print(f"MLP hidden {args.hidden} x depth {args.depth} on {args.dim}-d data, batch {args.batch}, {device}\n")
    cols = ["preset", "ms/step", "peak MB", "final loss", "ED@nfe10", "note"]
    print(markdown_table(cols, [[row.get(c, "") for c in cols] for row in rows], "lrrrrl"))


if __name__ == "__main__":
    main()
