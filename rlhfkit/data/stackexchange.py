"""One Stack Exchange site → question jobs, in one streaming pass with flat memory.

Pass over Posts.xml (expat, see `posts.py`): every question and answer leaves a few integers in compact
arrays (id, parent, accepted id, votes, offset) and, when its text may be needed, its raw title/body in
a scratch file on disk. Answers of questions that go to `rl_prompts` (known from the parent id alone,
since the split is a hash of it) are not stored. Answers may come before or after their question.

Then questions are visited in id order; each one's answers are a contiguous slice of the answers sorted
by (parent, id). Scores, pairs and the SFT choice are computed from the integers, and only the texts
that the question's split needs are read back from the scratch file and sent for Markdown conversion.
Memory: ~50 bytes per post in numpy arrays plus one batch of texts — no bodies are kept in memory.
"""

from __future__ import annotations

import os
from array import array
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from rlhfkit.data.jobs import Job
from rlhfkit.data.posts import DumpError, parse_rows, post_type_name
from rlhfkit.data.scoring import answer_score, count_pairs, pick_sft_answer, sample_pairs
from rlhfkit.data.splits import assign_split

_SEP = "\x00"  # between title and body in the scratch file (XML cannot contain NUL)
_CHUNK_Q = 4096


class SiteScan:
    """The pass over one site's Posts.xml: integers in arrays, needed texts in `store`."""

    def __init__(self, site: str, store: Path, fractions: tuple, seed: int):
        self.site, self.fractions, self.seed = site, fractions, seed
        self.q_id, self.q_acc, self.q_off, self.q_len = array("q"), array("q"), array("q"), array("q")
        self.a_id, self.a_parent, self.a_votes, self.a_off, self.a_len = (array("q") for _ in range(5))
        self.types: Counter = Counter()
        self.skipped: Counter = Counter()
        self.rows = 0
        self.partial: dict | None = None
        self.store_path = store
        self._fh = open(store, "wb")
        self._pos = 0
        self._rl = fractions[3] > 0

    def _write(self, text: str) -> tuple[int, int]:
        data = text.encode("utf-8")
        off = self._pos
        self._fh.write(data)
        self._pos += len(data)
        return off, len(data)

    def on_row(self, attrs: dict) -> None:
        try:
            type_id = int(attrs["PostTypeId"])
            post_id = int(attrs["Id"])
        except (KeyError, ValueError):
            self.skipped["malformed_row"] += 1
            return
        self.types[type_id] += 1
        if type_id == 1:
            acc = attrs.get("AcceptedAnswerId")
            try:
                acc_id = int(acc) if acc else -1
            except ValueError:
                acc_id = -1
            off, n = self._write(attrs.get("Title", "") + _SEP + attrs.get("Body", ""))
            self.q_id.append(post_id)
            self.q_acc.append(acc_id)
            self.q_off.append(off)
            self.q_len.append(n)
        elif type_id == 2:
            if not attrs.get("Score", "").strip():  # no votes recorded: scoring it as 0 would invent a preference
                self.skipped["answer_without_score"] += 1
                return
            try:
                parent = int(attrs["ParentId"])
                votes = int(attrs["Score"])
            except (KeyError, ValueError):
                self.skipped["malformed_row"] += 1
                return
            if self._rl and assign_split(parent, self.fractions, self.seed, self.site) == "rl_prompts":
                off, n = -1, 0  # never needed: RL questions use no answer text
            else:
                off, n = self._write(attrs.get("Body", ""))
            self.a_id.append(post_id)
            self.a_parent.append(parent)
            self.a_votes.append(votes)
            self.a_off.append(off)
            self.a_len.append(n)
        else:
            self.skipped[f"post_type:{post_type_name(type_id)}"] += 1

    def run(self, xml_path: Path, display: str, allow_partial: bool) -> None:
        try:
            self.rows = parse_rows(xml_path, self.on_row, display=display)
        except DumpError as exc:
            if not allow_partial or exc.fatal:
                raise
            self.partial = exc.as_dict()
            self.rows = exc.rows
        finally:
            self._fh.close()

    # ------------------------------------------------------------------ planning
    def jobs(self, max_pairs: int, convert: bool, stats: SiteStats) -> Iterator[Job]:
        """Question jobs in id order (texts read back from the store); fills `stats` as it goes."""
        q_id = np.frombuffer(self.q_id, dtype=np.int64)
        a_id = np.frombuffer(self.a_id, dtype=np.int64)
        a_parent = np.frombuffer(self.a_parent, dtype=np.int64)
        q_order = np.argsort(q_id, kind="stable")
        q_sorted = q_id[q_order]
        dup = np.zeros(len(q_sorted), dtype=bool)
        if len(q_sorted) > 1:
            dup[1:] = q_sorted[1:] == q_sorted[:-1]
        stats.skipped["duplicate_question_id"] += int(dup.sum())
        a_order = np.lexsort((a_id, a_parent))
        a_parent_sorted = a_parent[a_order]
        starts = np.searchsorted(a_parent_sorted, q_sorted, "left")
        ends = np.searchsorted(a_parent_sorted, q_sorted, "right")
        matched = int((ends - starts)[~dup].sum()) if len(q_sorted) else 0
        stats.answers = matched
        stats.skipped["answer_without_question"] += len(a_id) - matched
        stats.questions = len(q_sorted) - int(dup.sum())
        a_cols = [np.frombuffer(c, dtype=np.int64)[a_order] for c in (self.a_id, self.a_votes, self.a_off, self.a_len)]
        q_cols = [np.frombuffer(c, dtype=np.int64)[q_order] for c in (self.q_acc, self.q_off, self.q_len)]
        del a_order, a_parent_sorted, q_order, q_id, a_id, a_parent
        self.q_id = self.q_acc = self.q_off = self.q_len = None  # sorted copies above replace them
        self.a_id = self.a_parent = self.a_votes = self.a_off = self.a_len = None

        with open(self.store_path, "rb") as fh:
            fd = fh.fileno()  # os.pread: no memory map, so the store's pages never count in our RSS
            for c0 in range(0, len(q_sorted), _CHUNK_Q):
                c1 = min(c0 + _CHUNK_Q, len(q_sorted))
                qids, qdup = q_sorted[c0:c1].tolist(), dup[c0:c1].tolist()
                qacc, qoff, qlen = (col[c0:c1].tolist() for col in q_cols)
                st, en = starts[c0:c1].tolist(), ends[c0:c1].tolist()
                lo, hi = st[0], en[-1]
                aid, avotes, aoff, alen = (col[lo:hi].tolist() for col in a_cols)
                for k, qid in enumerate(qids):
                    if qdup[k]:
                        continue
                    s, e = st[k] - lo, en[k] - lo
                    job = self._plan(qid, qacc[k], aid[s:e], avotes[s:e], aoff[s:e], alen[s:e], max_pairs, stats)
                    if job is None:
                        continue
                    job.title, _, job.question = os.pread(fd, qlen[k], qoff[k]).decode("utf-8").partition(_SEP)
                    job.convert = convert
                    for i, (ans_id, score, (off, n)) in enumerate(job.answers):
                        job.answers[i] = (ans_id, score, os.pread(fd, n, off).decode("utf-8"))
                    stats.text_chars += job.size()
                    yield job

    def _plan(self, qid, acc, aids, votes, offs, lens, max_pairs, stats: SiteStats) -> Job | None:
        split = assign_split(qid, self.fractions, self.seed, self.site)
        stats.questions_by_split[split] += 1
        accepted = [a == acc for a in aids]
        scores = [answer_score(v, f) for v, f in zip(votes, accepted)]
        for sc in scores:
            stats.score_hist[sc] += 1
        n_pairs = count_pairs(scores) if len(scores) > 1 else 0
        stats.pairs_uncapped += n_pairs
        stats.pairs_capped += min(n_pairs, max_pairs) if max_pairs > 0 else n_pairs
        job = Job(split=split, site=self.site, qid=qid, title="", question="")
        if split == "sft":
            idx = pick_sft_answer(scores, accepted, votes)
            if idx is None:
                stats.skipped["sft:question_without_answers"] += 1
                return None
            job.answers = [(aids[idx], scores[idx], (offs[idx], lens[idx]))]
            job.sft = 0
        elif split in ("rm_train", "rm_eval"):
            pairs = sample_pairs(scores, max_pairs, (self.seed, self.site, qid), aids) if n_pairs else []
            if not pairs:
                stats.skipped[f"{split}:question_without_pairs"] += 1
                return None
            used = sorted({i for p in pairs for i in p})
            where = {i: k for k, i in enumerate(used)}
            job.answers = [(aids[i], scores[i], (offs[i], lens[i])) for i in used]
            job.pairs = [(where[c], where[r]) for c, r in pairs]
        return job


class SiteStats:
    """Counts for one site (merged into stats.json)."""

    def __init__(self, site: str):
        self.site = site
        self.questions = 0
        self.answers = 0
        self.pairs_uncapped = 0
        self.pairs_capped = 0
        self.text_chars = 0  # characters of question/answer text read back for the rows (→ Markdown)
        self.score_hist: Counter = Counter()
        self.questions_by_split: Counter = Counter()
        self.skipped: Counter = Counter()

    def as_dict(self, scan: SiteScan) -> dict:
        skipped = Counter(scan.skipped)
        skipped.update(self.skipped)
        return {
            "rows": scan.rows,
            "rows_by_post_type": {post_type_name(t): n for t, n in sorted(scan.types.items())},
            "questions": self.questions,
            "answers": self.answers,
            "questions_by_split": dict(self.questions_by_split),
            "candidate_pairs": self.pairs_uncapped,
            "candidate_pairs_capped": self.pairs_capped,
            "score_histogram": {str(k): v for k, v in sorted(self.score_hist.items())},
            "text_chars_used": self.text_chars,
            "skipped": {k: v for k, v in sorted(skipped.items()) if v},
            "partial": scan.partial,
        }
