"""Fused kernels (Triton) with their plain-PyTorch references; installed as nrrdd.kernels.

Public API::

    masked_adam_(x, grad, mask, exp_avg, exp_avg_sq, *, step, lr, beta1=0.5, beta2=0.9,
                 eps=1e-8, lo=None, hi=None, backend="auto")          # in place
    MaskedAdam([x], mask=M, lr=..., betas=(0.5, 0.9), eps=1e-8, bounds=(lo, hi), backend="auto")
    dbr_distances(logits, y_org, y_aug, temperature=1.0, backend="auto") -> (d_org, d_aug)
    dbr_loss(logits, y_org, y_aug, lam, d_org_t, d_aug_t, *, alpha=1.0, temperature=1.0,
             distance="l1", reduction="mean", backend="auto")
    DBRLoss(alpha=1.0, temperature=1.0, distance="l1", reduction="mean", backend="auto")

``backend``: "auto" (Triton for CUDA tensors, PyTorch otherwise), "triton" or "torch";
the ``NRRDD_BACKEND`` environment variable overrides "auto" (read at call time).
References: ``masked_adam_reference_``, ``dbr_distances_reference``, ``dbr_loss_reference``.
"""

from ._backend import resolve_backend, triton_available
from .dbr import DBRLoss, dbr_distances, dbr_distances_reference, dbr_loss, dbr_loss_reference
from .masked_adam import MaskedAdam, masked_adam_, masked_adam_reference_

__all__ = [
    "masked_adam_",
    "MaskedAdam",
    "dbr_distances",
    "dbr_loss",
    "DBRLoss",
    "masked_adam_reference_",
    "dbr_distances_reference",
    "dbr_loss_reference",
    "resolve_backend",
    "triton_available",
]
