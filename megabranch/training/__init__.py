"""Training: the engine protocol, the native engine (any tp x pp x dp grid, one process included), the one run
loop, and the pieces every engine shares: the optimizer and learning rate, the precision and loss scaling, the
native step-directory checkpoints, stopping early."""
