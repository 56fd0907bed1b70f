"""Layer 0 — what every other layer stands on: errors, safe file output, typed configs, checkpoints,
the training loop skeleton."""
