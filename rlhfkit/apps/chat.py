"""`rlhfkit chat MODEL_OR_RUN`: talk to a model in the browser (Gradio), answers streamed as they
are generated.

MODEL_OR_RUN is a model folder, an adapter folder (loaded on its base and merged), a hub id, the
offline default `SmolLM2-135M-Instruct`, or a run directory (its ppo/final, else dpo/final, else
sft/final; a stage folder with a final/ inside works too).

The prompt format is, in order: --template; the `template:` section of the config.yaml that the
stage wrote beside the model (MODEL/config.yaml, then its parent's, as in RUN/sft/final →
RUN/sft/config.yaml); the tokenizer's chat template; `Question: {prompt}\\n\\nAnswer: `.

For code and tests: `stream_reply(model, tokenizer, message, history)` yields the growing reply, and
`build_app(model, tokenizer, ...)` returns the Gradio Blocks without launching it. Gradio's
analytics and version check are off and no share link is ever made: the app only listens on
--host (127.0.0.1 by default).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfkit.inputs.templates import STACKLLAMA_TEMPLATE, split_template
from rlhfkit.runtime.errors import RlhfkitError
from rlhfkit.runtime.io import missing_path

# Before gradio is imported anywhere: no telemetry, no version check against the network.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

PROG = "rlhfkit chat"
DEFAULT_TEMPLATE = split_template(STACKLLAMA_TEMPLATE)[0]  # the stages' default, up to the answer
RUN_STAGES = ("ppo", "dpo", "sft")
EMPTY_REPLY = "(the model ended its reply without producing any text)"


class ChatError(RlhfkitError):
    """A model argument or option that cannot be used (printed without a traceback)."""


# --------------------------------------------------------------------------- model & template
def resolve_model(name: str) -> str:
    """A run directory → its best final model (ppo, then dpo, then sft); anything else unchanged."""
    path = Path(name).expanduser()
    missing = missing_path(name, "model path")  # the loader's own rule for a mistyped local path
    if missing is not None:
        raise ChatError(str(missing))
    if not path.is_dir():
        return name  # hub id, default model name, .gguf file: the loader resolves (or rejects) it
    if (path / "config.json").exists() or (path / "adapter_config.json").exists():
        return str(path)
    for stage in RUN_STAGES:
        if (path / stage / "final").is_dir():
            return str(path / stage / "final")
    if (path / "final").is_dir():  # a stage folder
        return str(path / "final")
    raise ChatError(
        f"{path} is neither a model folder (config.json or adapter_config.json) nor a run directory "
        f"with {', '.join(s + '/final' for s in RUN_STAGES)}"
    )


@dataclass(frozen=True)
class Template:
    """How a conversation becomes the text the model continues."""

    text: str | None  # a text template with {prompt}; None = the tokenizer's chat template
    source: str = "default"

    @property
    def is_chat(self) -> bool:
        return self.text is None

    def describe(self) -> str:
        return f"tokenizer chat template ({self.source})" if self.is_chat else f"{self.text!r} ({self.source})"


def _text_template(text: str, source: str) -> Template:
    t, _ = split_template(text)  # a stage's full template: the model continues what precedes the response
    if "{prompt}" not in t:
        raise ChatError(f"template from {source} has no {{prompt}} placeholder: {text!r}")
    return Template(t, source)


def _stage_template(model_dir: Path) -> tuple[dict, Path] | None:
    """The `template:` section of the config.yaml written beside a model (its folder, its parent, or
    its grandparent for checkpoints/step-N)."""
    import yaml

    for folder in (model_dir, model_dir.parent, model_dir.parent.parent):
        cfg_path = folder / "config.yaml"
        if not cfg_path.is_file():
            continue
        try:
            cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(cfg, dict) and isinstance(cfg.get("template"), dict):
            return cfg["template"], cfg_path
    return None


def resolve_template(model_dir: str | os.PathLike | None, tokenizer, override: str | None = None) -> Template:
    """--template, else the stage's config.yaml, else the tokenizer's chat template, else StackLLaMA's."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if override:
        if override.strip().lower() == "chat":
            if not has_chat:
                raise ChatError("--template chat: this tokenizer has no chat template")
            return Template(None, "--template")
        return _text_template(override.replace("\\n", "\n").replace("\\t", "\t"), "--template")
    if model_dir is not None and Path(model_dir).is_dir():
        found = _stage_template(Path(model_dir))
        if found is not None:
            section, path = found
            if section.get("chat_template") and has_chat:
                return Template(None, str(path))
            if section.get("template"):
                return _text_template(str(section["template"]), str(path))
    if has_chat:
        return Template(None, "tokenizer")
    return Template(DEFAULT_TEMPLATE, "default")


def content_text(content: Any) -> str:
    """The text of a chat message's content (a string, a Gradio content list, or a dict)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        if "text" in content:
            return str(content["text"])
        return content_text(content.get("content")) if "content" in content else ""
    if isinstance(content, (list, tuple)):
        return "".join(content_text(c) for c in content)
    return str(content)


def normalize_history(history: Iterable[Any] | None) -> list[dict]:
    """[{"role", "content": str}] from Gradio's messages, OpenAI-style dicts or (user, bot) pairs."""
    out: list[dict] = []
    for item in history or ():
        if isinstance(item, dict):
            role = item.get("role")
            if role in ("user", "assistant", "system"):
                out.append({"role": role, "content": content_text(item.get("content"))})
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            user, bot = item
            if user is not None:
                out.append({"role": "user", "content": content_text(user)})
            if bot is not None:
                out.append({"role": "assistant", "content": content_text(bot)})
        elif hasattr(item, "role") and hasattr(item, "content"):
            out.append({"role": item.role, "content": content_text(item.content)})
    return out


def build_prompt(tokenizer, template: Template, message: str, history: Sequence[dict] = ()) -> str:
    """The text the model continues: earlier turns, then `message`, then the answer cue."""
    if template.is_chat:
        msgs = [dict(m) for m in history] + [{"role": "user", "content": message}]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    parts, pending = [], None
    for m in history:
        if m["role"] == "user":
            pending = m["content"]
        elif m["role"] == "assistant" and pending is not None:
            parts.append(template.text.replace("{prompt}", pending) + m["content"] + "\n\n")
            pending = None
    return "".join(parts) + template.text.replace("{prompt}", message)


def _encode(tokenizer, template: Template, message: str, history: list[dict], budget: int | None) -> list[int]:
    """Token ids of the prompt; the oldest turns are dropped (then the oldest tokens) to fit `budget`."""
    history = list(history)
    while True:
        text = build_prompt(tokenizer, template, message, history)
        # a chat template writes its own special tokens; a text template gets BOS (if any) as in training
        ids = tokenizer(text, add_special_tokens=not template.is_chat)["input_ids"]
        if budget is None or len(ids) <= budget or not history:
            break
        history = history[2:] if len(history) >= 2 else []
    if budget is not None and len(ids) > budget:
        ids = ids[-budget:]
    return ids


def _context_size(model) -> int | None:
    cfg = getattr(model, "config", None)
    n = None
    if cfg is not None:
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        n = getattr(text_cfg, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 1 else None


# --------------------------------------------------------------------------- generation
def stream_reply(
    model,
    tokenizer,
    message: str,
    history: Iterable[Any] | None = None,
    *,
    template: Template | str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.95,
    timeout: float | None = 300.0,
) -> Iterator[str]:
    """Generate a reply to `message` after `history`, yielding the reply so far after each new piece
    of text (each yield extends the previous one). temperature 0 = greedy.

    Generation runs in a worker thread feeding a TextIteratorStreamer; closing this generator early
    (a stopped or abandoned request) stops the worker at its next token and joins it.
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    if not isinstance(template, Template):
        template = resolve_template(None, tokenizer, template)
    if max_new_tokens < 1:
        raise ChatError("max_new_tokens must be at least 1")
    ids, max_new_tokens = _prompt_ids(model, tokenizer, template, message, history, max_new_tokens)
    input_ids = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)

    stop = threading.Event()

    class _StopFlag(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return stop.is_set()

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=timeout)
    kwargs: dict[str, Any] = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=int(max_new_tokens),
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        stopping_criteria=StoppingCriteriaList([_StopFlag()]),
        **_sampling_kwargs(temperature, top_p),
    )
    yield from _generate_in_thread(model, kwargs, streamer, stop)


def _generate_in_thread(model, kwargs: dict, streamer, stop: threading.Event) -> Iterator[str]:
    """Run model.generate(**kwargs) in a worker thread and yield the growing text it streams out."""
    import torch

    errors: list[BaseException] = []

    def work() -> None:
        try:
            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as exc:  # surfaced to the consumer below
            errors.append(exc)
            streamer.end()

    worker = threading.Thread(target=work, name="rlhfkit-chat-generate", daemon=True)
    was_training = model.training
    model.eval()
    worker.start()
    text = ""
    try:
        for piece in streamer:
            if piece:
                text += piece
                yield text
        worker.join()
        if errors:
            raise errors[0]
    finally:
        # closing stream_reply early closes this generator too (yield from): stop the worker and join it
        stop.set()
        worker.join(timeout=60)
        if was_training and not worker.is_alive():
            model.train()


def _sampling_kwargs(temperature: float, top_p: float) -> dict:
    if temperature and temperature > 0:
        return dict(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
    return dict(do_sample=False, temperature=None, top_p=None, top_k=None)  # greedy


def _prompt_ids(model, tokenizer, template: Template, message, history, max_new_tokens: int):
    """The prompt's token ids (history cut from the front to fit) and the reply's token budget."""
    n_ctx = _context_size(model)
    # the prompt keeps at least half the context; the reply gets what is left, up to max_new_tokens
    budget = max(n_ctx // 2, n_ctx - max_new_tokens) if n_ctx else None
    ids = _encode(tokenizer, template, content_text(message), normalize_history(history), budget)
    if not ids:  # an empty message with a bare "{prompt}" template: start from BOS/EOS
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [start if start is not None else 0]
    if n_ctx:
        max_new_tokens = max(1, min(max_new_tokens, n_ctx - len(ids)))
    return ids, max_new_tokens


# --------------------------------------------------------------------------- app
def build_app(
    model,
    tokenizer,
    *,
    template: Template | str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.95,
    title: str | None = None,
    description: str | None = None,
):
    """The chat UI as a `gradio.Blocks` (not launched): a ChatInterface whose replies stream from
    `stream_reply`, with max-new-tokens and temperature sliders."""
    import gradio as gr

    if not isinstance(template, Template):
        template = resolve_template(None, tokenizer, template)
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    title = title or "rlhfkit chat"
    description = description or f"Model: `{name}` · prompt format: {template.describe()}"

    respond = _responder(model, tokenizer, template, top_p)
    # ChatInterface is itself a Blocks; built outside any other Blocks, its additional inputs land
    # in the accordion under the chat instead of above it.
    app = gr.ChatInterface(
        respond,
        chatbot=gr.Chatbot(
            elem_id="rlhfkit-chatbot", label="chat", height=460, feedback_options=None, buttons=["copy", "copy_all"]
        ),
        textbox=gr.Textbox(
            elem_id="rlhfkit-input",
            placeholder="Ask a question and press Enter",
            lines=1,
            max_lines=8,
            submit_btn=True,
            stop_btn=True,
            show_label=False,
        ),
        additional_inputs=[
            gr.Slider(1, max(2048, int(max_new_tokens)), value=int(max_new_tokens), step=1, label="max new tokens"),
            gr.Slider(0.0, 2.0, value=float(temperature), step=0.05, label="temperature (0 = greedy)"),
        ],
        additional_inputs_accordion=gr.Accordion("Generation settings", open=False),
        title=title,
        description=description,
        analytics_enabled=False,
        flagging_mode="never",
        save_history=False,
        fill_height=True,
        api_name="chat",
    )
    return app


def _responder(model, tokenizer, template: Template, top_p: float):
    """The ChatInterface callback: stream_reply with the sliders' settings, never an empty reply."""

    def respond(message, history, max_tokens, temp):
        last = ""
        for last in stream_reply(
            model,
            tokenizer,
            content_text(message),
            history,
            template=template,
            max_new_tokens=int(max_tokens),
            temperature=float(temp),
            top_p=top_p,
        ):
            yield last
        if not last.strip():  # say so rather than leave an empty bubble
            yield EMPTY_REPLY

    return respond


def load(model_or_run: str, *, dtype: str = "float32", device: str = "auto"):
    """(model, tokenizer, model_dir) for MODEL_OR_RUN, in eval mode on `device`."""
    import torch

    from rlhfkit.models.loading import LoraConfig, ModelConfig, load_model

    target = resolve_model(model_or_run)
    model, tokenizer = load_model(
        ModelConfig(name=target, dtype=dtype), LoraConfig(enabled=False), trainable=False, verbose=False
    )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not getattr(model, "hf_device_map", None):  # quantized models are placed by their loader
        model.to(device)
    model.eval()
    return model, tokenizer, target


def _parser() -> argparse.ArgumentParser:
    """The command line of `rlhfkit chat`."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Chat with a model in the browser (Gradio); replies stream as they are generated."
    )
    parser.add_argument(
        "model",
        metavar="MODEL_OR_RUN",
        help="model folder, adapter folder, hub id, or run directory (ppo/final > dpo/final > sft/final)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 = all)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="reply length limit in tokens (default 256)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy (default 0.7)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95)")
    parser.add_argument(
        "--template",
        default=None,
        help="text template with {prompt} (\\n allowed), or 'chat' for the tokenizer's chat template; "
        "default: the stage's config.yaml, else the chat template, else 'Question: {prompt}\\n\\nAnswer: '",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="weight dtype")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--title", default=None, help="page title")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1 or not 0 <= args.port < 65536:
        print(
            f"{PROG}: error: need --max-new-tokens ≥ 1, --temperature ≥ 0, 0 < --top-p ≤ 1 and a port in 0..65535",
            file=sys.stderr,
        )
        return 2
    try:
        chat_target = resolve_model(args.model)  # cheap checks first: no gradio import, no model load
    except ChatError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    try:
        import gradio  # noqa: F401
    except ImportError:
        print(f"{PROG}: error: gradio is not installed: pip install 'rlhfkit[chat]'", file=sys.stderr)
        return 1
    try:
        model, tokenizer, target = load(chat_target, dtype=args.dtype, device=args.device)
        template = resolve_template(target, tokenizer, args.template)
        app = build_app(
            model,
            tokenizer,
            template=template,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            title=args.title,
        )
    except RlhfkitError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    except OSError as exc:  # transformers: hub id not found / not reachable, unreadable files
        print(f"{PROG}: error: cannot load {args.model!r}: {exc}", file=sys.stderr)
        return 1
    print(f"[chat] {target} · prompt format: {template.describe()}", file=sys.stderr)
    return _serve(app, args.host, args.port)


def _serve(app, host: str, port: int) -> int:
    """Serve `app` on host:port (never shared) until Ctrl+C; the exit code."""
    try:
        app.launch(
            server_name=host,
            server_port=port,
            share=False,
            inbrowser=False,
            show_error=True,
            quiet=True,
            prevent_thread_lock=True,
        )
        print(f"[chat] serving on {app.local_url} (Ctrl+C to stop)", file=sys.stderr)
        app.block_thread()
    except OSError as exc:  # port in use, address not available
        print(f"{PROG}: error: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
