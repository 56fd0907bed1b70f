"""Bad inputs a hostile but fair user tries, each run through the CLI as a user runs it, with what
they see and what is kept. tests/e2e/test_reliability.py asserts every probe's checks; run this file to
print the table in docs/reliability.md:

    python -m tests.reliability_probes          # from the repository root; ~1 min on 2 CPU cores
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import json
import os
import pickle
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import REPO, make_corpus


@dataclass
class World:
    """What the probes share: a tiny model, a Q/A corpus, preference pairs, a scratch folder."""

    model: Path
    corpus: Path
    pairs: Path
    tmp: Path
    n: int = 0

    def dir(self, name: str) -> Path:
        self.n += 1
        d = self.tmp / f"{self.n:02d}-{name}"
        d.mkdir(parents=True)
        return d


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    seconds: float

    @property
    def line(self) -> str:
        """The one line the user is told (last stderr line)."""
        lines = [x for x in self.err.strip().splitlines() if x.strip()]
        return lines[-1] if lines else ""


@dataclass
class Row:
    does: str
    outcome: Outcome
    kept: str
    checks: list[tuple[str, bool]] = field(default_factory=list)

    def check(self, what: str, ok: bool) -> None:
        self.checks.append((what, bool(ok)))


class _Unpickled:
    """A payload that creates a file when unpickled: proof that a checkpoint file ran code."""

    def __init__(self, flag: Path):
        self.flag = flag

    def __reduce__(self):
        return (builtins.open, (str(self.flag), "w"))


def cli(*argv, cwd: Path | None = None, env: dict | None = None) -> Outcome:
    """`rlhfkit ARGV` in this process (as the console script calls it); an escaping exception is what a
    user would see as a traceback, so it is caught and returned as code -1 with the traceback."""
    import traceback

    from rlhfkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_cwd, old_env = os.getcwd(), dict(os.environ)
    t0 = time.perf_counter()
    try:
        os.environ.update(env or {})
        if cwd:
            os.chdir(cwd)
            sys.path.insert(0, str(cwd))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in argv])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001  (the point: nothing may escape)
                err.write(traceback.format_exc())
                code = -1
    finally:
        os.chdir(old_cwd)
        if cwd:
            sys.path.remove(str(cwd))
        os.environ.clear()
        os.environ.update(old_env)
    return Outcome(code, out.getvalue(), err.getvalue(), time.perf_counter() - t0)


def _sft(w: World, out: Path, *extra) -> Outcome:
    return cli(
        "sft",
        f"out_dir={out}",
        f"model.name={w.model}",
        f"data.path={w.corpus}",
        "data.seq_len=64",
        "train.batch_size=8",
        "lora.r=4",
        "train.lr=1e-2",
        *extra,
    )


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def _one_line(row: Row, code: int, pattern: str) -> None:
    import re

    o = row.outcome
    row.check(f"exit code {code}", o.code == code)
    row.check("no traceback", "Traceback" not in o.err + o.out)
    row.check(f"says /{pattern}/", re.search(pattern, o.line) is not None)


# --------------------------------------------------------------------------- run directories
def run_keeps_user_files(w: World) -> Row:
    d = w.dir("run")
    (d / "sft").mkdir()
    (d / "sft" / "notes.txt").write_text("mine")
    o = cli(
        "run",
        REPO / "recipes" / "tiny.yaml",
        f"run_dir={d}",
        f"vars.model={w.model}",
        f"vars.pairs={w.pairs}",
        "stages=[data,sft]",
    )
    row = Row("`rlhfkit run` (stages data, sft) with a file of yours in RUN_DIR/sft/", o, "your file, untouched")
    _one_line(row, 1, r"sft exists but was not written by `rlhfkit run`")
    row.check("user file kept", (d / "sft" / "notes.txt").read_text() == "mine")
    return row


def crafted_pickle_is_never_loaded(w: World) -> Row:
    d = w.dir("pickle")
    first = _sft(w, d, "train.max_steps=2", "train.save_every=1")
    flag = d / "PAYLOAD_RAN"
    newest = d / "checkpoints" / "step-000002"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.pt"):
        (newest / name).write_bytes(pickle.dumps(_Unpickled(flag)))
    o = _sft(w, d, "train.max_steps=3", "--resume")
    row = Row(
        "`--resume` from a checkpoint someone sent you, with pickles planted in it",
        o,
        "the run resumes; the pickles are never opened",
    )
    row.check("setup run ok", first.code == 0)
    row.check("exit code 0", o.code == 0)
    row.check("resumed from step 2", "resumed from" in o.out and "step-000002" in o.out)
    row.check("payload did not run", not flag.exists())
    written = {p.suffix for p in (d / "checkpoints").rglob("*") if p.is_file() and p.parent.name != "step-000002"}
    row.check("checkpoints hold only .safetensors/.json", written <= {".safetensors", ".json"})
    return row


def pickle_only_checkpoint_is_refused(w: World) -> Row:
    d = w.dir("oldckpt")
    ck = d / "checkpoints" / "step-000004"
    ck.mkdir(parents=True)
    flag = d / "PAYLOAD_RAN"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"):
        (ck / name).write_bytes(pickle.dumps(_Unpickled(flag)))
    (ck / "trainer_state.json").write_text(json.dumps({"step": 4}))
    o = _sft(w, d, "train.max_steps=6", "--resume")
    row = Row("`--resume` from a pickle-only (accelerate-format) checkpoint", o, "the folder as it was")
    _one_line(row, 1, r"no complete checkpoint .*trainable\.safetensors is missing")
    row.check("payload did not run", not flag.exists())
    return row


def resume_finished_run(w: World) -> Row:
    d = w.dir("finished")
    first = _sft(w, d, "train.max_steps=2")
    before, metrics = _digest(d / "final"), (d / "metrics.jsonl").read_bytes()
    o = _sft(w, d, "train.max_steps=2", "--resume")
    row = Row("`--resume` on a finished run with no checkpoint", o, "`final/` and `metrics.jsonl` byte-identical")
    row.check("setup run ok", first.code == 0)
    _one_line(row, 1, r"nothing to resume")
    row.check("final/ unchanged", _digest(d / "final") == before)
    row.check("metrics.jsonl unchanged", (d / "metrics.jsonl").read_bytes() == metrics)
    return row


def resume_with_changed_config(w: World) -> Row:
    d = w.dir("changed")
    first = _sft(w, d, "train.max_steps=2", "train.save_every=1")
    saved = (d / "config.yaml").read_bytes()
    o = _sft(w, d, "train.max_steps=3", "train.lr=0.5", "--resume")
    row = Row("`--resume` with a changed `train.lr`", o, "the run as it was; `--allow-config-change` resumes anyway")
    row.check("setup run ok", first.code == 0)
    _one_line(row, 2, r"config differs .* train\.lr: 0\.01 → 0\.5; pass --allow-config-change")
    row.check("config.yaml unchanged", (d / "config.yaml").read_bytes() == saved)
    again = _sft(w, d, "train.max_steps=3", "train.lr=0.5", "--resume", "--allow-config-change")
    row.check("--allow-config-change resumes", again.code == 0 and "resumed from" in again.out)
    return row


def damaged_newest_checkpoint(w: World) -> Row:
    d = w.dir("damaged")
    first = _sft(w, d, "train.max_steps=3", "train.save_every=1", "train.keep_checkpoints=3")
    (d / "checkpoints" / "step-000003" / "trainable.safetensors").write_bytes(b"")
    (d / "checkpoints" / "step-000002" / "trainer_state.json").write_text("")
    o = _sft(w, d, "train.max_steps=3", "--resume")
    row = Row(
        "`--resume` when the newest checkpoint has a 0-byte safetensors and the next an empty trainer_state.json",
        o,
        "the newest complete checkpoint (step 1) is used; both damaged ones are named",
    )
    row.check("setup run ok", first.code == 0)
    row.check("exit code 0", o.code == 0)
    row.check(
        "names both damaged files",
        "step-000003/trainable.safetensors is damaged" in o.out
        and "step-000002/trainer_state.json is damaged" in o.out,
    )
    row.check("resumed from step 1", "resumed from" in o.out and "step-000001 (step 1)" in o.out)
    return row


def second_writer_is_refused(w: World) -> Row:
    from rlhfkit.runtime.io import lock_dir

    d = w.dir("locked")
    holder = lock_dir(d)  # another rlhfkit process holding this out_dir (same flock semantics)
    try:
        o = _sft(w, d, "train.max_steps=1", "--overwrite")
    finally:
        holder.close()
    row = Row(
        "a second `rlhfkit sft --overwrite` on an `out_dir` another run is writing",
        o,
        "the first run's folder, untouched",
    )
    _one_line(row, 1, r"is in use by another rlhfkit process \(pid \d+\)")
    row.check("nothing written", sorted(p.name for p in d.iterdir()) == [".lock"])
    return row


# --------------------------------------------------------------------------- configs
def _config_probe(w: World, does: str, content: bytes, pattern: str) -> Row:
    d = w.dir("yaml")
    (d / "c.yaml").write_bytes(content)
    o = _sft(w, d / "out", "--config", d / "c.yaml")
    row = Row(does, o, "nothing: no out_dir is created")
    _one_line(row, 2, pattern)
    row.check("no out_dir", not (d / "out").exists())
    return row


def yaml_syntax_error(w: World) -> Row:
    return _config_probe(
        w, "`--config` with a YAML syntax error", b"train:\n  lr: [1e-4\n", r"invalid YAML at line \d+"
    )


def yaml_not_utf8(w: World) -> Row:
    return _config_probe(w, "`--config` that is not UTF-8", b"train:\n  lr: 1e-4 # caf\xe9\n", r"not UTF-8")


def recipe_syntax_error(w: World) -> Row:
    d = w.dir("recipe")
    (d / "r.yaml").write_text("stages: [sft\n")
    o = cli("run", d / "r.yaml")
    row = Row("`rlhfkit run RECIPE` with a YAML syntax error", o, "nothing")
    _one_line(row, 2, r"r\.yaml: invalid YAML")
    return row


def _bad_value(w: World, key: str, value: str, pattern: str) -> Row:
    d = w.dir("value")
    o = _sft(w, d / "out", f"{key}={value}")
    row = Row(f"`{key}={value}`", o, "nothing: no out_dir is created")
    _one_line(row, 2, pattern)
    row.check("no out_dir", not (d / "out").exists())
    return row


def batch_size_zero(w: World) -> Row:
    return _bad_value(w, "train.batch_size", "0", r"train: batch_size must be > 0")


def grad_accum_zero(w: World) -> Row:
    return _bad_value(w, "train.grad_accum", "0", r"train: grad_accum must be > 0")


def negative_lr(w: World) -> Row:
    return _bad_value(w, "train.lr", "-1", r"train: lr must be > 0")


# --------------------------------------------------------------------------- data
def jsonl_not_utf8(w: World) -> Row:
    d = w.dir("jsonl")
    rows = [json.dumps(r).encode() for r in make_corpus(20)]
    rows[2] = rows[2].replace(b"?", b"\xff?", 1)
    (d / "c.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    o = cli("sft", f"out_dir={d / 'out'}", f"model.name={w.model}", f"data.path={d / 'c.jsonl'}")
    row = Row("SFT data: a JSONL file whose row 3 is not UTF-8", o, "nothing")
    _one_line(row, 1, r"c\.jsonl: row 3 is not UTF-8")
    return row


def jsonl_truncated(w: World) -> Row:
    d = w.dir("jsonl")
    text = "".join(json.dumps(r) + "\n" for r in make_corpus(20))
    (d / "c.jsonl").write_text(text[: len(text) - 25])
    o = cli("sft", f"out_dir={d / 'out'}", f"model.name={w.model}", f"data.path={d / 'c.jsonl'}")
    row = Row("SFT data: a JSONL file cut off mid-row", o, "nothing")
    _one_line(row, 1, r"c\.jsonl: row 20 is not valid JSON")
    return row


def _ppo(w: World, out: Path, *extra, cwd=None) -> Outcome:
    return cli(
        "ppo",
        f"out_dir={out}",
        f"model.name={w.model}",
        "train.max_steps=1",
        "train.batch_size=2",
        "ppo.mini_batch_size=2",
        "generation.response_min=2",
        "generation.response_max=3",
        *extra,
        cwd=cwd,
    )


def prompts_not_utf8(w: World) -> Row:
    d = w.dir("prompts")
    (d / "p.txt").write_bytes(b"how tea?\nwhy caf\xe9?\nhow bread?\n")
    o = _ppo(w, d / "out", f"prompts.path={d / 'p.txt'}", "reward=rlhfkit.rewards.raters:vader_positive")
    row = Row("PPO prompts: a .txt file whose line 2 is not UTF-8", o, "nothing that blocks the corrected rerun")
    _one_line(row, 1, r"p\.txt: line 2 is not UTF-8")
    again = _ppo(w, d / "out", f"prompts.path={d / 'p.txt'}", "reward=rlhfkit.rewards.raters:vader_positive")
    row.check("rerun not blocked by a leftover out_dir", "is not empty" not in again.err and again.code == 1)
    return row


REWARDS = """
def strings(prompts, responses):
    return ["1.5"] * len(responses)

def nones(prompts, responses):
    return [None] * len(responses)

def boom(prompts, responses):
    raise KeyError("label")
"""


def _reward_probe(w: World, fn: str, pattern: str, does: str) -> Row:
    d = w.dir("reward")
    (d / "probe_rewards.py").write_text(REWARDS)
    (d / "p.txt").write_text("how tea?\nwhy bread?\nhow coffee?\nwhat milk?\n")
    sys.modules.pop("probe_rewards", None)
    o = _ppo(w, d / "out", f"prompts.path={d / 'p.txt'}", "prompts.n_eval=1", f"reward=probe_rewards:{fn}", cwd=d)
    row = Row(does, o, "no step is taken: nothing trained on it")
    _one_line(row, 1, pattern)
    row.check("no checkpoint or final", not (d / "out" / "final").exists())
    return row


def reward_returns_strings(w: World) -> Row:
    return _reward_probe(
        w,
        "strings",
        r"reward function strings returned '1\.5' \(a str\) for sample 0",
        'a reward function that returns strings (`["1.5"]`)',
    )


def reward_returns_none(w: World) -> Row:
    return _reward_probe(w, "nones", r"reward function nones returned None", "a reward function that returns `None`s")


def reward_raises(w: World) -> Row:
    return _reward_probe(w, "boom", r"reward function boom raised KeyError: 'label'", "a reward function that raises")


def model_path_typo(w: World) -> Row:
    d = w.dir("typo")
    (d / "runs").mkdir()
    os.symlink(w.model, d / "runs" / "tiny_model")
    o = cli("sft", "out_dir=out", "model.name=runs/tiny_modl", cwd=d, env={"HF_HUB_OFFLINE": "0"})
    row = Row("`model.name=runs/tiny_modl` (a typo of a local folder), hub reachable or not", o, "nothing")
    _one_line(row, 1, r"model path not found: runs/tiny_modl \(did you mean runs/tiny_model\?\)")
    row.check("under 2 s, no hub request", o.seconds < 2)
    return row


def data_path_typo(w: World) -> Row:
    d = w.dir("typo")
    (d / "train.jsonl").write_text("")
    o = cli(
        "sft", "out_dir=out", f"model.name={w.model}", "data.path=data/trian.jsonl", cwd=d, env={"HF_HUB_OFFLINE": "0"}
    )
    row = Row("`data.path=data/trian.jsonl` (no such file)", o, "nothing")
    _one_line(row, 1, r"data source not found: data/trian\.jsonl")
    row.check("under 2 s, no hub request", o.seconds < 2)
    return row


def answers_without_score(w: World) -> Row:
    d = w.dir("noscore")
    rows = []
    for q in range(1, 4):
        rows.append(f'<row Id="{q * 10}" PostTypeId="1" Score="3" Title="q{q}" Body="&lt;p&gt;why {q}?&lt;/p&gt;" />')
        for a in range(1, 4):  # the third answer of each question has no Score attribute
            score = f' Score="{a * 2}"' if a < 3 else ""
            rows.append(
                f'<row Id="{q * 10 + a}" PostTypeId="2" ParentId="{q * 10}"{score} Body="&lt;p&gt;a{a}&lt;/p&gt;" />'
            )
    (d / "Posts.xml").write_text("<posts>\n" + "\n".join(rows) + "\n</posts>\n")
    o = cli("data", "stackexchange", d / "Posts.xml", f"out_dir={d / 'out'}")
    stats = json.loads((d / "out" / "stats.json").read_text()) if (d / "out" / "stats.json").exists() else {}
    row = Row("a dump whose answers lack `Score`", o, "the other answers; the skipped ones counted in stats.json")
    row.check("exit code 0", o.code == 0)
    row.check("3 answers skipped and counted", stats.get("skipped", {}).get("answer_without_score") == 3)
    return row


def identical_pairs(w: World) -> Row:
    d = w.dir("identical")
    rows = [json.loads(line) for line in w.pairs.read_text().splitlines()]
    for r in rows[:10]:
        r["rejected"] = "  " + r["chosen"].replace(" ", "  ")  # the same text but for white space
    (d / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    o = cli(
        "rm",
        f"out_dir={d / 'rm'}",
        f"model.name={w.model}",
        f"data.path={d / 'p.jsonl'}",
        "data.max_length=64",
        "lora.enabled=false",
        "train.max_steps=1",
        "data.eval_fraction=0",
    )
    data = cli("data", "hf", d / "p.jsonl", f"out_dir={d / 'data'}")
    stats = json.loads((d / "data" / "stats.json").read_text()) if (d / "data" / "stats.json").exists() else {}
    row = Row("pairs whose chosen == rejected (after white space)", o, "the other pairs; dropped ones counted")
    row.check("rm exit code 0", o.code == 0)
    row.check("rm counts 10 dropped", "10 whose chosen == rejected" in o.out)
    row.check(
        "data stage counts 10 in stats.json", data.code == 0 and stats.get("skipped", {}).get("identical_pair") == 10
    )
    return row


PROBES: list[Callable[[World], Row]] = [
    run_keeps_user_files,
    crafted_pickle_is_never_loaded,
    pickle_only_checkpoint_is_refused,
    resume_finished_run,
    resume_with_changed_config,
    damaged_newest_checkpoint,
    second_writer_is_refused,
    yaml_syntax_error,
    yaml_not_utf8,
    recipe_syntax_error,
    batch_size_zero,
    grad_accum_zero,
    negative_lr,
    jsonl_not_utf8,
    jsonl_truncated,
    prompts_not_utf8,
    reward_returns_strings,
    reward_returns_none,
    reward_raises,
    model_path_typo,
    data_path_typo,
    answers_without_score,
    identical_pairs,
]


def table(rows: list[Row], root: Path | None = None) -> str:
    cell = lambda s: (s.replace(str(root), "…") if root else s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| what the user does | exit | what they see | what is kept | checks |", "|---|---|---|---|---|"]
    for r in rows:
        seen = (
            r.outcome.line
            if r.outcome.code
            else "(runs; "
            + next((x for x in r.outcome.out.splitlines() if "resumed from" in x or "skipping" in x), "exit 0")
            + ")"
        )
        ok = sum(c for _, c in r.checks)
        lines.append(
            f"| {cell(r.does)} | {r.outcome.code} | `{cell(seen)[:220]}` | {cell(r.kept)} | {ok}/{len(r.checks)} |"
        )
    return "\n".join(lines)


def main() -> int:
    import tempfile

    from tests.conftest import build_tiny_model, build_tiny_tokenizer
    from tests.stages.conftest import preference_pairs

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = build_tiny_tokenizer(tmp / "tok")
        (tmp / "model").mkdir()
        model = build_tiny_model(tmp / "model", tok)
        corpus, pairs = tmp / "qa.jsonl", tmp / "pairs.jsonl"
        corpus.write_text("".join(json.dumps(r) + "\n" for r in make_corpus(120, seed=1)))
        pairs.write_text("".join(json.dumps(r) + "\n" for r in preference_pairs(120, seed=5)))
        world = World(model, corpus, pairs, tmp / "probes")
        rows = [probe(world) for probe in PROBES]
        print(table(rows, tmp))
    failed = [(r.does, w) for r in rows for w, ok in r.checks if not ok]
    for does, what in failed:
        print(f"FAILED: {does}: {what}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
