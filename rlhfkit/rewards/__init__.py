"""Layer 4 — reward sources: scorers (RM folder, classifier pipeline, callable), offline raters,
reward-hacking detectors."""
