"""Unit tests: pure math, configs, builders, the package layout — no training loop."""
