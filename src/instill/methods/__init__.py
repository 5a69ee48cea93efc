"""Mask methods. To add one: a module with a `@register("name")` MaskMethod, imported here."""

from instill.methods.config import MaskConfig, Targets

from . import continuous, hard_concrete, magnitude, top_k  # noqa: F401  (registration)
from .base import METHODS, MaskMethod, register

__all__ = ["METHODS", "MaskConfig", "MaskMethod", "Targets", "register"]
