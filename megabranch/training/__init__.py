"""Training: the engine protocol, the single-process engine, the one run loop, the learning-rate schedule and the
native engines' step-directory checkpoints."""
