"""Reward-model stage and the scoring API."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from rlhfkit.models.forward import sequence_scores
from rlhfkit.runtime.config import load_config
from rlhfkit.runtime.io import read_jsonl
from rlhfkit.stages import reward


def rm_cfg(model_dir, pairs, out, *extra):
    return load_config(
        reward.RewardConfig,
        overrides=[
            f"out_dir={out}",
            f"model.name={model_dir}",
            f"data.path={pairs}",
            "data.eval_fraction=0.2",
            "data.max_length=64",
            "train.batch_size=8",
            "train.lr=3e-3",
            "train.max_steps=40",
            "train.seed=0",
            "lora.enabled=false",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def trained_rm(tiny_model_dir, pair_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "run"
    summary = reward.run(rm_cfg(tiny_model_dir, pair_file, out))
    return out, summary


def test_rm_learns_preference_rule_to_95_percent_held_out(trained_rm):
    out, summary = trained_rm
    assert summary["eval_accuracy"] >= 0.95, summary
    assert summary["eval_pairs"] >= 40
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if "eval/accuracy" in r]
    assert evals[-1]["eval/accuracy"] == summary["eval_accuracy"]
    assert summary["eval_margin"] > 0
    margins = json.loads((out / "eval_margins.json").read_text())
    assert len(margins) == summary["eval_pairs"]
    assert sum(m > 0 for m in margins) / len(margins) == pytest.approx(summary["eval_accuracy"])
    # the agreed schema of the length-aware numbers (the report renders them)
    for k in ("longer_wins", "matched_accuracy", "matched_pairs", "length_agreement", "length_controlled_accuracy"):
        assert evals[-1][f"eval/{k}"] == summary[f"eval_{k}"]
    bins = json.loads((out / "eval_length_bins.json").read_text())["bins"]
    assert sum(b["pairs"] for b in bins) == summary["eval_pairs"] and bins[-1]["hi"] is None
    assert bins[0] == {**bins[0], "lo": 1.0, "hi": 1.25, "pairs": summary["eval_matched_pairs"]}


def test_held_out_prompts_never_trained_on(pair_file):
    from rlhfkit.inputs.pairs import PairDataConfig, load_pairs

    train, held = load_pairs(PairDataConfig(path=str(pair_file), eval_fraction=0.2))
    assert held and train
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}


def test_score_same_alone_and_in_left_or_right_padded_batches(trained_rm):
    """Read at the last real token by attention mask: padding side and batch mates change nothing,
    even though pad == eos and every text ends in eos."""
    from rlhfkit.rewards.scoring import RewardModelScorer

    out, _ = trained_rm
    scorer = RewardModelScorer(str(out / "final"), batch_size=4)
    prompts = ["how tea water?", "how brew a", "why bread yeast dough oven hot?"]
    responses = ["tea is good.", "no", "dough dough is bad and slow, cold and stale."]
    alone = [scorer([p], [r])[0] for p, r in zip(prompts, responses)]
    batched = scorer(prompts, responses)
    assert batched == pytest.approx(alone, abs=1e-5)
    shuffled = scorer(prompts[::-1], responses[::-1])[::-1]
    assert shuffled == pytest.approx(alone, abs=1e-5)
    # explicit left padding
    seqs = [scorer.fmt.encode(p, r)[0] for p, r in zip(prompts, responses)]
    assert all(s[-1] == scorer.tok.eos_token_id == scorer.tok.pad_token_id for s in seqs)
    T = max(map(len, seqs))
    ids = torch.full((3, T), scorer.tok.pad_token_id)
    mask = torch.zeros((3, T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s) :] = torch.tensor(s)
        mask[i, T - len(s) :] = 1
    with torch.no_grad():
        left = sequence_scores(scorer.model, ids, mask).tolist()
    assert left == pytest.approx(alone, abs=1e-5)


def test_scorer_matches_training_template_and_orders_pairs(trained_rm):
    from rlhfkit.rewards.scoring import load_scorer

    out, _ = trained_rm
    scorer = load_scorer(str(out / "final"))
    good, bad = scorer(["how tea hot?"] * 2, ["tea hot is good.", "tea hot is bad."])
    assert good > bad


def test_lora_rm_resume_is_bitwise(tiny_model_dir, pair_file, tmp_path):
    from safetensors.torch import load_file

    args = ["lora.enabled=true", "lora.r=4", "train.max_steps=12", "train.save_every=6"]
    straight = tmp_path / "straight"
    reward.run(rm_cfg(tiny_model_dir, pair_file, straight, *args))
    killed = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "rlhfkit.cli",
        "rm",
        f"out_dir={killed}",
        f"model.name={tiny_model_dir}",
        f"data.path={pair_file}",
        "data.eval_fraction=0.2",
        "data.max_length=64",
        "train.batch_size=8",
        "train.lr=3e-3",
        "train.seed=0",
        *args,
    ]
    import os

    env = {**os.environ, "RLHFKIT_FAULT_KILL_AFTER_STEP": "6"}
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == -9
    proc = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = load_file(straight / "final" / "adapter_model.safetensors")
    b = load_file(killed / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("score" in k for k in a)  # the head is saved with the adapter
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = [r["loss"] for r in read_jsonl(straight / "metrics.jsonl") if "loss" in r]
    lb = [r["loss"] for r in read_jsonl(killed / "metrics.jsonl") if "loss" in r]
    assert la == lb and len(la) == 12


def test_callable_and_spec_errors():
    from rlhfkit.rewards.scoring import load_scorer
    from rlhfkit.runtime.errors import RlhfkitError

    s = load_scorer(lambda ps, rs: [len(r) for r in rs])
    assert s(["a", "b"], ["xx", "yyy"]) == [2.0, 3.0]
    bad = load_scorer(lambda ps, rs: [1.0])
    with pytest.raises(RlhfkitError, match="returned 1 scores for 2"):
        bad(["a", "b"], ["x", "y"])
    with pytest.raises(RlhfkitError, match="not an RM folder"):
        load_scorer("no/such/thing")


def test_real_stackexchange_rm_evaluates_on_unseen_questions(tiny_model_dir, tmp_path, capsys):
    """Issue 4 on real data: Stack Exchange dumps of three sites → `rlhfkit data` splits by question →
    a short rm run; eval/* must come from exactly the held-out pairs, whose questions it never trained on."""
    from transformers import AutoTokenizer

    from rlhfkit.data import build_stackexchange
    from rlhfkit.inputs.pairs import load_pairs
    from rlhfkit.inputs.tables import load_table
    from rlhfkit.rewards.scoring import RewardModelScorer
    from tests.conftest import shared_data

    # the three smallest dumps: 0.8, 1.8 and 2.6 MB (1.5 s for the data stage)
    sites = ["coffee.stackexchange.com", "ai.stackexchange.com", "beer.stackexchange.com"]
    dumps = [shared_data("stackexchange", s, "Posts.xml") for s in sites]
    data = tmp_path / "data"
    build_stackexchange(
        [d.parent for d in dumps],
        data,
        seed=0,
        fractions={"sft": 0.0, "rm_train": 0.6, "rm_eval": 0.4, "rl_prompts": 0.0},
    )
    splits = {s: list(load_table(data, split=s)) for s in ("rm_train", "rm_eval")}

    # Independent length filter: tokenizer called directly on "Question: {p}\n\nAnswer: " and the answer
    # (+ EOS), the two parts tokenized separately as the stage does. The tiny in-process tokenizer (400
    # BPE tokens, learnt on a toy vocabulary) spends ~1 token per character of real text, so 512 (the
    # tiny model's max positions) keeps only the shortest pairs: of 1084 train / 785 held-out pairs,
    # 131 / 45 are kept (held out: 39 beer + 6 ai; coffee's 5 short pairs are all in rm_train), i.e.
    # ~91 % are dropped for length.
    max_length = 512
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def n_tokens(prompt, answer):
        prefix = tok(f"Question: {prompt}\n\nAnswer: ")["input_ids"]
        return len(prefix) + len(tok(answer, add_special_tokens=False)["input_ids"]) + 1  # + EOS

    def fits(row):
        return max(n_tokens(row["prompt"], row["chosen"]), n_tokens(row["prompt"], row["rejected"])) <= max_length

    kept = {s: [r for r in rows if fits(r)] for s, rows in splits.items()}
    held = kept["rm_eval"]
    assert len(held) >= 20 and len({r["site"] for r in held}) >= 2, [len(v) for v in kept.values()]

    out = tmp_path / "rm"
    summary = reward.run(
        load_config(
            reward.RewardConfig,
            overrides=[
                f"out_dir={out}",
                f"model.name={tiny_model_dir}",
                f"data.path={data}",
                f"data.max_length={max_length}",
                "lora.enabled=false",
                "train.batch_size=4",
                "train.lr=1e-3",
                "train.max_steps=10",
                "train.seed=0",
                "eval_batch_size=8",
            ],
        )
    )
    assert f"[rm] {len(kept['rm_train'])} training pairs, {len(held)} held-out pairs" in capsys.readouterr().out

    # (a) The rows the stage trained and evaluated on, re-loaded from its own saved config, are the two
    # splits, and no question (site, id) — nor any question text — is on both sides.
    train_rows, eval_rows = load_pairs(load_config(reward.RewardConfig, out / "config.yaml").data)
    key = lambda r: (r["prompt"], r["chosen"], r["rejected"])  # noqa: E731
    question_of: dict = {}
    for rows in splits.values():
        for r in rows:
            question_of.setdefault(key(r), set()).add((r["site"], r["qid"]))
    assert all(len(q) == 1 for q in question_of.values())
    assert sorted(map(key, train_rows)) == sorted(map(key, splits["rm_train"]))
    assert sorted(map(key, eval_rows)) == sorted(map(key, splits["rm_eval"]))
    trained_q = set().union(*(question_of[key(r)] for r in train_rows))
    eval_q = set().union(*(question_of[key(r)] for r in eval_rows))
    assert trained_q and eval_q and not trained_q & eval_q
    assert not {r["prompt"] for r in train_rows} & {r["prompt"] for r in eval_rows}

    # (b) eval/pairs counts exactly the held-out pairs that pass the length filter.
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if "eval/pairs" in r]
    assert len(evals) == 1 and evals[0]["step"] == 10
    assert evals[0]["eval/pairs"] == summary["eval_pairs"] == len(held)

    # (c) The accuracy is a fraction of exactly those pairs: the per-pair margins, re-scored here by the
    # saved model on our own list of held-out pairs (in split order), match eval_margins.json, and the
    # share of positive margins is eval/accuracy (ties count as wrong).
    acc = evals[0]["eval/accuracy"]
    assert 0.0 <= acc <= 1.0 and acc == summary["eval_accuracy"]
    margins = json.loads((out / "eval_margins.json").read_text())
    scorer = RewardModelScorer(str(out / "final"), batch_size=8, device="cpu")
    prompts = [r["prompt"] for r in held]
    chosen, rejected = scorer(prompts, [r["chosen"] for r in held]), scorer(prompts, [r["rejected"] for r in held])
    mine = [c - r for c, r in zip(chosen, rejected)]
    assert margins == pytest.approx(mine, abs=1e-4)
    assert sum(m > 0 for m in margins) / len(held) == pytest.approx(acc, abs=1e-12)
    assert sum(m == 0 for m in margins) / len(held) == pytest.approx(evals[0]["eval/ties"], abs=1e-12)


def test_truncate_sequence_keeps_prompt_head_and_cue_and_response_head():
    from rlhfkit.inputs.pairs import truncate_sequence
    from rlhfkit.inputs.templates import PROMPT_TAIL

    # prompt 300 tokens (ids 0..299), response 400 (ids 1000..1399), budget 256:
    # the prompt gets half (128 = head 112 + its last 16), the response the other 128.
    ids, mask = list(range(300)) + list(range(1000, 1400)), [0] * 300 + [1] * 400
    cut, cut_mask = truncate_sequence(ids, mask, 256)
    assert len(cut) == len(cut_mask) == 256
    assert cut[:112] == list(range(112)) and cut[112:128] == list(range(300 - PROMPT_TAIL, 300))
    assert cut[128:] == list(range(1000, 1128)) and cut_mask == [0] * 128 + [1] * 128
    # a short prompt is kept whole and the response fills the rest
    cut, cut_mask = truncate_sequence(list(range(50)) + list(range(1000, 1400)), [0] * 50 + [1] * 400, 256)
    assert cut == list(range(50)) + list(range(1000, 1206)) and sum(cut_mask) == 206
    # a long prompt with a short response gives the prompt what the response leaves
    cut, cut_mask = truncate_sequence(list(range(300)) + [1000] * 50, [0] * 300 + [1] * 50, 256)
    assert cut[:190] == list(range(190)) and cut[190:206] == list(range(284, 300)) and sum(cut_mask) == 50
    # within the budget: unchanged
    assert truncate_sequence([1, 2, 3], [0, 1, 1], 3) == ([1, 2, 3], [0, 1, 1])


def test_encode_pairs_drops_or_cuts_over_long_pairs(tiny_model_dir):
    from transformers import AutoTokenizer

    from rlhfkit.inputs.pairs import encode_pairs
    from rlhfkit.inputs.templates import PromptFormat, TemplateConfig

    fmt = PromptFormat(TemplateConfig(), AutoTokenizer.from_pretrained(tiny_model_dir))
    rows = [
        {"prompt": "how tea water? " * 20, "chosen": "tea is good. " * 30, "rejected": "no"},
        {"prompt": "why?", "chosen": "yes", "rejected": "no"},
    ]
    assert len(encode_pairs(rows, fmt, 64)) == 1  # the long pair is dropped
    kept = encode_pairs(rows, fmt, 64, truncate=True)
    assert len(kept) == 2
    long = kept[0]
    assert len(long["chosen_ids"]) == 64 and len(long["rejected_ids"]) <= 64
    assert sum(long["chosen_mask"]) > 0 and sum(long["rejected_mask"]) > 0  # both keep response tokens
    assert long["chosen_ids"] != long["rejected_ids"]


def test_lora_on_top_layers_only_with_all_linear(tiny_model_dir):
    """lora.num_layers_unfrozen with the 'all-linear' shorthand (peft refuses the pair as such):
    adapters on every linear layer of the top blocks, none below, head trainable."""
    from rlhfkit.models.loading import LoraConfig, ModelConfig, load_model

    model, _ = load_model(
        ModelConfig(name=str(tiny_model_dir)),
        LoraConfig(target_modules=["all-linear"], num_layers_unfrozen=1),
        kind="seq_cls",
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    lora_layers = {n.split("layers.")[1].split(".")[0] for n in trainable if "lora_" in n}
    assert lora_layers == {"1"}  # the tiny model has 2 blocks: only the top one is adapted
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert any("score" in n for n in trainable)


def test_eval_reports_the_longer_answer_baseline(tiny_model_dir):
    from transformers import AutoTokenizer

    from rlhfkit.inputs.pairs import encode_pairs
    from rlhfkit.inputs.templates import PromptFormat, TemplateConfig
    from rlhfkit.models.loading import LoraConfig, ModelConfig, load_model

    model, tok = load_model(ModelConfig(name=str(tiny_model_dir)), LoraConfig(enabled=False), kind="seq_cls")
    fmt = PromptFormat(TemplateConfig(), AutoTokenizer.from_pretrained(tiny_model_dir))
    rows = [
        {"prompt": "how tea?", "chosen": "tea is good and hot water", "rejected": "no"},  # chosen longer
        {"prompt": "why bread?", "chosen": "bread dough oven", "rejected": "yes"},  # chosen longer
        {"prompt": "how oven?", "chosen": "hot oven bread dough water", "rejected": "oven"},  # chosen longer
        {"prompt": "why?", "chosen": "no", "rejected": "bread is good and hot"},
    ]  # rejected longer
    pairs = encode_pairs(rows, fmt, 64)
    assert [len(p["chosen_ids"]) > len(p["rejected_ids"]) for p in pairs] == [True, True, True, False]
    stats = reward.evaluate_pairs(model, pairs, tok.pad_token_id, batch_size=3)  # uneven batches: 3 + 1
    assert stats["longer_wins"] == stats["longer_wins_seen"] == 0.75 and stats["pairs"] == 4


def long_pairs() -> list[dict]:
    """Hand-built pairs scored by the good/bad RM, lengths chosen so that the answers are known:
    pairs 0-1 length-matched (ratios 1.125, 1.0), in 2-3 the rejected answer is longer (1.96x, 1.49x), and
    every answer of pairs 2-3 is cut at 64 tokens, so on the tokens the RM sees neither side is longer."""
    long = "tea water hot cold " * 12
    return [
        {"prompt": "how tea hot?", "chosen": "tea hot is good.", "rejected": "tea hot is so bad."},  # 16 vs 18
        {"prompt": "how brew?", "chosen": "brew bean is good.", "rejected": "brew bean is bad.."},  # 18 vs 18
        {"prompt": "why milk?", "chosen": long + "is good.", "rejected": long * 2 + "is bad."},
        {"prompt": "why salt?", "chosen": long * 2 + "is good.", "rejected": long * 3 + "is bad."},
    ]


def test_rm_eval_worked_example_full_text_vs_truncated(trained_rm, tmp_path, capsys):
    from rlhfkit.algorithms.preference_eval import length_aware_metrics
    from rlhfkit.cli import main
    from rlhfkit.rewards.scoring import RewardModelScorer

    out, _ = trained_rm
    rows = long_pairs()
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res_path = tmp_path / "res.json"
    assert main(["rm-eval", str(out), str(src), f"out={res_path}", "batch_size=3"]) == 0  # the run folder: final/ used
    printed = json.loads(capsys.readouterr().out.split("\n", 2)[-1])
    res = json.loads(res_path.read_text())
    assert printed["sources"] == res["sources"] and res["max_length"] == 64 and res["heads"] == ["reward"]
    got = res["sources"][0]
    assert got["pairs"] == 4 and got["answers_cut"] == 2
    assert got["longer_wins"] == 0.0  # full text: the chosen answer is never the longer one
    assert got["longer_wins_seen"] == 0.0 and got["matched_pairs"] == 2  # pairs 0, 1
    # the same numbers from the scorer's own margins and lengths counted here by hand
    scorer = RewardModelScorer(str(out / "final"))
    ps = [r["prompt"] for r in rows]
    m = [a - b for a, b in zip(scorer(ps, [r["chosen"] for r in rows]), scorer(ps, [r["rejected"] for r in rows]))]
    want = length_aware_metrics(m, [len(r["chosen"]) for r in rows], [len(r["rejected"]) for r in rows])
    assert got["matched_accuracy"] == want["matched_accuracy"] == sum(x > 0 for x in m[:2]) / 2
    for k in ("accuracy", "length_agreement", "length_controlled_accuracy", "margin"):
        assert got[k] == pytest.approx(want[k], abs=1e-5)
    assert [b["pairs"] for b in got["bins"]] == [2, 1, 1, 0, 0]  # 236 vs 463 chars: 1.96; 464 vs 691: 1.49


def test_rm_eval_bad_inputs_end_in_one_line(trained_rm, tiny_model_dir, tmp_path, capsys):
    from rlhfkit.cli import main

    out, _ = trained_rm
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps(long_pairs()[0]) + "\n")
    theirs = tmp_path / "theirs.json"
    theirs.write_text("{}")
    cases = [
        (["rm-eval", str(tmp_path / "nope"), str(good)], 1, "no such reward-model folder"),
        (["rm-eval", str(tiny_model_dir), str(good)], 1, "not a reward model"),
        (["rm-eval", str(out)], 2, "usage: rlhfkit rm-eval RM_DIR PAIRS"),
        (["rm-eval", str(out), str(tmp_path / "missing.jsonl")], 1, "missing.jsonl"),
        (["rm-eval", str(out), str(good), f"out={theirs}"], 2, "was not written by rm-eval"),
        (["rm-eval", str(out), str(good), "max_pairz=3"], 2, "max_pairz"),
    ]
    for argv, code, msg in cases:
        assert main(argv) == code, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and msg in err, (argv, err)
    assert theirs.read_text() == "{}"


@pytest.mark.parametrize("lora", ["true", "false"])
def test_cached_trunk_trains_exactly_as_the_whole_model(tiny_model_dir, pair_file, tmp_path, lora, capsys):
    """num_layers_unfrozen=1 of 2 blocks: the lower block runs once per pair, the top one every step;
    the loss curve, held-out numbers and saved weights equal those of the uncached run (LoRA dropout
    0.1 on in the top block, so the dropout masks must line up too)."""
    from safetensors.torch import load_file

    args = [f"lora.enabled={lora}", "lora.r=4", "lora.dropout=0.1", "lora.num_layers_unfrozen=1"]
    args += ["train.max_steps=6", "train.eval_every=3", "data.max_eval_samples=24"]
    runs = {}
    for cache in ("true", "false"):
        out = tmp_path / cache
        reward.run(rm_cfg(tiny_model_dir, pair_file, out, *args, f"cache_trunk={cache}"))
        runs[cache] = out
    log = capsys.readouterr().out
    assert "cache_trunk: 1 frozen blocks run once over" in log and "training runs the top 1" in log
    la, lb = (read_jsonl(runs[c] / "metrics.jsonl") for c in ("true", "false"))
    assert len(la) == len(lb) == 6 + 2
    for a, b in zip(la, lb):
        assert a.keys() == b.keys()
        for k in a:
            if k.startswith(("loss", "accuracy", "margin", "grad_norm", "eval/")) and isinstance(a[k], float):
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-5), k
    name = "adapter_model.safetensors" if lora == "true" else "model.safetensors"
    wa, wb = (load_file(runs[c] / "final" / name) for c in ("true", "false"))
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5
    losses = [r["loss"] for r in la if "loss" in r]
    assert len(set(losses)) == 6  # it trained: every step's loss differs


def test_odin_rm_records_its_heads_and_scores_with_the_quality_head(tiny_model_dir, pair_file, tmp_path, capsys):
    """An ODIN RM folder names its heads; the scorer PPO uses reads head 0 (quality) with no option,
    the stage's held-out record and rm-eval report every head and their sum, with length correlations."""
    from rlhfkit.cli import main
    from rlhfkit.models.forward import sequence_scores
    from rlhfkit.models.trunk import pad
    from rlhfkit.rewards.scoring import load_scorer

    out = tmp_path / "odin"
    summary = reward.run(rm_cfg(tiny_model_dir, pair_file, out, "odin.enabled=true", "train.max_steps=8"))
    final = out / "final"
    assert json.loads((final / "reward_heads.json").read_text())["heads"] == ["quality", "length"]
    for k in ("quality/accuracy", "length/accuracy", "sum/accuracy", "quality/length_corr", "length/length_corr"):
        assert f"eval_{k}" in summary, k
    assert summary["eval_accuracy"] == summary["eval_quality/accuracy"]  # the main numbers are the quality head's
    train = [r for r in read_jsonl(out / "metrics.jsonl") if "quality_length_corr" in r]
    assert len(train) == 8
    scorer = load_scorer(str(final))
    assert scorer.model.config.num_labels == 2
    prompts, responses = ["how tea hot?"] * 2, ["tea hot is good.", "tea hot is bad and cold and slow."]
    ids, mask = pad([scorer._encode(p, r) for p, r in zip(prompts, responses)], scorer.tok.pad_token_id)
    with torch.no_grad():
        both = sequence_scores(scorer.model, ids, mask, head=None)
    assert both.shape == (2, 2)
    assert scorer(prompts, responses) == pytest.approx(both[:, 0].tolist(), abs=1e-5)
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in long_pairs()))
    capsys.readouterr()
    assert main(["rm-eval", str(final), str(src), f"out={tmp_path / 'r.json'}"]) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["heads"] == ["quality", "length"]
    got = res["sources"][0]
    assert {"quality/matched_accuracy", "length/length_corr", "sum/accuracy"} <= got.keys()


def test_cached_trunk_refuses_states_over_its_memory_cap(tiny_model_dir, pair_file, tmp_path, capsys):
    args = ["lora.num_layers_unfrozen=1", "lora.r=4", "train.max_steps=1", "cache_trunk_max_gib=1e-9"]
    reward.run(rm_cfg(tiny_model_dir, pair_file, tmp_path / "rm", *args))
    assert "cache_trunk: off (0.0 GiB of states > cache_trunk_max_gib=1e-09)" in capsys.readouterr().out
