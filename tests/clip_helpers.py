"""Tiny open_clip models for tests, of the same families as the real ones (ViT-B-32: a ViT with patch 32,
ViT-L-14: patch 14, RN50: a ModifiedResNet, vision_cfg.layers a list), registered offline under their
own names and loaded from a weights file, the path real local weights take.

    name = register_tiny_clip(tmp_path, "ViT-L-14", embed_dim=24)   # "dz-tiny-ViT-L-14-e24"
    weights = tiny_clip_weights(tmp_path, name)                     # random init, saved once per seed
    clip = FrozenClip(name, pretrained=str(weights))

Use ``torch.set_num_threads(1)`` around them (see tests/test_clip_score.py): their matmuls are tiny.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import open_clip
import torch

TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}

VISION_CFGS: dict[str, dict[str, Any]] = {
    "ViT-B-32": {"image_size": 64, "layers": 1, "width": 32, "head_width": 16, "patch_size": 32},
    "ViT-L-14": {"image_size": 28, "layers": 1, "width": 32, "head_width": 16, "patch_size": 14},
    "RN50": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},  # ModifiedResNet
}


def register_tiny_clip(tmp_dir: Path | str, family: str, embed_dim: int) -> str:
    """Registers a tiny model of ``family`` ("ViT-B-32", "ViT-L-14", "RN50") with embedding width ``embed_dim``
    in open_clip (for this process) and returns its name, e.g. ``dz-tiny-ViT-B-32-e24``."""
    if family not in VISION_CFGS:
        raise ValueError(f"unknown tiny CLIP family {family!r}; one of {', '.join(VISION_CFGS)}")
    name = f"dz-tiny-{family}-e{embed_dim}"
    if name not in open_clip.list_models():
        config = Path(tmp_dir) / f"{name}.json"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(json.dumps({"embed_dim": embed_dim, "vision_cfg": VISION_CFGS[family], "text_cfg": TEXT_CFG}))
        open_clip.add_model_config(config)
    return name


def tiny_clip_weights(tmp_dir: Path | str, name: str, seed: int = 0) -> Path:
    """Random-init weights of the registered model ``name`` (seeded), saved to a file under ``tmp_dir``."""
    path = Path(tmp_dir) / f"{name}-seed{seed}.pt"
    if not path.is_file():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return path
