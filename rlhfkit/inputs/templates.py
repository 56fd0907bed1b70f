"""Prompt/response formatting shared by SFT, reward, PPO and DPO, so every stage sees the same text.

Default is StackLLaMA's `Question: {prompt}\\n\\nAnswer: {response}`; `chat_template: true` uses
the tokenizer's own chat template instead. Encoding keeps the prompt/response token boundary, so
completion-only losses and response masks are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhfkit.runtime.errors import ConfigError

STACKLLAMA_TEMPLATE = "Question: {prompt}\n\nAnswer: {response}"
PROMPT_TAIL = 16  # tokens kept from the end of a cut prompt: the template's "Answer:" cue


def cut_prompt(ids: list[int], budget: int) -> list[int]:
    """A templated prompt's token ids cut to `budget`: its head and its last PROMPT_TAIL tokens (the
    answer cue, so the model still sees where its answer starts)."""
    if len(ids) <= budget:
        return ids
    tail = min(PROMPT_TAIL, budget // 2)
    return ids[: budget - tail] + (ids[-tail:] if tail else [])


def same_text(a: str, b: str) -> bool:
    """Equal after whitespace normalisation: a chosen == rejected pair of this kind has nothing to prefer."""
    return " ".join(a.split()) == " ".join(b.split())


def split_template(template: str) -> tuple[str, str]:
    """(the text before the response, the text after it), {question} read as {prompt}; a template
    without {response} is all prefix (the model continues it). The one parser of template strings."""
    prefix, _, suffix = template.replace("{question}", "{prompt}").partition("{response}")
    return prefix, suffix


@dataclass
class TemplateConfig:
    template: str = STACKLLAMA_TEMPLATE
    """Text template with {prompt} (or {question}) and {response} placeholders."""
    chat_template: bool = False
    """Use the tokenizer's chat template (user turn = prompt, assistant turn = response) instead."""

    def __post_init__(self):
        t = self.template.replace("{question}", "{prompt}")
        if "{response}" not in t or "{prompt}" not in t:
            raise ValueError(f"template must contain {{prompt}} and {{response}}: {self.template!r}")
        if t.index("{prompt}") > t.index("{response}"):
            raise ValueError("template must place {prompt} before {response}")


class PromptFormat:
    """Renders and tokenizes (prompt, response) pairs for one tokenizer."""

    def __init__(self, cfg: TemplateConfig, tokenizer):
        self.cfg = cfg
        self.tok = tokenizer
        self.prefix_t, self.suffix_t = split_template(cfg.template)
        if cfg.chat_template and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("template.chat_template: this tokenizer has no chat template")

    def prompt_text(self, prompt: str) -> str:
        """The text the model continues to produce a response."""
        if self.cfg.chat_template:
            return self.tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        return self.prefix_t.format(prompt=prompt)

    def text(self, prompt: str, response: str) -> str:
        return "".join(self._parts(prompt, response))

    def _parts(self, prompt: str, response: str) -> tuple[str, str]:
        prefix = self.prompt_text(prompt)
        if self.cfg.chat_template:
            full = self.tok.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
            )
            if not full.startswith(prefix):
                raise ConfigError("chat template does not extend the generation prompt; use a text template")
            return prefix, full[len(prefix) :]
        return prefix, response + self.suffix_t.format(prompt=prompt)

    def encode_prompt(self, prompt: str) -> list[int]:
        return self._ids(self.prompt_text(prompt), first=True)

    def encode(self, prompt: str, response: str, add_eos: bool = True) -> tuple[list[int], list[int]]:
        """Token ids of prompt+response and a same-length mask that is 1 on response tokens.

        The two parts are tokenized separately (as TRL does), so the mask boundary is exact.
        """
        prefix, rest = self._parts(prompt, response)
        p_ids = self._ids(prefix, first=True)
        r_ids = self._ids(rest, first=False)
        if add_eos and self.tok.eos_token_id is not None and (not r_ids or r_ids[-1] != self.tok.eos_token_id):
            r_ids = r_ids + [self.tok.eos_token_id]
        return p_ids + r_ids, [0] * len(p_ids) + [1] * len(r_ids)

    def encode_text(self, text: str, add_eos: bool = True) -> list[int]:
        """Raw text (domain pre-training), EOS-terminated so packed samples stay separable."""
        ids = self._ids(text, first=True)
        if add_eos and self.tok.eos_token_id is not None and (not ids or ids[-1] != self.tok.eos_token_id):
            ids.append(self.tok.eos_token_id)
        return ids

    def _ids(self, text: str, first: bool) -> list[int]:
        # The chat template already writes its special tokens; a text template gets the
        # tokenizer's BOS (if it adds one) only at the very start.
        special = first and not self.cfg.chat_template
        return self.tok(text, add_special_tokens=special)["input_ids"]
