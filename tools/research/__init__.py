"""The research drivers (`python -m tools.research.NAME --help`); what they found is in docs/reproduction.md.

depth_sweep   schemes x depths x lr / warmup / T at small scale (sweep_plan.py makes the run list,
              sweep_report.py the tables and figures)
study         variants x seeds over megabranch-train, checkpointed and resumable, with a report over seeds
analyze       per-layer cosine similarity, FFN sparsity and gradient norms of trained checkpoints
plot_logs     training curves from log.jsonl files
results.py    the result records both drivers write and read back
"""
