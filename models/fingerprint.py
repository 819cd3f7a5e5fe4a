"""A short fingerprint of a model's weights, so add-on weights (an adapter, a LoRA) are never loaded
onto a base other than the one they were trained on."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import torch
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


def tensor_digest(tree: object) -> str:
    """sha256 (hardware-accelerated on current CPUs) over every leaf of a nested dict/list of tensors
    and plain values, bytes included:
    the integrity digest of a checkpoint or a weights file, so a flipped byte is found on load
    (torch's zip reader and safetensors check no checksum of the data)."""
    digest = hashlib.sha256()
    _update(digest, tree, "")
    return digest.hexdigest()


def _update(digest: Any, node: object, where: str) -> None:
    if isinstance(node, Tensor):
        t = node.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{where}:{t.dtype}:{tuple(node.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().data)
    elif isinstance(node, dict):
        digest.update(f"{where}{{{len(node)};".encode())
        for key, value in node.items():
            _update(digest, value, f"{where}/{key!r}")
    elif isinstance(node, (list, tuple)):
        digest.update(f"{where}[{len(node)};".encode())
        for i, value in enumerate(node):
            _update(digest, value, f"{where}/{i}")
    else:
        digest.update(f"{where}={node!r};".encode())


DIGEST_KEY = "denoising_zoo_digest"  # safetensors metadata: the tensor_digest of the file's tensors


def with_digest(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> dict[str, str]:
    """``metadata`` plus the digest of ``tensors``, for a safetensors file this project writes."""
    return {**(metadata or {}), DIGEST_KEY: tensor_digest(dict(sorted(tensors.items())))}


def digest_problem(tensors: dict[str, Tensor], metadata: dict[str, str]) -> str | None:
    """Why a safetensors file's tensors do not match the digest in its metadata; None when they match
    or the file carries none (written by another tool)."""
    if DIGEST_KEY in metadata and metadata[DIGEST_KEY] != tensor_digest(dict(sorted(tensors.items()))):
        return "is corrupted: its tensors do not match the digest written with them; write or download it again"
    return None
