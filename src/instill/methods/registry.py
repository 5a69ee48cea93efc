"""The registry of mask methods by name: `MaskConfig` checks names against it and
`attach_masks` builds from it; a method joins it with `@register("name")`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

M = TypeVar("M", bound=type)

METHODS: dict[str, type] = {}


def register(name: str) -> Callable[[M], M]:
    """Class decorator that makes a MaskMethod available as `MaskConfig(method=name)`."""

    def add(cls: M) -> M:
        METHODS[name] = cls
        cls.name = name
        return cls

    return add


__all__ = ["METHODS", "register"]
