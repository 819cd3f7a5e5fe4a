"""A short fingerprint of a model's weights, so add-on weights (an adapter, a LoRA) are never loaded
onto a base other than the one they were trained on."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from torch import Tensor

# values sampled per tensor: enough to tell weights apart, cheap even for SDXL's 2.6B-parameter UNet
FINGERPRINT_SAMPLES = 4096


def weights_fingerprint(named: Iterable[tuple[str, Tensor]]) -> str:
    """sha256 over every tensor's name, shape and a strided sample of its values: tells two bases
    apart (another checkpoint, a fine-tuned base) at the cost of a few thousand values each."""
    digest = hashlib.sha256()
    for name, p in named:
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // FINGERPRINT_SAMPLES)].float().cpu()
        digest.update(f"{name}:{tuple(p.shape)};".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()
