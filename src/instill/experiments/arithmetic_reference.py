"""The reference implementation's published figures (read from its per-depth plots; see
shared/notes/method.md, "The reference implementation"), for a run to be compared with.

Its `sampled` and `complement` controls are what this toolkit calls `sampled-inverse` and
`complement-inverse`; the names below are ours.
"""

from __future__ import annotations

#: The task the figures are for; a run is compared only when it sets the same.
TASK = {"base": "a + a*b", "subtask": "a*b", "target": "a^2 + a*b", "modulus": 7,
        "numbers": 1000}

#: Test accuracy at n disambiguation samples, depth 2 (one run per depth).
ACCURACY = {
    2: {"subnet": {250: 0.62, 640: 0.83, 1000: 0.93, 1600: 0.99},
        "sampled-inverse": {250: 0.42, 640: 0.47, 1000: 0.59, 1600: 0.68},
        "complement-inverse": {250: 0.43, 640: 0.52, 1000: 0.59, 1600: 0.71},
        "full": {250: 0.62, 640: 0.79, 1000: 0.89, 1600: 0.97}},
}

#: Subtask Induction minus a control, AUC over log(1 + n) for n from 0 to 6400, by depth.
AUC_GAP = {
    "sampled-inverse": {2: 0.05, 4: 0.08, 6: 0.12, 8: 0.13, 10: 0.15, 12: 0.14},
    "full": {2: -0.03, 4: -0.02, 6: 0.01, 8: 0.00, 10: 0.03, 12: -0.01},
}


def comparable(cfg) -> bool:
    """Whether a run's task is the one the reference's figures are for."""
    return all(getattr(cfg, key) == value for key, value in TASK.items())


__all__ = ["ACCURACY", "AUC_GAP", "TASK", "comparable"]
