"""One scoring API for PPO, eval and the report: (prompts, responses) -> list of floats.

Behind it: a trained reward-model folder (full, adapter or merged; scored with the template it was
trained with), an HF text-classification pipeline with a chosen label (its probability), or any
Python callable. `load_scorer(spec)` picks the right one.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import yaml

from rlhfkit.runtime.errors import RlhfkitError


class Scorer:
    """Scores (prompt, response) pairs; higher is better."""

    name = "scorer"

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        raise NotImplementedError


class RewardModelScorer(Scorer):
    """A reward-model folder written by `rlhfkit rm` (its final/ dir, or a merged copy)."""

    def __init__(self, path: str, batch_size: int = 16, device: str | torch.device | None = None, template=None):
        from rlhfkit.inputs.templates import PromptFormat, TemplateConfig
        from rlhfkit.models.loading import LoraConfig, ModelConfig, load_model

        self.name = f"rm:{path}"
        self.model, self.tok = load_model(
            ModelConfig(name=str(path)), LoraConfig(enabled=False), kind="seq_cls", trainable=False, verbose=False
        )
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        saved = Path(path) / "config.yaml"
        trained = (yaml.safe_load(saved.read_text()) or {}) if saved.exists() else {}
        if template is None:  # score with the template the RM was trained on
            template = TemplateConfig(**trained.get("template", {}))
        self.fmt = PromptFormat(template, self.tok)
        self.batch_size = batch_size
        # Inputs longer than the RM was trained on (or than its positions) are cut as its training pairs
        # were (pairs.truncate_sequence): prompt head + answer cue, response head. Counted in n_cut.
        limits = [
            (trained.get("data") or {}).get("max_length"),
            getattr(self.model.config, "max_position_embeddings", None),
        ]
        self.max_length = min((int(x) for x in limits if x), default=None)
        self.n_cut = 0

    @torch.no_grad()
    def __call__(self, prompts, responses) -> list[float]:
        from rlhfkit.models.forward import sequence_scores

        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        out: list[float] = []
        pad = self.tok.pad_token_id
        for i in range(0, len(prompts), self.batch_size):
            seqs = [
                self._encode(p, r) for p, r in zip(prompts[i : i + self.batch_size], responses[i : i + self.batch_size])
            ]
            T = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), T), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), T), dtype=torch.long)
            for j, s in enumerate(seqs):
                ids[j, : len(s)] = torch.tensor(s)
                mask[j, : len(s)] = 1
            out += sequence_scores(self.model, ids.to(self.device), mask.to(self.device)).float().cpu().tolist()
        return out

    def _encode(self, prompt: str, response: str) -> list[int]:
        from rlhfkit.inputs.pairs import truncate_sequence

        ids, mask = self.fmt.encode(prompt, response)
        if self.max_length and len(ids) > self.max_length:
            self.n_cut += 1
            ids, _ = truncate_sequence(ids, mask, self.max_length)
        return ids


class PipelineScorer(Scorer):
    """An HF text-classification pipeline; the score is the probability of `label` for the response
    (or prompt + response with `include_prompt`) — seed 003's positive-sentiment reward."""

    def __init__(self, model: str, label: str, include_prompt: bool = True, batch_size: int = 16, device=None):
        from transformers import pipeline

        self.name = f"pipeline:{model}:{label}"
        self.pipe = pipeline("text-classification", model=model, top_k=None, device=device, truncation=True)
        labels = set(self.pipe.model.config.id2label.values())
        if label not in labels:
            raise RlhfkitError(f"label {label!r} not among the classifier's labels {sorted(labels)}")
        self.label, self.include_prompt, self.batch_size = label, include_prompt, batch_size

    def __call__(self, prompts, responses) -> list[float]:
        texts = [p + r if self.include_prompt else r for p, r in zip(prompts, responses)]
        results = self.pipe(list(texts), batch_size=self.batch_size)
        return [next(d["score"] for d in res if d["label"] == self.label) for res in results]


class CallableScorer(Scorer):
    """Any Python function fn(prompts, responses) -> sequence of numbers."""

    def __init__(self, fn: Callable):
        self.fn, self.name = fn, getattr(fn, "__name__", "callable")

    def __call__(self, prompts, responses) -> list[float]:
        try:
            scores = self.fn(list(prompts), list(responses))
        except Exception as exc:  # the user's code: say whose it is, not a traceback into ours
            raise RlhfkitError(f"reward function {self.name} raised {type(exc).__name__}: {exc}") from exc
        try:
            scores = scores.tolist() if hasattr(scores, "tolist") else list(scores)
        except TypeError:
            raise RlhfkitError(
                f"reward function {self.name} returned {type(scores).__name__}, not a sequence of numbers"
            ) from None
        if len(scores) != len(prompts):
            raise RlhfkitError(f"reward function {self.name} returned {len(scores)} scores for {len(prompts)} samples")
        for i, s in enumerate(scores):  # a string "1.5" or None is a bug in the function, not a score
            if isinstance(s, (bool, str, bytes)) or not isinstance(s, numbers.Real):
                raise RlhfkitError(
                    f"reward function {self.name} returned {s!r} (a {type(s).__name__}) for sample {i}; "
                    f"scores must be numbers"
                )
        return [float(s) for s in scores]


def load_scorer(spec, **kwargs) -> Scorer:
    """A Scorer from a callable, a Scorer, 'pipeline:<model>:<label>', 'module:function', or an RM folder."""
    if isinstance(spec, Scorer):
        return spec
    if callable(spec):
        return CallableScorer(spec)
    if not isinstance(spec, str) or not spec:
        raise RlhfkitError(f"cannot make a scorer from {spec!r}")
    if spec.startswith("pipeline:"):
        parts = spec.split(":")
        if len(parts) != 3:
            raise RlhfkitError("pipeline scorer spec is 'pipeline:<model>:<label>'")
        return PipelineScorer(parts[1], parts[2], **kwargs)
    if Path(spec).exists():
        return RewardModelScorer(spec, **kwargs)
    if ":" in spec:  # importable function, e.g. rlhfkit.rewards.raters:vader_positive
        import importlib

        module, _, attr = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise RlhfkitError(f"cannot import reward function {spec!r}: {exc}") from exc
        return CallableScorer(fn)
    raise RlhfkitError(f"reward source {spec!r} is not an RM folder, 'pipeline:<model>:<label>' or 'module:function'")
