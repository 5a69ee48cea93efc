"""Analyses over subnetworks of one model, task-agnostic: overlap, chance levels,
cross-ablation, unused weights, compression baselines and sparse weight files."""

from .compression import (
    compression_curve,
    file_sizes,
    load_sparse,
    magnitude_mask,
    pruned,
    save_sparse,
    sparse_state_dict,
    torch_prune_reference,
)
from .overlap import chance_overlap, check_same_model, cross_ablation, frivolous, overlap_matrix

__all__ = ["chance_overlap", "check_same_model", "compression_curve", "cross_ablation",
           "file_sizes", "frivolous", "load_sparse", "magnitude_mask", "overlap_matrix",
           "pruned", "save_sparse", "sparse_state_dict", "torch_prune_reference"]
