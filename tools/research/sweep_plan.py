"""The run list of a depth / scheme / hyper-parameter sweep (depth_sweep.py): which runs, and the config overrides
of each."""

from __future__ import annotations

from dataclasses import dataclass, field

SCHEMES = {  # sweep name -> (model.residual, model.alpha_schedule)
    "post_ln": ("post_ln", "linear"),
    "pre_ln": ("pre_ln", "linear"),
    "deepnorm": ("deepnorm", "linear"),
    "branchnorm_linear": ("branchnorm", "linear"),
    "branchnorm_exp": ("branchnorm", "exp"),
    "branchnorm_sigmoid": ("branchnorm", "sigmoid"),
}


@dataclass
class RunSpec:
    groups: list  # which tables the run belongs to: depth | lr | warmup | T
    scheme: str  # a key of SCHEMES
    layers: int  # encoder layers = decoder layers
    lr: float
    warmup: int  # optim.warmup_updates
    T: int  # model.alpha_warmup_steps (BranchNorm)
    steps: int
    extra: list = field(default_factory=list)  # further config overrides "a.b=c"

    @property
    def name(self) -> str:
        return f"{self.scheme}-L{self.layers}-lr{self.lr:g}-wu{self.warmup}-T{self.T}-s{self.steps}"


def plan(args) -> list[RunSpec]:
    """The run list, most important first: depth runs at the largest depth, sensitivity runs, smaller depths."""
    depths = sorted(args.depths, reverse=True)
    stress = sorted(args.stress_depths, reverse=True) if args.stress_lr else []

    def depth_runs(group, depth, lr, warmup, steps):
        return [RunSpec([group], s, depth, lr, warmup, args.T, steps) for s in args.schemes]

    runs: list[RunSpec] = depth_runs("depth", depths[0], args.lr, args.warmup, args.steps)
    if stress:  # the same schemes at a high lr and short warmup, where divergence shows within few steps
        runs += depth_runs("stress", stress[0], args.stress_lr, args.stress_warmup, args.stress_steps)
    d, st = args.sens_layers, args.sens_steps
    slr = args.sens_lr or args.lr  # the lr of the warmup and T sweeps
    for s in args.sens_schemes:
        runs += [RunSpec(["lr"], s, d, lr, args.warmup, args.T, st) for lr in args.lrs]
        runs += [RunSpec(["warmup"], s, d, slr, wu, args.T, st) for wu in args.warmups]
    for s in [x for x in args.sens_schemes if x.startswith("branchnorm")][:1]:
        runs += [RunSpec(["T"], s, d, slr, args.warmup, t, st) for t in args.Ts]
    for depth in stress[1:]:
        runs += depth_runs("stress", depth, args.stress_lr, args.stress_warmup, args.stress_steps)
    for depth in depths[1:]:
        runs += depth_runs("depth", depth, args.lr, args.warmup, args.steps)
    seen: dict[str, RunSpec] = {}
    for r in runs:  # one run can serve several tables (e.g. the default lr is also the default warmup)
        if r.name in seen:
            seen[r.name].groups += [g for g in r.groups if g not in seen[r.name].groups]
        else:
            seen[r.name] = r
    return list(seen.values())


def overrides(spec: RunSpec, args) -> list[str]:
    residual, schedule = SCHEMES[spec.scheme]
    return [
        f"seed={args.seed}",
        f"model.residual={residual}",
        f"model.alpha_schedule={schedule}",
        f"model.alpha_warmup_steps={spec.T}",
        f"model.encoder_layers={spec.layers}",
        f"model.decoder_layers={spec.layers}",
        f"model.d_model={args.d_model}",
        f"model.n_heads={args.n_heads}",
        f"model.ffn_dim={4 * args.d_model}",
        f"model.dropout={args.dropout}",
        f"optim.lr={spec.lr}",
        f"optim.warmup_updates={spec.warmup}",
        f"optim.max_updates={spec.steps}",
        f"optim.clip_norm={args.clip_norm}",
        f"data.data_dir={args.data}",
        f"data.max_tokens={args.max_tokens}",
        *spec.extra,
        *getattr(args, "set", []),  # the user's own overrides last, e.g. model.deepnorm_init=false
    ]
