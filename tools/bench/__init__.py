"""Benchmarks (`python -m tools.bench.NAME --help`); numbers with their command, machine and date go in
docs/benchmarks.md.

    train           a training step: megabranch eager / fused / compiled against a fairseq-style reference
                    (reference_transformer.py), tokens/s, MFU and peak memory
    kernels         the fused residual LayerNorm against eager PyTorch, GB/s against a device copy
    pipeline        the pipeline executor's bubble per schedule against the simulator's
    backward_split  the zero-bubble B/W split against torch.distributed.pipelining's
    grad_reducer    data-parallel gradients as bucket views against a copy-in / copy-out reducer
    checkpoint      writing and resharding a step directory: bytes and time per rank
"""
