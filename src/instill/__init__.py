"""instill: find the subnetwork a trained model uses for a subtask, and instill it in a new one."""

from instill.core import (
    MaskConfig,
    MaskedModel,
    Subnetwork,
    apply_subnetwork,
    attach_masks,
    bake,
    fresh_init,
    transplant,
    unfreeze,
)
from instill.errors import InstillError

__version__ = "0.1.0"

__all__ = ["InstillError", "MaskConfig", "MaskedModel", "Subnetwork", "apply_subnetwork",
           "attach_masks", "bake", "fresh_init", "transplant", "unfreeze"]
