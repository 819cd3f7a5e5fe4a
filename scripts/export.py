"""Export a checkpoint's weights as safetensors plus the resolved config that rebuilds the model.

    python scripts/export.py outputs/ckpts/mlp/quickstart/last.pt

Load it back without this repo's checkpoint code:

    model = hydra.utils.instantiate(OmegaConf.load("config.yaml").model)
    model.load_state_dict(safetensors.torch.load_file("model.safetensors"))
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf
from safetensors.torch import save_file

from models.fingerprint import with_digest
from training.errors import UserError
from training.inference import load_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Write DIR/model.safetensors (step, epoch, weights and format in its header "
        "metadata) and DIR/config.yaml (the run's resolved config).",
        epilog="Exit status: 0 on success, 2 on bad input (missing or damaged checkpoint).",
    )
    p.add_argument("checkpoint", type=Path, help="a last.pt or archived epoch_XXXX.pt written by launcher.py")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: export_<checkpoint stem>/ next to the checkpoint)",
    )
    p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA weights")
    return p.parse_args(argv)


def export(checkpoint: Path, out: Path, use_ema: bool = True) -> tuple[Path, Path]:
    """Write the weights and config; returns (weights path, config path)."""
    # Through load_model, so an export is known to load strictly into the model its config builds.
    model, state = load_model(checkpoint, use_ema=use_ema)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "step": str(state["step"]),
        "epoch": str(state["epoch"]),
        "weights": "ema" if use_ema else "raw",
        "format": str(state["format"]),
    }
    out.mkdir(parents=True, exist_ok=True)
    weights_path, config_path = out / "model.safetensors", out / "config.yaml"
    save_file(tensors, str(weights_path), metadata=with_digest(tensors, metadata))
    OmegaConf.save(OmegaConf.create(state["config"]), config_path)
    return weights_path, config_path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or args.checkpoint.parent / f"export_{args.checkpoint.stem}"
    try:
        paths = export(args.checkpoint, out, use_ema=not args.raw)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
