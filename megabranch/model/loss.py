"""Label-smoothed cross-entropy, as fairseq's label_smoothed_cross_entropy computes it."""

import torch
import torch.nn.functional as F


def label_smoothed_nll_loss(logits: torch.Tensor, target: torch.Tensor, epsilon: float, ignore_index: int = 0):
    """-> (loss_sum, nll_sum) over non-ignored tokens, in nats, computed in float32.

    The smoothing mass epsilon is spread over the V-1 wrong classes: loss = (1-eps-eps_i)*nll + eps_i*sum(-logp),
    eps_i = eps / (V - 1), which makes the optimum put exactly 1 - eps on the target.
    """
    lprobs = F.log_softmax(logits.float(), dim=-1)
    target = target.unsqueeze(-1)
    nll = -lprobs.gather(-1, target).squeeze(-1)
    smooth = -lprobs.sum(-1)
    # padding zeroed rather than indexed away: a boolean index's size depends on the data, which makes a GPU wait
    # for the mask on every micro-batch
    keep = target.squeeze(-1).ne(ignore_index)
    nll_sum = torch.where(keep, nll, 0.0).sum()
    smooth_sum = torch.where(keep, smooth, 0.0).sum()
    eps_i = epsilon / (lprobs.size(-1) - 1)
    loss = (1.0 - epsilon - eps_i) * nll_sum + eps_i * smooth_sum
    return loss, nll_sum
