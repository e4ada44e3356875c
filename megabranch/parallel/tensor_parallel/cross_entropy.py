"""The vocabulary-parallel label-smoothed loss: the output projection's logits stay split over the tensor-parallel
group; only per-token scalars are all-reduced (Megatron's vocab-parallel cross entropy, with label smoothing)."""

from __future__ import annotations

import torch
import torch.distributed as dist


class _VocabParallelLSLoss(torch.autograd.Function):
    """Label-smoothed NLL on vocabulary-sharded logits; fp32 math; saves only the local softmax shard.

    Per token, with lse = logsumexp over the FULL vocabulary V:
        nll = lse - x_t            smooth = -sum_j logp_j = V * lse - sum_j x_j
    The max (for stability), sum(exp), the target logit and sum(x) are combined across ranks with all-reduces.
    Backward needs no communication: d nll/dx_j = p_j - [j = t], d smooth/dx_j = V p_j - 1, and every rank
    computes the (replicated) loss, so each rank's shard gradient is complete.
    """

    @staticmethod
    def forward(ctx, logits, target, epsilon, ignore_index, group):
        x = logits.float()
        tp = 1 if group is None else dist.get_world_size(group)
        rank = 0 if group is None else dist.get_rank(group)
        n_local = x.shape[-1]
        vocab = n_local * tp
        start = rank * n_local
        m = x.max(dim=-1).values
        if group is not None:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        e = (x - m.unsqueeze(-1)).exp_()
        t_local = target - start
        own = (t_local >= 0) & (t_local < n_local)
        idx = t_local.masked_fill(~own, 0)
        t_logit = torch.where(own, x.gather(-1, idx.unsqueeze(-1)).squeeze(-1), torch.zeros((), device=x.device))
        sums = torch.stack([e.sum(-1), t_logit, x.sum(-1)])
        if group is not None:
            dist.all_reduce(sums, group=group)
        sum_exp, t_logit, sum_x = sums.unbind(0)
        lse = m + sum_exp.log()
        keep = target.ne(ignore_index)
        zero = torch.zeros((), device=x.device)
        nll_sum = torch.where(keep, lse - t_logit, zero).sum()
        smooth_sum = torch.where(keep, vocab * lse - sum_x, zero).sum()
        eps_i = epsilon / (vocab - 1)
        loss = (1.0 - epsilon - eps_i) * nll_sum + eps_i * smooth_sum
        e.div_(sum_exp.unsqueeze(-1))  # now the softmax over the full vocabulary, restricted to my shard
        ctx.save_for_backward(e, idx, own, keep)
        ctx.coef, ctx.vocab, ctx.dtype = (1.0 - epsilon - eps_i, eps_i), vocab, logits.dtype
        return loss, nll_sum

    @staticmethod
    def backward(ctx, g_loss, g_nll):
        p, idx, own, keep = ctx.saved_tensors
        c_nll, eps_i = ctx.coef
        a = g_loss * c_nll + g_nll  # coefficient of (p - onehot)
        b = g_loss * eps_i  # coefficient of (V p - 1)
        grad = p * (a + b * ctx.vocab) - b
        onehot = torch.zeros_like(grad).scatter_(-1, idx.unsqueeze(-1), own.unsqueeze(-1).to(grad.dtype))
        grad = (grad - a * onehot) * keep.unsqueeze(-1).to(grad.dtype)
        return grad.to(ctx.dtype), None, None, None, None


def vocab_parallel_label_smoothed_nll_loss(
    logits_shard: torch.Tensor, target: torch.Tensor, epsilon: float, ignore_index: int = 0, group=None
):
    """-> (loss_sum, nll_sum), equal to megabranch.model.label_smoothed_nll_loss on the gathered logits.

    logits_shard (..., V / tp) is this rank's contiguous block of the vocabulary (as VocabParallelOutput makes);
    target (...) holds full-vocabulary ids. Both results are replicated on every rank of `group`; gradients
    flow to the local shard only (complete, no communication in backward). group=None: one process.
    """
    return _VocabParallelLSLoss.apply(logits_shard, target, float(epsilon), ignore_index, group)
