"""ZeRO stage 1: AdamW whose state is partitioned over the data-parallel group.

All parameters handed in are viewed as one flat vector of N elements (in the order given). Data-parallel rank r
owns the contiguous slice [r * S, min((r + 1) * S, N)), S = ceil(N / dp), and keeps AdamW's exp_avg and
exp_avg_sq (fp32) for that slice only, plus an fp32 master copy of it when any parameter is not fp32. A step:

  1. (the caller has already sum-reduced the gradients over the group, e.g. with GradReducer, and clipped them)
  2. every rank updates its own slice with exactly torch.optim.AdamW's arithmetic;
  3. the updated slices are all-gathered (in the parameters' dtype) and written into every rank's parameters.

So optimizer memory per rank drops from 8 (or 12 with masters) bytes/param to 1/dp of that, and the result is
torch.optim.AdamW's on the full parameters. `param_groups[0]["lr"]` is read at each step (set it like for any
torch optimizer). state_dict() holds this rank's shard; gather_full_state()/load_full_state() move the state
between data-parallel sizes. Parameters whose .grad is None are left unchanged for that step (their moments
too), but the shared step counter still advances (torch.optim.AdamW keeps one per parameter).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..errors import UserError


def flat_range(numel: int, dp_size: int, dp_rank: int) -> tuple[int, int]:
    """The slice [start, end) of the flat vector of `numel` elements that data-parallel rank dp_rank owns."""
    size = -(-numel // dp_size)
    start = min(dp_rank * size, numel)
    return start, min(start + size, numel)


class ShardedAdamW(torch.optim.Optimizer):
    def __init__(
        self, params, dp_group=None, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2
    ):
        seen, plist = set(), []
        for p in params:
            if isinstance(p, dict):
                raise ValueError("ShardedAdamW takes one parameter group (a list of tensors)")
            if id(p) not in seen:
                seen.add(id(p))
                plist.append(p)
        if not plist:
            raise ValueError("ShardedAdamW got an empty parameter list")
        super().__init__(plist, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.dp_group = dp_group
        self.dp_size = 1 if dp_group is None else dist.get_world_size(dp_group)
        self.dp_rank = 0 if dp_group is None else dist.get_rank(dp_group)
        # the parameters in the order of the flat vector (what shard_layout's offsets count in)
        self.flat_params = self.param_groups[0]["params"]
        self.device = self.flat_params[0].device
        if any(p.device != self.device for p in self.flat_params):
            raise ValueError("ShardedAdamW needs every parameter on one device")
        self.numel = sum(p.numel() for p in self.flat_params)
        self.shard_size = -(-self.numel // self.dp_size)
        self.start, self.end = flat_range(self.numel, self.dp_size, self.dp_rank)
        # (param, offset in param, offset in my shard, length) for every param overlapping my slice
        self._pieces, off = [], 0
        for p in self.flat_params:
            lo, hi = max(off, self.start), min(off + p.numel(), self.end)
            if lo < hi:
                self._pieces.append((p, lo - off, lo - self.start, hi - lo))
            off += p.numel()
        dtypes = {p.dtype for p in self.flat_params}
        self.gather_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        n = self.end - self.start
        f32 = dict(dtype=torch.float32, device=self.device)
        self.exp_avg = torch.zeros(n, **f32)
        self.exp_avg_sq = torch.zeros(n, **f32)
        self.master = self._read_params() if any(p.dtype != torch.float32 for p in self.flat_params) else None
        self.step_count = 0

    # --- my slice ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _read_params(self) -> torch.Tensor:
        out = torch.empty(self.end - self.start, dtype=torch.float32, device=self.device)
        for p, po, so, n in self._pieces:
            out[so : so + n] = p.detach().reshape(-1)[po : po + n]
        return out

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        self.step_count += 1
        work = self.master if self.master is not None else self._read_params()
        grad = torch.zeros_like(work)
        skipped = []
        for p, po, so, n in self._pieces:
            if p.grad is None:
                skipped.append((so, n))
            else:
                grad[so : so + n] = p.grad.reshape(-1)[po : po + n]
        keep = [
            (so, n, work[so : so + n].clone(), self.exp_avg[so : so + n].clone(), self.exp_avg_sq[so : so + n].clone())
            for so, n in skipped
        ]
        # torch.optim.AdamW's (single-tensor) arithmetic, on the flat slice
        work.mul_(1 - lr * wd)
        self.exp_avg.lerp_(grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**self.step_count
        bias_correction2 = 1 - beta2**self.step_count
        denom = (self.exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
        work.addcdiv_(self.exp_avg, denom, value=-(lr / bias_correction1))
        for so, n, w, m, v in keep:
            work[so : so + n], self.exp_avg[so : so + n], self.exp_avg_sq[so : so + n] = w, m, v
        self._broadcast_params(work)
        return loss

    @torch.no_grad()
    def _broadcast_params(self, work: torch.Tensor) -> None:
        """All-gather every rank's updated slice and write the full flat vector into the parameters."""
        mine = torch.zeros(self.shard_size, dtype=self.gather_dtype, device=self.device)
        mine[: work.numel()] = work
        if self.dp_size == 1:
            full = mine
        else:
            full = torch.empty(self.shard_size * self.dp_size, dtype=self.gather_dtype, device=self.device)
            dist.all_gather_into_tensor(full, mine, group=self.dp_group)
        off = 0
        for p in self.flat_params:
            p.detach().view(-1).copy_(full[off : off + p.numel()])
            off += p.numel()

    # --- checkpoints ---------------------------------------------------------------------------------------

    def shard_layout(self) -> dict:
        """This rank's place in the flat vector: a checkpointed shard loads only into the same layout."""
        return {
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "numel": self.numel,
            "start": self.start,
            "end": self.end,
        }

    def _hyper(self) -> list:
        return [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]

    def state_dict(self) -> dict:
        """This rank's shard of the state (tensors cloned), with its layout and the hyperparameters."""
        return {
            "state": {
                "step": self.step_count,
                "exp_avg": self.exp_avg.clone(),
                "exp_avg_sq": self.exp_avg_sq.clone(),
                "master": None if self.master is None else self.master.clone(),
            },
            "param_groups": self._hyper(),
            "shard": self.shard_layout(),
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        got, want = state_dict.get("shard", {}), self.shard_layout()
        if got != want:
            raise UserError(
                f"optimizer shard layout differs: checkpoint has {got}, this run needs {want} "
                "(use ShardedAdamW.gather_full_state / load_full_state to change the data-parallel size)"
            )
        st = state_dict["state"]
        self.step_count = int(st["step"])
        self.exp_avg.copy_(st["exp_avg"])
        self.exp_avg_sq.copy_(st["exp_avg_sq"])
        if self.master is not None:
            self.master.copy_(st["master"] if st.get("master") is not None else self._read_params())
        for g, saved in zip(self.param_groups, state_dict["param_groups"]):
            g.update(saved)

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        mine = torch.zeros(self.shard_size, dtype=torch.float32, device=self.device)
        mine[: t.numel()] = t
        if self.dp_size == 1:
            return mine[: self.numel].clone()
        full = torch.empty(self.shard_size * self.dp_size, dtype=torch.float32, device=self.device)
        dist.all_gather_into_tensor(full, mine, group=self.dp_group)
        return full[: self.numel]

    def gather_full_state(self) -> dict:
        """Collective over the group: the whole flat state (fp32, numel elements), identical on every rank."""
        return {
            "step": self.step_count,
            "exp_avg": self._gather(self.exp_avg),
            "exp_avg_sq": self._gather(self.exp_avg_sq),
            "master": None if self.master is None else self._gather(self.master),
            "param_groups": self._hyper(),
            "numel": self.numel,
        }

    @torch.no_grad()
    def load_param_state(self, step: int, hyper: dict, exp_avg: list, exp_avg_sq: list) -> None:
        """Take this rank's slice from per-parameter moments (aligned with flat_params, each shaped like its
        parameter; None where this rank's slice does not reach or there is no state: zeros). Only the parameters
        overlapping [start, end) are read."""
        self.step_count = int(step)
        for mine, src in ((self.exp_avg, exp_avg), (self.exp_avg_sq, exp_avg_sq)):
            mine.zero_()
            index = {id(p): i for i, p in enumerate(self.flat_params)}
            for p, po, so, n in self._pieces:
                t = src[index[id(p)]]
                if t is not None:
                    mine[so : so + n] = t.reshape(-1)[po : po + n]
        if self.master is not None:
            self.master.copy_(self._read_params())
        self.param_groups[0].update({k: v for k, v in hyper.items() if k in self.param_groups[0] and k != "params"})

    @torch.no_grad()
    def load_full_state(self, full: dict) -> None:
        """Take this rank's slice of a gather_full_state() result (any data-parallel size wrote it)."""
        if full["numel"] != self.numel:
            raise UserError(f"optimizer state has {full['numel']} elements, the parameters {self.numel}")
        sl = slice(self.start, self.end)
        self.step_count = int(full["step"])
        self.exp_avg.copy_(full["exp_avg"][sl])
        self.exp_avg_sq.copy_(full["exp_avg_sq"][sl])
        if self.master is not None:
            self.master.copy_(full["master"][sl] if full.get("master") is not None else self._read_params())
        for g, saved in zip(self.param_groups, full["param_groups"]):
            g.update(saved)
