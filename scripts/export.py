"""Export a checkpoint's weights as safetensors plus the resolved config that rebuilds the model; with
``--lora``, turn an SDXL LoRA training checkpoint into weights-only LoRA files.

    python scripts/export.py outputs/ckpts/mlp/quickstart/last.pt
    python scripts/export.py outputs/ckpts/sdxl_lora/my_lora/last.pt --lora --out-dir my_lora --format both

Load a full export back without this repo's checkpoint code:

    model = hydra.utils.instantiate(OmegaConf.load("config.yaml").model)
    model.load_state_dict(safetensors.torch.load_file("model.safetensors"))

With ``--lora``, ``--format diffusers`` writes ``pytorch_lora_weights.safetensors``
(``pipe.load_lora_weights``), ``kohya`` its kohya-format copy ``pytorch_lora_weights_kohya.safetensors``
(AUTOMATIC1111, ComfyUI), ``both`` both. The model is rebuilt from the checkpoint's own config, so its
SDXL weights (``model.pretrained``) must be reachable; ``--pretrained`` points elsewhere if they moved.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf
from safetensors.torch import save_file

from models.fingerprint import with_digest
from training.cli import exit_code
from training.errors import UserError
from training.inference import export_lora_checkpoint, load_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Write DIR/model.safetensors (step, epoch, weights and format in its header "
        "metadata) and DIR/config.yaml (the run's resolved config); with --lora, the LoRA files of an SDXL "
        "LoRA training checkpoint.",
        epilog="Exit status: 0 on success, 2 on bad input (missing or damaged checkpoint).",
    )
    p.add_argument("checkpoint", type=Path, help="a last.pt or archived epoch_XXXX.pt written by launcher.py")
    p.add_argument(
        "--out",
        "--out-dir",
        dest="out",
        type=Path,
        default=None,
        help="output folder (default: export_<checkpoint stem>/ next to the checkpoint)",
    )
    p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA weights")
    lora = p.add_argument_group("LoRA files (--lora)")
    lora.add_argument("--lora", action="store_true", help="an SDXL LoRA training checkpoint -> weights-only LoRA files")
    lora.add_argument("--format", choices=("diffusers", "kohya", "both"), default=None,
                      help="the LoRA file format (default diffusers)")  # fmt: skip
    lora.add_argument("--ema", action="store_true", help="the EMA of the LoRA weights instead of the raw ones")
    lora.add_argument("--pretrained", default=None, help="the SDXL weights, if not where the run found them")
    args = p.parse_args(argv)
    if args.lora and args.raw:
        p.error("--raw is for a full export; with --lora the raw LoRA weights are the default (--ema for their EMA)")
    lora_only = {"--format": args.format, "--ema": args.ema, "--pretrained": args.pretrained}
    given = [flag for flag, value in lora_only.items() if value]
    if given and not args.lora:
        verb = "needs" if len(given) == 1 else "need"
        p.error(f"{', '.join(given)} {verb} --lora (a full export uses the EMA weights unless --raw)")
    return args


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


def export_lora(args: argparse.Namespace, out: Path) -> list[Path]:
    """The LoRA files in ``--format``, diffusers' first."""
    fmt = args.format or "diffusers"
    return export_lora_checkpoint(args.checkpoint, out, kohya=fmt in ("kohya", "both"), diffusers=fmt != "kohya",
                                  use_ema=args.ema, pretrained=args.pretrained)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # ValueError: SDXL weights that cannot be found (SDXLWeightsError)
    return exit_code(lambda: run(args), (UserError, ValueError))


def run(args: argparse.Namespace) -> int:
    out = args.out or args.checkpoint.parent / f"export_{args.checkpoint.stem}"
    if args.lora:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        for path in export_lora(args, out):
            print(path)
        return 0
    for path in export(args.checkpoint, out, use_ema=not args.raw):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
