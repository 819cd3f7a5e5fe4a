"""Devices and numeric precision: which autocast, TF32 and loss scaling a run uses."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from training.errors import UserError


def resolve_device(name: str | None) -> torch.device:
    """The requested device, or the best available (cuda > mps > cpu) when ``name`` is None."""
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but CUDA is not available on this machine; use device=cpu or leave device unset")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("device=mps but MPS is not available on this machine; use device=cpu or leave device unset")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device={name} is not supported; use cpu, cuda or mps")
    return device


def mps_bf16() -> bool:
    """Whether this machine's MPS backend runs bf16 (macOS 14+), so ``precision=bf16`` autocasts on it."""
    return torch.backends.mps.is_available() and torch.backends.mps.is_macos_or_newer(14, 0)


@dataclass
class Precision:
    """One precision preset (configs/precision/*.yaml).

    Weights and optimizer state stay fp32; ``autocast`` runs the forward pass in bf16/fp16;
    ``grad_scaler`` guards fp16 gradients against underflow; ``tf32`` lets fp32 matmuls and
    convolutions use TensorFloat-32 tensor cores on Ampere and newer GPUs. On CPU and Apple GPUs
    (``device=mps``, macOS 14+) bf16 autocasts too; fp16 (GradScaler) and TF32 need CUDA.
    """

    name: str
    autocast: str | None = None  # "bfloat16" | "float16" | None
    grad_scaler: bool = False
    tf32: bool = False

    @property
    def dtype(self) -> torch.dtype | None:
        return getattr(torch, self.autocast) if self.autocast else None

    def check(self, device: torch.device) -> None:
        """Refuse a precision the device cannot run, before any work is done."""
        if self.autocast == "float16" and device.type != "cuda":
            raise UserError(
                f"precision={self.name} needs CUDA (autocast + GradScaler); on {device.type} use precision=bf16 or fp32"
            )
        if (
            self.autocast == "bfloat16"
            and device.type == "cuda"
            and not torch.cuda.is_bf16_supported(including_emulation=False)
        ):
            raise UserError(
                f"precision={self.name} needs an Ampere or newer GPU "
                f"({torch.cuda.get_device_name(device)} lacks bf16); use precision=fp16 or fp32"
            )
        if self.autocast == "bfloat16" and device.type == "mps" and not mps_bf16():
            raise UserError(
                f"precision={self.name} on MPS needs macOS 14 or newer (bf16 on Apple GPUs); use precision=fp32"
            )
        if self.tf32 and device.type != "cuda":
            raise UserError(
                f"precision={self.name} (TensorFloat-32) needs an NVIDIA GPU; on {device.type} use precision=fp32"
            )

    def apply(self) -> None:
        """Set the process-wide matmul precision this preset asks for."""
        torch.backends.cuda.matmul.allow_tf32 = self.tf32
        torch.backends.cudnn.allow_tf32 = self.tf32
        torch.set_float32_matmul_precision("high" if self.tf32 else "highest")

    def autocast_context(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    def grad_scaler_for(self, device: torch.device) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(device.type, enabled=self.grad_scaler)
