"""Float64 NumPy formulas the loss tests compare with (written from the papers, not from the library)."""

from __future__ import annotations

import numpy as np


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean over examples of -log softmax(logits)[label]."""
    log_p = log_softmax(logits)
    return -np.take_along_axis(log_p, np.asarray(labels)[..., None], -1).mean()


def hinton_kd(student: np.ndarray, teacher: np.ndarray, temperature: float) -> float:
    """T² KL(p_T(teacher) || p_T(student)), mean over examples (Hinton et al. 2015)."""
    log_t, log_s = log_softmax(teacher / temperature), log_softmax(student / temperature)
    return (np.exp(log_t) * (log_t - log_s)).sum(-1).mean() * temperature**2
