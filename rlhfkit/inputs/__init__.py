"""Layer 2 — what goes into a model: prompt templates, tables, preference pairs, prompts, packing."""
