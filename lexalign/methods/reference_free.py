r"""ORPO, SimPO and CPO: preference losses with no reference model, as pure torch functions.

Each works on the policy's log-probabilities of a batch of B pairs (chosen
:math:`y_w`, rejected :math:`y_l`), summed over each response's tokens
(:math:`\log\pi(y|x)`) or averaged over them (:math:`\overline{\log\pi}(y|x) =
\log\pi(y|x) / |y|`, length-normalised), and on the chosen answers' negative
log-likelihood per token,

.. math:: \mathrm{NLL} = -\frac{\sum_b \log\pi(y_{w,b}|x_b)}{\sum_b |y_{w,b}|},

the SFT loss on the chosen answers (every chosen token of the batch weighs the
same, as TRL's cross-entropy does). No function needs a reference model's
log-probabilities: these methods hold one model in memory and need no
reference step.

* **SimPO** (Meng et al., 2024): a margin :math:`\gamma` on length-normalised rewards,

  .. math:: L = -\log\sigma\bigl(\beta\,(\overline{\log\pi}(y_w|x) - \overline{\log\pi}(y_l|x)) - \gamma\bigr);

* **ORPO** (Hong et al., 2024): the SFT loss plus an odds-ratio term, with
  :math:`\mathrm{odds}(y|x) = p / (1 - p)` for :math:`p = \exp\overline{\log\pi}(y|x)`,

  .. math:: L = \mathrm{NLL} - \lambda\,\log\sigma\Bigl(\log\frac{\mathrm{odds}(y_w|x)}{\mathrm{odds}(y_l|x)}\Bigr);

* **CPO** (Xu et al., 2024): DPO's sigmoid loss without the reference, plus the SFT loss,

  .. math:: L = -\log\sigma\bigl(\beta\,(\log\pi(y_w|x) - \log\pi(y_l|x))\bigr) + \alpha\,\mathrm{NLL}.

Each loss is the mean over pairs of the preference term, plus the NLL term.
These are the losses of TRL's experimental `CPOTrainer` (loss_type sigmoid
and simpo) and `ORPOTrainer`, written here because TRL 1.x keeps those
trainers in `trl.experimental`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class PairLoss(NamedTuple):
    """A batch loss, its parts and the implicit rewards the trainer logs."""

    loss: torch.Tensor
    """Scalar: mean over pairs of the preference term, plus the weighted NLL term."""
    preference: torch.Tensor
    """[B]: the preference term of each pair."""
    nll: torch.Tensor
    """Scalar: the chosen answers' NLL per token (0 for SimPO, which has none)."""
    chosen_rewards: torch.Tensor
    """[B]: the chosen answers' implicit reward (for metrics)."""
    rejected_rewards: torch.Tensor
    """[B]: the rejected answers' implicit reward (for metrics)."""


def _check(chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(f"chosen and rejected must both have shape [B], got {tuple(chosen.shape)} and "
                         f"{tuple(rejected.shape)}")


def mean_logps(summed: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[B]: log-probs averaged over each response's tokens (an empty response counts as one token)."""
    return summed / lengths.to(summed.dtype).clamp(min=1)


def chosen_nll(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Scalar: the NLL per token over every chosen token of the batch (summed log-probs and token counts)."""
    return -chosen_logps.sum() / chosen_lengths.to(chosen_logps.dtype).sum().clamp(min=1)


def simpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float, gamma: float) -> PairLoss:
    """SimPO from length-normalised log-probs [B]: mean of -log σ(β·(mean_w - mean_l) - γ)."""
    _check(chosen_mean, rejected_mean)
    preference = -F.logsigmoid(beta * (chosen_mean - rejected_mean) - gamma)
    zero = preference.new_zeros(())
    return PairLoss(preference.mean(), preference, zero, beta * chosen_mean.detach(), beta * rejected_mean.detach())


def log_odds(mean_logps_: torch.Tensor) -> torch.Tensor:
    """[B]: log(p / (1 - p)) for p = exp(mean log-prob); p is kept below 1 so a certain answer stays finite."""
    x = mean_logps_.clamp(max=-1e-6)
    return x - torch.log1p(-torch.exp(x))


def orpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, nll: torch.Tensor, lam: float) -> PairLoss:
    """ORPO: NLL - λ·mean log σ(log odds(y_w) - log odds(y_l)), from length-normalised log-probs [B]."""
    _check(chosen_mean, rejected_mean)
    preference = -lam * F.logsigmoid(log_odds(chosen_mean) - log_odds(rejected_mean))
    return PairLoss(nll + preference.mean(), preference, nll, lam * chosen_mean.detach(),
                    lam * rejected_mean.detach())


def cpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, nll: torch.Tensor, beta: float,
             alpha: float) -> PairLoss:
    """CPO: mean of -log σ(β·(log π(y_w) - log π(y_l))) + α·NLL, from summed log-probs [B]."""
    _check(chosen_logps, rejected_logps)
    preference = -F.logsigmoid(beta * (chosen_logps - rejected_logps))
    return PairLoss(preference.mean() + alpha * nll, preference, nll, beta * chosen_logps.detach(),
                    beta * rejected_logps.detach())


# --- the trainer's view: each method's loss from a batch's summed log-probs ---------------------------


class PairLogps(NamedTuple):
    """The policy's summed log-probs of a batch's chosen and rejected responses [B], and their token counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Length-normalised log-probs of the chosen and the rejected responses [B]."""
        return mean_logps(self.chosen, self.chosen_lengths), mean_logps(self.rejected, self.rejected_lengths)

    def nll(self) -> torch.Tensor:
        return chosen_nll(self.chosen, self.chosen_lengths)


# Each method's loss as its registry entry names it (lexalign.methods: Method.loss): (pairs, β, the method's own
# keys by name) → (its PairLoss, the metrics it logs beside DPO's, each [B] or a scalar). The trainer
# (lexalign.train.reference_free_trainer) is the same for all of them.


def simpo(pairs: PairLogps, beta: float, *, gamma: float) -> tuple[PairLoss, dict[str, torch.Tensor]]:
    return simpo_loss(*pairs.means(), beta, gamma), {}


def orpo(pairs: PairLogps, beta: float, *, orpo_lambda: float) -> tuple[PairLoss, dict[str, torch.Tensor]]:
    chosen, rejected = pairs.means()
    result = orpo_loss(chosen, rejected, pairs.nll(), orpo_lambda)
    return result, {"nll_loss": result.nll, "log_odds_ratio": log_odds(chosen) - log_odds(rejected)}


def cpo(pairs: PairLogps, beta: float, *, cpo_alpha: float) -> tuple[PairLoss, dict[str, torch.Tensor]]:
    result = cpo_loss(pairs.chosen, pairs.rejected, pairs.nll(), beta, cpo_alpha)
    return result, {"nll_loss": result.nll}
