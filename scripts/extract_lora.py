"""Turn an SDXL LoRA training checkpoint (``last.pt``: LoRA weights, optimizer, step, RNG) into
weights-only LoRA files.

    python scripts/extract_lora.py outputs/ckpts/sdxl_lora/my_lora/last.pt --out-dir my_lora --format both

``--format diffusers`` writes ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights``),
``kohya`` its kohya-format copy ``pytorch_lora_weights_kohya.safetensors`` (AUTOMATIC1111,
ComfyUI), ``both`` both. The model is rebuilt from the checkpoint's own config, so its SDXL
weights (``model.pretrained``) must be reachable; ``--pretrained`` points elsewhere if they moved.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from adapters.sdxl_components import SDXLWeightsError
from adapters.sdxl_training import export_checkpoint
from training.errors import UserError

log = logging.getLogger("extract_lora")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a training checkpoint (last.pt or archive/epoch_XXXX.pt)")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--format", choices=("diffusers", "kohya", "both"), default="diffusers")
    p.add_argument("--ema", action="store_true", help="the EMA of the LoRA weights instead of the raw ones")
    p.add_argument("--pretrained", default=None, help="the SDXL weights, if not where the run found them")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        written = export_checkpoint(args.checkpoint, args.out_dir, kohya=args.format in ("kohya", "both"),
                          diffusers=args.format != "kohya", use_ema=args.ema, pretrained=args.pretrained)  # fmt: skip
    except (UserError, SDXLWeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
