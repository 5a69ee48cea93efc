"""Subnetwork: a value object mapping parameter names to boolean masks, with set operations."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from instill.errors import FileFormatError, InstillError, SubnetworkMismatchError

FORMAT = "instill.subnetwork"
VERSION = "1"


@dataclass(frozen=True, eq=False)
class Subnetwork:
    """Boolean masks (True = kept) over some of a model's parameters.

    `fingerprint` holds the names and shapes of every parameter of the model the masks came
    from, so a subnetwork is never applied to another architecture by mistake.
    """

    masks: dict[str, Tensor]
    fingerprint: dict[str, tuple[int, ...]]
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, mask in self.masks.items():
            if mask.dtype != torch.bool:
                raise TypeError(f"mask {name!r} must be a bool tensor, got {mask.dtype}")
            if name in self.fingerprint and tuple(mask.shape) != tuple(self.fingerprint[name]):
                raise SubnetworkMismatchError(
                    f"mask {name!r} has shape {tuple(mask.shape)} but the model's parameter has "
                    f"{tuple(self.fingerprint[name])}"
                )

    # -- sizes ---------------------------------------------------------------------------
    def kept(self) -> int:
        """Number of kept entries over all masks."""
        return sum(int(m.sum()) for m in self.masks.values())

    def total(self) -> int:
        """Number of entries the masks cover."""
        return sum(m.numel() for m in self.masks.values())

    def density(self) -> float:
        """Kept fraction of the targeted entries."""
        return self.kept() / max(self.total(), 1)

    def per_layer_density(self) -> dict[str, float]:
        """Kept fraction of each masked parameter."""
        return {n: m.float().mean().item() for n, m in self.masks.items()}

    # -- set operations --------------------------------------------------------------------
    def _combine(self, other: Subnetwork, op: Callable[[Tensor, Tensor], Tensor]) -> Subnetwork:
        self._check_same_support(other)
        return self._with({n: op(m, other.masks[n]) for n, m in self.masks.items()})

    def _check_same_support(self, other: Subnetwork) -> None:
        if not isinstance(other, Subnetwork):
            raise TypeError(f"expected a Subnetwork, got {type(other).__name__}")
        if self.masks.keys() != other.masks.keys():
            diff = sorted(self.masks.keys() ^ other.masks.keys())
            raise SubnetworkMismatchError(
                f"subnetworks cover different parameters ({', '.join(diff[:5])}); "
                "set operations need masks over the same targeted parameters"
            )

    def _with(self, masks: dict[str, Tensor]) -> Subnetwork:
        return Subnetwork(masks, self.fingerprint, dict(self.metadata))

    def __or__(self, other: Subnetwork) -> Subnetwork:
        return self._combine(other, torch.logical_or)

    def __and__(self, other: Subnetwork) -> Subnetwork:
        return self._combine(other, torch.logical_and)

    def __sub__(self, other: Subnetwork) -> Subnetwork:
        return self._combine(other, lambda a, b: a & ~b)

    def __invert__(self) -> Subnetwork:
        return self._with({n: ~m for n, m in self.masks.items()})

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Subnetwork) and self.masks.keys() == other.masks.keys()
                and all(torch.equal(m, other.masks[n]) for n, m in self.masks.items()))

    __hash__ = None  # type: ignore[assignment]

    def iou(self, other: Subnetwork) -> float:
        """Intersection over union of the kept entries (1.0 for two empty subnetworks)."""
        union = (self | other).kept()
        return (self & other).kept() / union if union else 1.0

    # -- random controls -------------------------------------------------------------------
    def sample_like(self, generator: torch.Generator | None = None) -> Subnetwork:
        """A random subnetwork keeping the same number of entries in every parameter.

        Tensors are drawn in sorted name order, so the result does not depend on dict order
        (a subnetwork read from a file may list its names in another order)."""
        drawn = {n: _random_subset(torch.ones_like(self.masks[n]), int(self.masks[n].sum()),
                                   generator) for n in sorted(self.masks)}
        return self._with({n: drawn[n] for n in self.masks})

    def sample_complement(self, generator: torch.Generator | None = None) -> Subnetwork:
        """Like `sample_like`, but drawn only from entries outside this subnetwork."""
        masks = {}
        for name in sorted(self.masks):  # draw in name order: a loaded file lists names sorted
            mask = self.masks[name]
            k, free = int(mask.sum()), int((~mask).sum())
            if free < k:
                raise InstillError(
                    f"cannot sample a complement for {name!r}: the subnetwork keeps {k} of "
                    f"{mask.numel()} entries and only {free} lie outside it; use sample_like() "
                    "or a sparser subnetwork"
                )
            masks[name] = _random_subset(~mask, k, generator)
        return self._with({n: masks[n] for n in self.masks})

    # -- models ----------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Raise if the model lacks a masked parameter or has it with another shape."""
        params = dict(model.named_parameters())
        for name, mask in self.masks.items():
            if name not in params:
                raise SubnetworkMismatchError(
                    f"the subnetwork masks {name!r}, which {type(model).__name__} does not have; "
                    "it was found in another architecture (masks cover: "
                    f"{', '.join(list(self.masks)[:3])}, ...)"
                )
            if tuple(params[name].shape) != tuple(mask.shape):
                raise SubnetworkMismatchError(
                    f"the subnetwork's mask for {name!r} has shape {tuple(mask.shape)}, the "
                    f"model's parameter has {tuple(params[name].shape)}: the subnetwork belongs "
                    "to a model of another size"
                )

    # -- files -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write masks (safetensors, bool) and fingerprint/metadata (JSON in the header)."""
        from instill.storage import save_tensors

        meta = {"format": FORMAT, "version": VERSION,
                "fingerprint": json.dumps({k: list(v) for k, v in self.fingerprint.items()}),
                "metadata": json.dumps(self.metadata, sort_keys=True)}
        save_tensors(path, {n: m.contiguous() for n, m in self.masks.items()}, meta)

    @classmethod
    def load(cls, path: str | Path) -> Subnetwork:
        """Read a file written by `save`; never unpickles."""
        from instill.storage import load_tensors

        tensors, meta = load_tensors(path)
        if meta.get("format") != FORMAT:
            raise FileFormatError(f"{path} is a safetensors file but not an instill subnetwork "
                                  "(no 'format: instill.subnetwork' in its header)")
        if meta.get("version") != VERSION:
            raise FileFormatError(f"{path} is subnetwork format version {meta.get('version')}; "
                                  f"this instill reads version {VERSION}")
        try:
            prints = {k: tuple(v) for k, v in json.loads(meta["fingerprint"]).items()}
            metadata = json.loads(meta.get("metadata", "{}"))
        except (KeyError, ValueError, TypeError) as err:
            raise FileFormatError(f"{path}: damaged subnetwork header ({err})") from None
        return cls({n: t.bool() for n, t in tensors.items()}, prints, metadata)


def _random_subset(pool: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """A bool tensor with `k` True entries drawn uniformly from the True entries of `pool`."""
    candidates = pool.flatten().nonzero().squeeze(1)
    order = torch.randperm(candidates.numel(), generator=generator)
    out = torch.zeros(pool.numel(), dtype=torch.bool)
    out[candidates[order[:k]]] = True
    return out.view(pool.shape)
