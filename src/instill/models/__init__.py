"""Model builders from small configs (no download): the architectures the experiments use."""

from .builders import MODELS, build_model, logits_of

__all__ = ["MODELS", "build_model", "logits_of"]
