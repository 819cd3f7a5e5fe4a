"""Seeds and deterministic mode."""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

log = logging.getLogger(__name__)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch (all devices); with ``deterministic`` also force
    deterministic kernels, so two runs with the same seed give bit-identical losses."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = torch.cuda.is_available()


def rng_state() -> dict:
    """All global RNG states, as tensors and plain types so ``torch.load(weights_only=True)`` reads them;
    ``mps`` only where MPS is available (Apple Silicon)."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` saved. A device's state is restored where that device is present: a
    checkpoint from a CUDA or MPS machine resumes on one without it (and the other way round), with
    that device's draws seeded rather than continued."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if torch.backends.mps.is_available():
        if state.get("mps") is not None:
            torch.mps.set_rng_state(state["mps"])
        else:
            log.info("the checkpoint has no MPS random state (written on another machine): MPS draws are seeded anew")
