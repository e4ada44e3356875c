"""What several test modules share, one module per kind of thing; no test module imports another.

env          the repository root, the environment of a subprocess, one torch thread
configs      tiny model configs, the pipeline harness config, the tiny pp=2 YAML of the launch tests
corpus       tiny corpora, and a tiny preprocessed data directory
dist         free ports and the gloo worker runner (N processes standing in for N GPUs)
reference    synthetic batches, the single-process reference run, and comparisons against it
checkpoints  step directories of a tiny single-process run
logs         reading log.jsonl
import_rules the ast walk behind tests/test_imports.py
"""
