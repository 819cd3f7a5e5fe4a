"""Training-time machinery of SDXL LoRA (``adapter_training=sdxl_lora``): checks the data fits the model
before the first step, and writes the LoRA files beside every checkpoint.

Beside ``last.pt`` (the training state: LoRA weights, optimizer, step, RNG, for an exact resume)
it writes ``last_lora/pytorch_lora_weights.safetensors`` (diffusers' format, for
``pipe.load_lora_weights(folder)``) and, with ``export_kohya``, its kohya-format copy for
AUTOMATIC1111 and ComfyUI; archived checkpoints get their own ``epoch_XXXX_lora/``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from adapters.sdxl import SDXLLoRA
from dataloaders.sdxl_cache import SDXLCacheData
from training.callbacks.base import Callback

log = logging.getLogger(__name__)


def lora_folder(checkpoint: Path) -> Path:
    """Where the LoRA files of a checkpoint go: ``last.pt`` -> ``last_lora/``."""
    return checkpoint.with_name(f"{checkpoint.stem}_lora")


class SDXLLoraTraining(Callback):
    """``export_kohya``: also write the kohya copy. ``export_ema``: export the EMA weights rather
    than the raw ones (the trainer keeps an EMA of the LoRA weights only)."""

    def __init__(self, export_kohya: bool = True, export_ema: bool = False):
        self.export_kohya = export_kohya
        self.export_ema = export_ema

    def on_train_start(self, trainer: Any, data: Any) -> None:
        model = trainer.model
        if not isinstance(model, SDXLLoRA):
            raise ValueError(
                f"adapter_training=sdxl_lora trains model=sdxl_lora, not {type(model).__name__}; drop adapter_training="
            )
        if isinstance(data, SDXLCacheData):
            if model.text_encoder_lora:
                raise ValueError(
                    "model.text_encoder_lora=true trains the text encoders, but dataloaders=sdxl_cache feeds "
                    "precomputed text embeddings; use dataloaders=captions or model.text_encoder_lora=false"
                )
            stale = [k for k, v in model.encoders.items() if data.metadata.get(k) != v]
            if stale:
                raise ValueError(
                    f"the SDXL cache {data.root} was encoded with other weights ({data.metadata['pretrained']}: "
                    f"{', '.join(stale)} differ); rebuild it with scripts/precompute_sdxl.py --pretrained "
                    f"{model.source}"
                )

    def on_checkpoint(self, trainer: Any, path: Path) -> None:
        model = trainer.ema.module if self.export_ema else trainer.model
        written = model.save_lora(lora_folder(path), kohya=self.export_kohya)
        log.info("LoRA weights: %s", ", ".join(str(p) for p in written))
