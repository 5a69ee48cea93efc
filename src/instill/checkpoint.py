"""Model weights as safetensors: save a model's state, load it back into the same architecture."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from instill.errors import FileFormatError
from instill.storage import load_tensors, save_tensors


def save_model(path: str | Path, model: nn.Module, metadata: dict[str, str] | None = None) -> None:
    """Write every parameter and persistent buffer once (tied tensors are stored once)."""
    seen, tensors = set(), {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape)
        if key not in seen:
            seen.add(key)
            tensors[name] = tensor
    save_tensors(path, tensors, metadata)


def load_model(path: str | Path, model: nn.Module) -> dict[str, str]:
    """Load weights saved by `save_model` into `model`; a file for another architecture is a
    clear error naming the offending tensors. Returns the file's metadata."""
    tensors, metadata = load_tensors(path)
    expected = model.state_dict()
    unknown = sorted(set(tensors) - set(expected))
    wrong = sorted(n for n, t in tensors.items() if n in expected and t.shape != expected[n].shape)
    tied = {n for n, t in expected.items() if any(
        t.data_ptr() == expected[m].data_ptr() for m in tensors if m in expected and m != n)}
    missing = sorted(set(expected) - set(tensors) - tied)
    if unknown or wrong or missing:
        parts = [f"{label}: {', '.join(names[:4])}" for label, names in
                 (("unexpected", unknown), ("other shapes", wrong), ("missing", missing)) if names]
        raise FileFormatError(f"{path} holds weights for another architecture than "
                              f"{type(model).__name__} ({'; '.join(parts)}); build the model "
                              "with the config the checkpoint was saved with")
    model.load_state_dict(tensors, strict=False)
    return metadata
