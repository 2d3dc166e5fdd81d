"""Training: the RLSO and InfoNCE losses and steps, the alternating loop, state and checkpoints."""
