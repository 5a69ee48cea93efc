"""The core: masks, subnetworks and transplants. It knows nothing of tasks or experiments."""

from instill.methods.config import MaskConfig

from .masked import MaskedModel, attach_masks
from .subnetwork import Subnetwork
from .transplant import apply_subnetwork, bake, fresh_init, transplant, unfreeze

__all__ = ["MaskConfig", "MaskedModel", "Subnetwork", "apply_subnetwork", "attach_masks", "bake",
           "fresh_init", "transplant", "unfreeze"]
