"""Preference data in Hugging Face schemas → question jobs (same splits and columns as the dumps).

Schemas (`schema=auto` picks one from the columns):

* h4       HuggingFaceH4/stack-exchange-preferences: question (HTML), answers[{answer_id, text (HTML),
           pm_score, selected}]; pm_score is used as the score and pairs are made as for the dumps.
* paired   lvwerra/stack-exchange-paired: question, response_j (preferred), response_k.
* hh       Anthropic/hh-rlhf: chosen / rejected whole dialogues ("\\n\\nHuman: …\\n\\nAssistant: …"); the
           prompt is everything up to and including the last "\\n\\nAssistant:", which must be identical in
           chosen and rejected (rows where it is not are skipped and counted). prompt + chosen
           reproduces the original dialogue exactly (the response keeps its leading space).
* generic  prompt, chosen, rejected.

For the pair schemas each row is one pair. Rows of the same question (its qid column, else its prompt
text) share a split; `sft` and `rl_prompts` take one row per run of consecutive rows of a question.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from rlhfkit.data.jobs import Job
from rlhfkit.data.scoring import count_pairs, pick_sft_answer, sample_pairs
from rlhfkit.data.splits import assign_split
from rlhfkit.inputs.templates import same_text
from rlhfkit.runtime.errors import RlhfkitError

HH_SEP = "\n\nAssistant:"
SCHEMA_COLUMNS = {
    "h4": ("question", "answers"),
    "paired": ("question", "response_j", "response_k"),
    "generic": ("prompt", "chosen", "rejected"),
    "hh": ("chosen", "rejected"),
}
_AUTO_ORDER = ("h4", "paired", "generic", "hh")


def detect_schema(columns) -> str:
    """The schema whose columns are all present (h4, paired, generic, then hh), or an RlhfkitError."""
    cols = set(columns)
    for name in _AUTO_ORDER:
        if all(c in cols for c in SCHEMA_COLUMNS[name]):
            return name
    raise RlhfkitError(
        f"columns {sorted(cols)} match no known preference schema; expected "
        + "; ".join(f"{n}: {', '.join(SCHEMA_COLUMNS[n])}" for n in _AUTO_ORDER)
    )


def check_schema(schema: str, columns) -> None:
    missing = [c for c in SCHEMA_COLUMNS[schema] if c not in set(columns)]
    if missing:
        raise RlhfkitError(
            f"schema '{schema}' needs columns {', '.join(SCHEMA_COLUMNS[schema])}; "
            f"missing {', '.join(missing)} (columns: {sorted(columns)})"
        )


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(prompt, chosen_response, rejected_response) split at the last "\\n\\nAssistant:" of each dialogue;
    None when a dialogue has no assistant turn or the two prompts differ."""
    ic, ir = chosen.rfind(HH_SEP), rejected.rfind(HH_SEP)
    if ic < 0 or ir < 0:
        return None
    prompt = chosen[: ic + len(HH_SEP)]
    if rejected[: ir + len(HH_SEP)] != prompt:
        return None
    return prompt, chosen[ic + len(HH_SEP) :], rejected[ir + len(HH_SEP) :]


def _as_int(value) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


class HFReader:
    """Iterate a `datasets.Dataset` in one of the schemas as question jobs."""

    def __init__(self, dataset, schema: str, site: str, fractions: tuple, seed: int, max_pairs: int, convert: bool):
        self.ds, self.site, self.fractions, self.seed = dataset, site, fractions, seed
        self.max_pairs, self.convert = max_pairs, convert
        self.schema = detect_schema(dataset.column_names) if schema == "auto" else schema
        check_schema(self.schema, dataset.column_names)
        self.rows = 0
        self.questions = 0
        self.answers = 0
        self.pairs_uncapped = 0
        self.pairs_capped = 0
        self.score_hist: Counter = Counter()
        self.questions_by_split: Counter = Counter()
        self.skipped: Counter = Counter()

    def _batches(self) -> Iterator[dict]:
        yield from self.ds.iter(batch_size=1000)

    def jobs(self) -> Iterator[Job]:
        if self.schema == "h4":
            yield from self._h4_jobs()
        else:
            yield from self._pair_jobs()

    # ------------------------------------------------------------------ h4
    def _h4_jobs(self) -> Iterator[Job]:
        has_qid = "qid" in self.ds.column_names
        for batch in self._batches():
            n = len(batch["question"])
            for i in range(n):
                index = self.rows
                self.rows += 1
                question = batch["question"][i]
                answers = batch["answers"][i] or []
                if not isinstance(question, str) or not question.strip():
                    self.skipped["empty_question"] += 1
                    continue
                qid = _as_int(batch["qid"][i]) if has_qid else None
                key = qid if qid is not None else index
                self.questions += 1
                ans = []
                for a in answers:
                    text, score = (a or {}).get("text"), _as_int((a or {}).get("pm_score"))
                    if not isinstance(text, str) or score is None:
                        self.skipped["malformed_answer"] += 1
                        continue
                    ans.append((_as_int(a.get("answer_id")), score, text, bool(a.get("selected"))))
                self.answers += len(ans)
                scores = [a[1] for a in ans]
                for sc in scores:
                    self.score_hist[sc] += 1
                n_pairs = count_pairs(scores) if len(scores) > 1 else 0
                self.pairs_uncapped += n_pairs
                self.pairs_capped += min(n_pairs, self.max_pairs) if self.max_pairs > 0 else n_pairs
                split = assign_split(key, self.fractions, self.seed, self.site)
                self.questions_by_split[split] += 1
                job = Job(split=split, site=self.site, qid=key, title="", question=question, convert=self.convert)
                if split == "sft":
                    idx = pick_sft_answer(scores, [a[3] for a in ans])
                    if idx is None:
                        self.skipped["sft:question_without_answers"] += 1
                        continue
                    job.answers, job.sft = [ans[idx][:3]], 0
                elif split in ("rm_train", "rm_eval"):
                    pairs = (
                        sample_pairs(
                            scores,
                            self.max_pairs,
                            (self.seed, self.site, key),
                            [a[0] if a[0] is not None else k for k, a in enumerate(ans)],
                        )
                        if n_pairs
                        else []
                    )
                    if not pairs:
                        self.skipped[f"{split}:question_without_pairs"] += 1
                        continue
                    used = sorted({k for p in pairs for k in p})
                    where = {k: j for j, k in enumerate(used)}
                    job.answers = [ans[k][:3] for k in used]
                    job.pairs = [(where[c], where[r]) for c, r in pairs]
                yield job

    # ------------------------------------------------------------------ pair schemas
    def _pair_jobs(self) -> Iterator[Job]:
        cols = self.ds.column_names
        has_qid = "qid" in cols
        if self.schema == "paired":
            p_col, c_col, r_col = "question", "response_j", "response_k"
        else:
            p_col, c_col, r_col = "prompt", "chosen", "rejected"
        last_key = object()
        for batch in self._batches():
            n = len(batch[c_col])
            for i in range(n):
                index = self.rows
                self.rows += 1
                chosen, rejected = batch[c_col][i], batch[r_col][i]
                if self.schema == "hh":
                    if not isinstance(chosen, str) or not isinstance(rejected, str):
                        self.skipped["non_text"] += 1
                        continue
                    parts = split_hh(chosen, rejected)
                    if parts is None:
                        self.skipped["hh_prompt_mismatch"] += 1
                        continue
                    prompt, chosen, rejected = parts
                else:
                    prompt = batch[p_col][i]
                if not all(isinstance(t, str) for t in (prompt, chosen, rejected)):
                    self.skipped["non_text"] += 1
                    continue
                if not prompt.strip() or not chosen.strip() or not rejected.strip():
                    self.skipped["empty_text"] += 1
                    continue
                if same_text(chosen, rejected):  # nothing to prefer
                    self.skipped["identical_pair"] += 1
                    continue
                qid = _as_int(batch["qid"][i]) if has_qid else None
                key = qid if qid is not None else prompt
                split = assign_split(key, self.fractions, self.seed, self.site)
                new_question = key != last_key
                last_key = key
                if new_question:
                    self.questions += 1
                    self.questions_by_split[split] += 1
                self.pairs_uncapped += 1
                self.pairs_capped += 1
                row_qid = qid if qid is not None else index
                job = Job(split=split, site=self.site, qid=row_qid, title="", question=prompt, convert=self.convert)
                if split in ("rm_train", "rm_eval"):
                    job.answers = [(None, None, chosen), (None, None, rejected)]
                    job.pairs = [(0, 1)]
                elif not new_question:
                    self.skipped[f"{split}:same_question_row"] += 1
                    continue
                elif split == "sft":
                    job.answers, job.sft = [(None, None, chosen)], 0
                yield job

    def stats(self) -> dict:
        return {
            "schema": self.schema,
            "rows": self.rows,
            "questions": self.questions,
            "answers": self.answers,
            "questions_by_split": dict(self.questions_by_split),
            "candidate_pairs": self.pairs_uncapped,
            "candidate_pairs_capped": self.pairs_capped,
            "score_histogram": {str(k): v for k, v in sorted(self.score_hist.items())},
            "skipped": {k: v for k, v in sorted(self.skipped.items()) if v},
            "partial": None,
        }
