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
from lexalign.losses.reference_free import PairLoss, chosen_nll, cpo_loss, mean_logps, orpo_loss, simpo_loss

__all__ = [
    "GDPOLoss",
    "PairLoss",
    "chosen_nll",
    "cpo_loss",
    "gdpo_loss",
    "group_loss",
    "kendall_tau",
    "mean_logps",
    "orpo_loss",
    "pair_accuracy",
    "pairwise_loss",
    "plackett_luce_log_prob",
    "simpo_loss",
    "strict_pair_mask",
    "top1_accuracy",
]
