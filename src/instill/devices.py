"""Process-wide settings for the device a run computes on: determinism and TF32.

On a CPU nothing changes. On CUDA a run asks torch for deterministic kernels (cuBLAS with a
fixed workspace, cuDNN without autotuning, `use_deterministic_algorithms` in warn-only mode,
so an op without a deterministic kernel warns instead of stopping the run) and leaves TF32 off
unless the config turns it on: TF32 matmuls round to 10 mantissa bits, so results then differ
from full float32 like another seed's (docs/reproducibility.md).
"""

from __future__ import annotations

import os

import torch


def configure(device: torch.device, tf32: bool = False) -> None:
    """Apply the run's device settings in this process (every worker calls it)."""
    if device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def settings() -> dict[str, object]:
    """What this process runs with, for the run's record."""
    out: dict[str, object] = {"deterministic": torch.are_deterministic_algorithms_enabled()}
    if torch.cuda.is_available():
        out |= {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                "tf32_cudnn": torch.backends.cudnn.allow_tf32,
                "cublas_workspace": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}
    return out


__all__ = ["configure", "settings"]
