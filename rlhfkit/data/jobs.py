"""Question jobs → converted rows: the part shared by Stack Exchange dumps and the HF schemas.

A `Job` is one question with only the texts its split needs (SFT: the chosen answer; RM: the answers in
the sampled pairs; RL: none). Jobs are converted to Markdown in batches — in this process or in worker
processes, with a bounded number of batches in flight so memory stays flat — and turned into rows.
"""

from __future__ import annotations

import multiprocessing
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from rlhfkit.data.markdown import convert_lists
from rlhfkit.data.writer import LengthFilter, SplitWriter
from rlhfkit.inputs.templates import same_text

_BATCH_CHARS = 1 << 20
_BATCH_JOBS = 256


@dataclass(slots=True)
class Job:
    split: str
    site: str
    qid: int | None
    title: str
    question: str  # HTML when `convert`, else text
    answers: list[tuple[int | None, int | None, str]] = field(default_factory=list)  # (id, score, text)
    sft: int | None = None  # index into answers
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (chosen, rejected) indices into answers
    convert: bool = True

    def texts(self) -> list[str]:
        return [self.question, *(a[2] for a in self.answers)]

    def size(self) -> int:
        return len(self.question) + sum(len(a[2]) for a in self.answers)


def _batches(jobs: Iterable[Job]) -> Iterator[list[Job]]:
    batch: list[Job] = []
    chars = 0
    for job in jobs:
        batch.append(job)
        chars += job.size()
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_JOBS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _payload(batch: list[Job]) -> list[list[str]]:
    return [j.texts() if j.convert else [] for j in batch]


def _finish(batch: list[Job], done: list[list[str]] | None) -> Iterator[tuple[Job, list[str]]]:
    for i, job in enumerate(batch):
        yield job, done[i] if job.convert else job.texts()


class ConverterPool:
    """Worker processes converting HTML to Markdown, started on first use and shared by all inputs."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool = None

    def resize(self, workers: int) -> None:
        """Set the number of workers (no effect once the processes are started)."""
        if self._pool is None:
            self.workers = workers

    def submit(self, payload: list[list[str]]):
        if self._pool is None:
            from concurrent.futures import ProcessPoolExecutor

            ctx = multiprocessing.get_context("spawn")  # never fork a process that runs pyarrow threads
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx)
        return self._pool.submit(convert_lists, payload)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> ConverterPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def converted(jobs: Iterable[Job], pool: ConverterPool | None = None) -> Iterator[tuple[Job, list[str]]]:
    """(job, texts) in input order; texts converted to Markdown where `job.convert`, else unchanged.

    With a pool of several workers, batches are converted there, at most 2 per worker in flight.
    """
    if pool is None or pool.workers <= 1:
        for batch in _batches(jobs):
            yield from _finish(batch, convert_lists(_payload(batch)))
        return
    window: deque = deque()
    for batch in _batches(jobs):
        payload = _payload(batch)
        window.append((batch, pool.submit(payload) if any(payload) else None))
        while len(window) > 2 * pool.workers:
            done_batch, fut = window.popleft()
            yield from _finish(done_batch, fut.result() if fut is not None else None)
    while window:
        done_batch, fut = window.popleft()
        yield from _finish(done_batch, fut.result() if fut is not None else None)


class Emitter:
    """Turns converted jobs into rows of the four splits, applying the length filters."""

    def __init__(self, writer: SplitWriter, lengths: LengthFilter, prompt_style: str = "title_body"):
        self.writer, self.lengths, self.prompt_style = writer, lengths, prompt_style
        self.skipped: Counter = Counter()
        self.filtered: Counter = Counter()  # "<split>:<reason>"
        self.rows_by_site: Counter = Counter()  # (site, split) -> rows written

    def site_rows(self, site: str) -> dict:
        return {
            split: self.rows_by_site.get((site, split), 0) for split in ("sft", "rm_train", "rm_eval", "rl_prompts")
        }

    def _add(self, split: str, row: dict) -> None:
        self.writer.add(split, row)
        self.rows_by_site[(row["site"], split)] += 1

    def prompt_of(self, title: str, body: str) -> str:
        if self.prompt_style == "title_body" and title:
            return f"{title}\n\n{body}" if body else title
        return body or title

    def emit(self, job: Job, texts: list[str]) -> None:
        prompt = self.prompt_of(job.title.strip(), texts[0])
        answers = texts[1:]
        split = job.split
        if not prompt:
            self.skipped["empty_question"] += 1
            return
        cache: dict = {}
        base = {"prompt": prompt, "qid": job.qid, "site": job.site}
        if split == "sft":
            aid, score, _ = job.answers[job.sft]
            response = answers[job.sft]
            if not response:
                self.skipped["empty_answer"] += 1
                return
            if self._filtered(split, prompt, [response], cache):
                return
            self._add(split, {**base, "response": response, "answer_id": aid, "score": score})
        elif split in ("rm_train", "rm_eval"):
            for c, r in job.pairs:
                chosen, rejected = answers[c], answers[r]
                if not chosen or not rejected:
                    self.skipped["empty_answer"] += 1
                    continue
                if same_text(chosen, rejected):  # nothing to prefer: an RM can only learn a tie from it
                    self.skipped["identical_pair"] += 1
                    continue
                if self._filtered(split, prompt, [chosen, rejected], cache):
                    continue
                self._add(
                    split,
                    {
                        **base,
                        "chosen": chosen,
                        "rejected": rejected,
                        "chosen_id": job.answers[c][0],
                        "rejected_id": job.answers[r][0],
                        "chosen_score": job.answers[c][1],
                        "rejected_score": job.answers[r][1],
                    },
                )
        else:
            if self._filtered(split, prompt, [], cache):
                return
            self._add(split, base)

    def _filtered(self, split: str, prompt: str, responses: list[str], cache: dict) -> bool:
        if not self.lengths.active:
            return False
        reason = self.lengths.reason(prompt, responses, cache)
        if reason:
            self.filtered[f"{split}:{reason}"] += 1
            return True
        return False
