"""Layer 7 — applications over the stages: the recipe runner (`rlhfkit run`), the report, the chat demo."""
