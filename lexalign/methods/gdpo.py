r"""GDPO: listwise preference optimization over K ranked responses.

Every function here works on a ``[B, K]`` tensor of implicit rewards, one row per
prompt, with the columns in ranked order (column 0 is the best response):

.. math::

    r_i = \beta \,\bigl(\log \pi_\theta(y_i \mid x) - \log \pi_\mathrm{ref}(y_i \mid x)\bigr),
    \qquad y_1 \succ y_2 \succ \dots \succ y_K,

with log-probabilities summed over the response tokens. An optional ``[B, K]``
tensor of ``scores`` (non-increasing along each row) marks ties: two responses
with equal scores are tied. Without scores every pair is strictly ranked.

The loss has two terms:

* **pairwise** (a DPO term for every strictly ranked pair)

  .. math:: L_\mathrm{pair} = \frac{1}{|P|} \sum_{(i, j) \in P} -\log \sigma(r_i - r_j),
            \qquad P = \{(i, j) : i < j,\ s_i > s_j\};

  tied pairs are left out of :math:`P`. A prompt without any strictly ranked
  pair (all responses tied) has :math:`L_\mathrm{pair} = 0`;

* **group** (the Plackett–Luce negative log-likelihood of the whole ranking,
  normalised per choice)

  .. math:: L_\mathrm{group} = \frac{1}{K-1} \sum_{k=1}^{K-1}
            \Bigl[\log \sum_{j=k}^{K} e^{r_j} - r_k\Bigr]
            = -\frac{1}{K-1} \log P_\mathrm{PL}(y_1 \succ \dots \succ y_K);

  ties are broken stably: tied responses keep the order they were given in, so
  a tie between columns i < j is treated as :math:`y_i \succ y_j`. Each
  log-sum-exp is computed over differences :math:`r_j - r_k`, which is stable for
  any reward scale and makes the term exactly invariant to adding a constant to
  every reward of a prompt.

and combines them per prompt, then averages over prompts:

.. math:: L_\mathrm{GDPO} = \frac{1}{B} \sum_b \bigl[(1 - w)\, L_\mathrm{pair} + w\, L_\mathrm{group}\bigr],
          \qquad w \in [0, 1].

At K = 2 both terms equal the DPO sigmoid loss :math:`-\log\sigma(r_1 - r_2)`, so
GDPO reduces to DPO for every w.

Ranking metrics (``top1_accuracy``, ``pair_accuracy``, ``kendall_tau``) return one
value per prompt; a value that is undefined for a prompt (no strictly ranked
pair) is NaN, so reduce with :func:`torch.nanmean`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class GDPOLoss(NamedTuple):
    """The batch loss and its per-prompt parts."""

    loss: torch.Tensor
    """Scalar: mean over prompts of (1 - w)·L_pair + w·L_group."""
    pairwise: torch.Tensor
    """[B]: L_pair of each prompt."""
    group: torch.Tensor
    """[B]: L_group of each prompt."""


def _check(rewards: torch.Tensor, scores: torch.Tensor | None) -> None:
    if rewards.dim() != 2 or rewards.size(1) < 2:
        raise ValueError(f"rewards must have shape [B, K] with K >= 2, got {tuple(rewards.shape)}")
    if scores is not None and scores.shape != rewards.shape:
        raise ValueError(f"scores has shape {tuple(scores.shape)}, rewards {tuple(rewards.shape)}")


def _given_scores(rewards: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
    """The scores, or (without them) the ranks K-1, …, 0: every pair strictly ranked by column order."""
    if scores is not None:
        return scores.to(device=rewards.device, dtype=torch.float32)
    k = rewards.size(1)
    ranks = torch.arange(k - 1, -1, -1, device=rewards.device, dtype=torch.float32)
    return ranks.expand(rewards.size(0), k)


def strict_pair_mask(rewards: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
    """[B, K, K] bool: entry (b, i, j) is true when i < j and response i is strictly better than j."""
    _check(rewards, scores)
    s = _given_scores(rewards, scores)
    k = rewards.size(1)
    upper = torch.ones(k, k, dtype=torch.bool, device=rewards.device).triu(diagonal=1)
    return upper & (s[:, :, None] > s[:, None, :])


def pairwise_loss(rewards: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
    r"""[B]: :math:`L_\mathrm{pair}`, the mean of :math:`-\log\sigma(r_i - r_j)` over strictly ranked pairs.

    Tied pairs (equal scores) are left out; a prompt whose responses are all tied gets 0.
    """
    mask = strict_pair_mask(rewards, scores)
    margins = rewards[:, :, None] - rewards[:, None, :]  # (b, i, j) = r_i - r_j
    per_pair = -F.logsigmoid(margins)
    total = torch.where(mask, per_pair, torch.zeros_like(per_pair)).sum(dim=(1, 2))
    return total / mask.sum(dim=(1, 2)).clamp(min=1).to(total.dtype)


def _suffix_logsumexp_minus_self(rewards: torch.Tensor) -> torch.Tensor:
    r"""[B, K]: :math:`\log\sum_{j \ge k} e^{r_j} - r_k = \log\sum_{j \ge k} e^{r_j - r_k}` for each k."""
    k = rewards.size(1)
    diffs = rewards[:, None, :] - rewards[:, :, None]  # (b, k, j) = r_j - r_k
    before = torch.ones(k, k, dtype=torch.bool, device=rewards.device).tril(diagonal=-1)  # j < k
    return torch.logsumexp(diffs.masked_fill(before, float("-inf")), dim=-1)


def plackett_luce_log_prob(rewards: torch.Tensor) -> torch.Tensor:
    r"""[B]: :math:`\log P_\mathrm{PL}` of the column order, :math:`\sum_k [r_k - \log\sum_{j \ge k} e^{r_j}]`.

    Under Plackett–Luce the best response is drawn first with probability
    softmax(r), the next from the remaining ones, and so on.
    """
    _check(rewards, None)
    return -_suffix_logsumexp_minus_self(rewards)[:, :-1].sum(dim=1)


def group_loss(rewards: torch.Tensor) -> torch.Tensor:
    r"""[B]: :math:`L_\mathrm{group} = -\log P_\mathrm{PL}(y_1 \succ \dots \succ y_K) / (K - 1)`.

    Ties are broken stably by the caller's column order (tied responses stay in the
    order given), so no scores are needed.
    """
    _check(rewards, None)
    return _suffix_logsumexp_minus_self(rewards)[:, :-1].mean(dim=1)


def gdpo_loss(rewards: torch.Tensor, weight: float, scores: torch.Tensor | None = None) -> GDPOLoss:
    """(1 - w)·L_pair + w·L_group per prompt, averaged over prompts. See the module docstring."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    pair = pairwise_loss(rewards, scores)
    group = group_loss(rewards)
    loss = ((1.0 - weight) * pair + weight * group).mean()
    return GDPOLoss(loss=loss, pairwise=pair, group=group)


# --- ranking metrics --------------------------------------------------------------------------


def top1_accuracy(rewards: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
    """[B] of 0/1: the highest reward is unique and belongs to a best-ranked response.

    Strict: a tie for the highest reward counts as wrong. When several responses
    share the best score, any of them holding the unique highest reward is right.
    """
    _check(rewards, scores)
    s = _given_scores(rewards, scores)
    best = rewards.max(dim=1, keepdim=True).values
    unique = (rewards == best).sum(dim=1) == 1
    top_tier = s == s[:, :1]
    return (unique & ((rewards == best) & top_tier).any(dim=1)).float()


def pair_accuracy(rewards: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
    """[B]: share of strictly ranked pairs (i better than j) with r_i > r_j; NaN without any such pair."""
    mask = strict_pair_mask(rewards, scores)
    correct = (rewards[:, :, None] > rewards[:, None, :]) & mask
    pairs = mask.sum(dim=(1, 2)).float()
    return torch.where(pairs > 0, correct.sum(dim=(1, 2)).float() / pairs.clamp(min=1), torch.nan)


def kendall_tau(rewards: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
    r"""[B]: Kendall's :math:`\tau_b` between the reward order and the given ranking.

    .. math:: \tau_b = \frac{\sum_{i<j} \operatorname{sgn}(r_i - r_j)\,\operatorname{sgn}(s_i - s_j)}
                           {\sqrt{n_r\, n_s}},

    with :math:`n_r` and :math:`n_s` the pairs not tied in rewards and in scores.
    Without ties this is :math:`(C - D) / \binom{K}{2}`: 1 when the rewards order the
    responses exactly as ranked, -1 when exactly reversed. NaN when either side is
    all ties.
    """
    _check(rewards, scores)
    s = _given_scores(rewards, scores)
    k = rewards.size(1)
    upper = torch.ones(k, k, dtype=torch.bool, device=rewards.device).triu(diagonal=1)
    sign_r = torch.sign(rewards[:, :, None] - rewards[:, None, :]).float() * upper
    sign_s = torch.sign(s[:, :, None] - s[:, None, :]) * upper
    numerator = (sign_r * sign_s).sum(dim=(1, 2))
    n_r = sign_r.abs().sum(dim=(1, 2))
    n_s = sign_s.abs().sum(dim=(1, 2))
    denominator = torch.sqrt(n_r * n_s)
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1e-12), torch.nan)


def gdpo(rewards: torch.Tensor, scores: torch.Tensor | None = None, *, group_delay_weight: float = 0.5
         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GDPO as its registry entry names it (lexalign.methods: Method.loss), for the trainer of ranked groups
    (lexalign.train.ranked_trainer): (rewards [B, K], scores [B, K], the method's own keys by name) → (the batch
    loss, the metrics it logs beside DPO's, each [B] or a scalar)."""
    result = gdpo_loss(rewards, group_delay_weight, scores)
    return result.loss, {"loss/pairwise": result.pairwise, "loss/group": result.group,
                         "rewards/top1_accuracy": top1_accuracy(rewards, scores)}
