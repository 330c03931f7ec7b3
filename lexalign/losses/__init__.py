"""Preference losses as pure torch functions (no trainer, no model)."""

from lexalign.losses.gdpo import (
    GDPOLoss,
    gdpo_loss,
    group_loss,
    kendall_tau,
    pair_accuracy,
    pairwise_loss,
    plackett_luce_log_prob,
    strict_pair_mask,
    top1_accuracy,
)

__all__ = [
    "GDPOLoss",
    "gdpo_loss",
    "group_loss",
    "kendall_tau",
    "pair_accuracy",
    "pairwise_loss",
    "plackett_luce_log_prob",
    "strict_pair_mask",
    "top1_accuracy",
]
