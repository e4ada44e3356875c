"""The project's tools, by job; run from the repository root as modules (`python -m tools.bench.train`):

    bench/        benchmarks: each prints its ratios side by side in one run (results in docs/benchmarks.md)
    research/     the research drivers: the depth sweep, the multi-seed study, the analysis of checkpoints, plots
    gpu_check.py  the GPU check, run by its path (`python3 tools/gpu_check.py`) on a bare GPU image

What they share with the trainer (loading a model from a checkpoint, reading log.jsonl, the evaluation batches)
is megabranch's; nothing in megabranch imports tools.
"""
