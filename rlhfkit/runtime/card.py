"""The model card (README.md in the Hub's format) of a stage output: YAML metadata (base_model,
library_name, tags, datasets, license when known), what the model is, the chain of stages and inputs
that made it (read back from the saved configs, runtime.rundir.lineage), its headline figures (the
same rundir figures the report shows), the prompt template, and how to load it.

Written by StageRun.save_final into every final/ (so every trained stage gets one without code of
its own), by `rlhfkit merge` into the merged folder, and refreshed by `rlhfkit run` (eval figures
appear once the eval stage has run) and by `rlhfkit push` (the snippets name the repo). A README.md
without CARD_MARK (other than peft's blank template) was written by someone else and is never replaced.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from rlhfkit.runtime import rundir
from rlhfkit.runtime.hub import KNOWN_LICENSES, hub_id
from rlhfkit.runtime.io import atomic_write_text

CARD = "README.md"
CARD_MARK = "<!-- rlhfkit model card: rlhfkit rewrites this file; delete this line to keep your own edits -->"
STAGE_TAGS = {"sft": ["sft"], "rm": ["reward-model"], "dpo": ["dpo"], "merge": ["merged"]}
STAGE_NAMES = {"sft": "supervised fine-tune", "rm": "reward model", "dpo": "DPO policy", "merge": "merged model"}


def _kind(folder: Path) -> tuple[bool, bool]:
    """(is an adapter, is a reward model / sequence classifier)."""
    adapter = rundir.read_json(folder / "adapter_config.json")
    if isinstance(adapter, dict):
        return True, adapter.get("task_type") == "SEQ_CLS"
    config = rundir.read_json(folder / "config.json")
    archs = config.get("architectures") if isinstance(config, dict) else None
    return False, any("SequenceClassification" in a for a in archs or [])


def _base(folder: Path, base: str) -> tuple[str | None, str]:
    """(Hub id of the base model or None, the base as shown): an adapter's own base first (save_model
    made it portable), else the chain's starting model."""
    adapter = rundir.read_json(folder / "adapter_config.json")
    name = adapter.get("base_model_name_or_path") if isinstance(adapter, dict) else None
    for cand in (name, base):
        if isinstance(cand, str) and hub_id(cand):
            return hub_id(cand), hub_id(cand)
    return None, base or (name or "?")


def _license(base_id: str | None) -> str | None:
    if base_id is None:
        return None
    if base_id in KNOWN_LICENSES:
        return KNOWN_LICENSES[base_id]
    try:  # the base's own card, if this machine has it cached (never a download)
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(base_id, CARD)
    except Exception:
        return None
    if not isinstance(path, str):
        return None
    meta = front_matter(Path(path).read_text(encoding="utf-8", errors="replace"))
    lic = meta.get("license")
    return lic if isinstance(lic, str) else None


def front_matter(text: str) -> dict:
    """The YAML header of a card ({} when there is none)."""
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---", 4)
    try:
        data = yaml.safe_load(text[4:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _datasets(steps: list[rundir.Step]) -> list[str]:
    """Hub dataset ids among the inputs (a data stage folder contributes its hub sources)."""
    out: list[str] = []
    for s in steps:
        for path in (rundir.get(s.config, "data.path"), rundir.get(s.config, "prompts.path")):
            if not isinstance(path, str):
                continue
            cands = [path]
            data_cfg = rundir.read_config(Path(path) / "config.yaml") if Path(path).is_dir() else {}
            cands += [p for p in data_cfg.get("paths") or [] if isinstance(p, str)]
            out += [c for c in cands if hub_id(c) == c and c not in out]
    return out


def _figures(folder: Path, steps: list[rundir.Step], stage_dir: Path | None) -> list[rundir.Figure]:
    """Each step's own figures (from its stage folder's metrics), the RM an RL step maximised, and
    the eval stage's comparison of this folder."""
    by_stage = {"sft": rundir.sft_figures, "rm": rundir.rm_figures, "ppo": rundir.rl_figures, "dpo": rundir.dpo_figures}
    figs: list[rundir.Figure] = []
    for s in reversed(steps):
        sd = (
            stage_dir
            if (s is steps[0] and stage_dir is not None)
            else (s.folder.parent if s.folder.name == "final" else None)
        )
        if sd is not None and s.stage in by_stage:
            figs += by_stage[s.stage](sd)
        reward = s.config.get("reward") if s.stage == "ppo" else None
        if isinstance(reward, str) and Path(reward).name == "final" and Path(reward).is_dir():
            figs += [f for f in rundir.rm_figures(Path(reward).parent) if f not in figs]
    c = _evaluated_as(folder, (stage_dir or folder.parent).parent)
    return figs + (rundir.eval_figures(c) if c is not None else [])


def _evaluated_as(folder: Path, run: Path) -> rundir.Comparison | None:
    """The eval stage's comparison of this folder, when the eval ran after the folder was written."""
    metrics, cfg = run / "eval" / "metrics.json", rundir.read_config(run / "eval" / "config.yaml")
    mine = folder / "config.yaml"
    if not metrics.exists() or not mine.exists() or metrics.stat().st_mtime < mine.stat().st_mtime:
        return None
    for spec in cfg.get("models") or []:
        name, _, path = str(spec).rpartition("=")
        try:
            same = Path(path).resolve() == folder.resolve()
        except OSError:
            same = False
        if same:
            return rundir.comparison(run, name or (Path(path).parent.name if Path(path).name == "final" else path))
    return None


def _num(v: float | None, percent: bool) -> str:
    if v is None:
        return "—"
    return f"{v:.1%}" if percent else f"{v:.4g}"


def _template(cfg: dict) -> str:
    t = cfg.get("template") if isinstance(cfg.get("template"), dict) else {}
    if t.get("chat_template"):
        return "The tokenizer's chat template (`template.chat_template: true`): one user turn, then the answer."
    text = t.get("template")
    return f"```text\n{text}\n```\n\n`{{prompt}}` is the question, `{{response}}` the answer." if text else ""


def _load_snippet(repo: str, base_id: str | None, adapter: bool, reward: bool, on_hub: bool) -> str:
    auto = "AutoModelForSequenceClassification" if reward else "AutoModelForCausalLM"
    if adapter and reward:
        py = (
            f"from peft import PeftModel\nfrom transformers import {auto}, AutoTokenizer\n\n"
            f'base = {auto}.from_pretrained("{base_id or "BASE_MODEL"}", num_labels=1)\n'
            f'model = PeftModel.from_pretrained(base, "{repo}")\ntokenizer = AutoTokenizer.from_pretrained("{repo}")\n'
            "score = model(**tokenizer(prompt + response, return_tensors='pt')).logits[0, 0]  # higher = better"
        )
    elif adapter:
        py = (
            "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{repo}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")\nmodel = model.merge_and_unload()  # optional'
        )
    else:
        py = (
            f"from transformers import {auto}, AutoTokenizer\n\n"
            f'model = {auto}.from_pretrained("{repo}"{", num_labels=1" if reward else ""})\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")'
        )
    use = (
        "rlhfkit ppo reward=./model ...     # as the reward of an RL stage"
        if reward
        else "rlhfkit chat ./model              # chat in the browser\n"
        "rlhfkit eval models=[./model] rm=... prompts.path=...   # or start a next stage from it: model.name=./model"
    )
    fetch = f"hf download {repo} --local-dir model" if on_hub else "cp -r path/to/this/folder model"
    lib = "transformers + peft" if adapter else "transformers"
    return f"With {lib}:\n\n```python\n{py}\n```\n\nWith rlhfkit:\n\n```bash\n{fetch}\n{use}\n```"


def metadata(steps: list[rundir.Step], base_id: str | None, adapter: bool, reward: bool) -> dict:
    """The card's YAML header: base_model (a Hub id only), library_name, pipeline_tag, license, tags, datasets."""
    tags = ["rlhfkit", "rlhf"]
    for s in steps:
        got = (
            [rundir.algo_name(s.config).lower().replace("++", "-pp")]
            if s.stage == "ppo"
            else STAGE_TAGS.get(s.stage, [])
        )
        tags += [t for t in got if t not in tags]
    tags += ["lora", "peft"] if adapter else []
    meta: dict = {"base_model": base_id} if base_id else {}
    meta["library_name"] = "peft" if adapter else "transformers"
    meta["pipeline_tag"] = "text-classification" if reward else "text-generation"
    lic = _license(base_id)
    if lic:
        meta["license"] = lic
    meta["tags"] = tags
    datasets = _datasets(steps)
    if datasets:
        meta["datasets"] = datasets
    return meta


def _tables(steps: list[rundir.Step], figs: list[rundir.Figure]) -> list[str]:
    lines = ["## How it was made", "", "| # | stage | started from | trained on | output |", "|---|---|---|---|---|"]
    for i, s in enumerate(reversed(steps), 1):
        name = f"RL ({rundir.algo_name(s.config)})" if s.stage == "ppo" else s.stage
        out = f"{s.folder.resolve().parent.name}/{s.folder.name}"
        lines.append(f"| {i} | {name} | `{s.start}` | {'; '.join(s.inputs) or '—'} | `{out}` |")
    if figs:
        lines += [
            "",
            "## Results",
            "",
            "| figure | before | after | baseline / note | source |",
            "|---|---|---|---|---|",
        ]
        for f in figs:
            note = f"{f.baseline_label}: {_num(f.baseline, f.percent)}" if f.baseline is not None else f.note
            before, after = _num(f.before, f.percent), _num(f.after, f.percent)
            lines.append(f"| {f.label} | {before} | {after} | {note} | `{f.source}` |")
    return lines


def card_text(
    folder: str | os.PathLike,
    stage: str | None = None,
    stage_dir: str | os.PathLike | None = None,
    repo_id: str | None = None,
    final: str | os.PathLike | None = None,
) -> str:
    """The card of `folder` (a final/ or merged folder). `stage`/`stage_dir` name the stage that is
    writing it, `final` where the folder will be (it may still be a temporary one); `repo_id` goes
    into the loading snippets."""
    folder = Path(folder)
    sd = Path(stage_dir) if stage_dir is not None else None
    shown = Path(final) if final is not None else (sd / "final" if sd is not None else folder)
    steps, base = rundir.lineage(folder)
    if steps and stage:
        steps[0].stage = stage
    if steps:
        steps[0].folder = shown
    adapter, reward = _kind(folder)
    base_id, base_shown = _base(folder, base)
    top = steps[0] if steps else None
    trained = next((s for s in steps if s.stage != "merge"), None)
    what = STAGE_NAMES.get(trained.stage, "RL policy") if trained else "model"
    if top and top.stage == "merge":
        what = f"merged {what}"
    algo = rundir.algo_name(trained.config) if trained and trained.stage == "ppo" else None
    meta = metadata(steps, base_id, adapter, reward)
    header = "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"
    title = f"{what}{f' trained with {algo}' if algo else ''} from {base_shown}"
    name = repo_id or f"{shown.resolve().parent.name}/{shown.name}"
    lines = [header, f"# {name}: {title}", "", CARD_MARK, ""]
    kind = ("a LoRA adapter" if adapter else "a full model") + (" (reward model: one scalar score)" if reward else "")
    lines += [
        f"This is {kind}, made with [rlhfkit](https://pypi.org/project/rlhfkit/): {rundir.describe(steps, base)}.",
        "",
    ]
    if base_id is None:
        lines += [f"The base model `{base_shown}` is not a Hub id (a folder on the machine that trained this).", ""]
    lines += _tables(steps, _figures(folder, steps, sd))
    template = _template(trained.config) if trained else ""
    if template:
        lines += ["", "## Prompt template", "", template]
    lines += [
        "",
        "## How to load",
        "",
        _load_snippet(repo_id or "path/to/this/folder", base_id, adapter, reward, repo_id is not None),
    ]
    if top:
        cfg = {k: v for k, v in top.config.items() if k not in ("out_dir", "overwrite", "resume")}
        dump = yaml.safe_dump(cfg, sort_keys=False).rstrip()
        lines += ["", "<details><summary>Stage config</summary>", "", "```yaml", dump, "```", "", "</details>"]
    return "\n".join(lines).rstrip() + "\n"


PEFT_TEMPLATE = "<!-- Provide a quick summary of what the model is/does. -->"  # peft's save_pretrained card


def replaceable(text: str) -> bool:
    """rlhfkit's own card, or the blank template peft's save_pretrained writes (runs made before cards)."""
    return CARD_MARK in text or (PEFT_TEMPLATE in text and "[More Information Needed]" in text)


def write_card(folder, stage=None, stage_dir=None, repo_id=None, force: bool = False, final=None):
    """Write folder/README.md unless it is someone else's card (no CARD_MARK) and not `force`
    (save_final forces: the folder is new, and peft's save_pretrained leaves a template card there).
    Returns the path written, or None."""
    path = Path(folder) / CARD
    if path.exists() and not force and not replaceable(path.read_text(encoding="utf-8", errors="replace")):
        return None
    atomic_write_text(path, card_text(folder, stage, stage_dir, repo_id, final))
    return path


def refresh_cards(run: str | os.PathLike) -> list[Path]:
    """Rewrite the rlhfkit cards of every <stage>/final/ in a run directory (after its eval ran)."""
    written = []
    for stage in rundir.STAGE_DIRS:
        final = Path(run) / stage / "final"
        if (final / CARD).exists() and (final / "config.yaml").exists():
            got = write_card(final, stage_dir=final.parent)
            if got:
                written.append(got)
    return written
