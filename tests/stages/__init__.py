"""Stage tests: each stage (CONFIG + run) on tiny in-process models, its invariances and outputs."""
