"""Layer 1 — pure torch math: PPO / GAE / KL / whitening (rl), preference and sequence losses (losses).
No HF imports."""
