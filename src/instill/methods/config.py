"""MaskConfig: which weights get masks, with which method and hyper-parameters (it lives with
the methods it names, so the core depends on methods and not the other way round)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from instill.errors import ConfigError

Targets = str | list[str] | None


@dataclass
class MaskConfig:
    """How to attach masks to a model.

    `targets` / `exclude` select modules: a string is a regular expression matched against the
    whole module name; a list holds exact module names or dotted suffixes. `None` targets every
    linear/conv layer (including HF's GPT-2 `Conv1D`) except heads tied to an embedding.
    """

    method: str = "continuous_sparsification"
    targets: Targets = None
    exclude: Targets = None
    granularity: Literal["weight", "neuron"] = "weight"
    init: float = -0.1
    l0_lambda: float = 1e-7
    mask_bias: bool = False
    keep: float = 0.5
    scope: Literal["layer", "global"] = "layer"
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        from instill.methods.registry import METHODS  # filled when instill.methods is imported

        if self.method not in METHODS:
            raise ConfigError(
                f"unknown mask method {self.method!r}; choose one of {sorted(METHODS)}"
            )
        if self.granularity not in ("weight", "neuron"):
            raise ConfigError(
                f"granularity must be 'weight' or 'neuron', got {self.granularity!r}"
            )
        if self.scope not in ("layer", "global"):
            raise ConfigError(f"scope must be 'layer' or 'global', got {self.scope!r}")
        if not self.l0_lambda >= 0:
            raise ConfigError(f"l0_lambda must be >= 0, got {self.l0_lambda}")
        if not 0 < self.keep <= 1:
            raise ConfigError(f"keep must be in (0, 1], got {self.keep}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for field_name in ("targets", "exclude"):
            value = getattr(self, field_name)
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as err:
                    raise ConfigError(
                        f"{field_name} {value!r} is not a valid regular expression: {err}; "
                        "pass a list of module names to match names literally"
                    ) from None
            elif value is not None and not (
                isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
            ):
                raise ConfigError(
                    f"{field_name} must be a regex string, a list of module names, or None; "
                    f"got {value!r}"
                )
