"""Model builders from small configs (no download): the architectures the experiments use."""

from .builders import MODELS, build_model, check_activation, check_heads, logits_of, set_activation
from .heads import TaskHeads

__all__ = ["MODELS", "TaskHeads", "build_model", "check_activation", "check_heads", "logits_of",
           "set_activation"]
