"""Layer 3 — models: loading (hub/folder/GGUF/adapters), forward passes and log-probs, heads, generation,
adapter chains, critics."""
