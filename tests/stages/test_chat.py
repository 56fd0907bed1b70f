"""`rlhfkit chat`: model/template resolution, streaming, and the Gradio app driven in headless Chromium."""

from __future__ import annotations

import threading

import pytest

from rlhfkit.apps import chat
from tests.browser import chromium, free_port, require_chromium, screenshot, wait_for


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    model, tok, target = chat.load(str(tiny_model_dir), device="cpu")
    return model, tok, target


def _model_dir(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_resolve_model(tmp_path):
    run = tmp_path / "run"
    _model_dir(run / "sft" / "final")
    assert chat.resolve_model(str(run)) == str(run / "sft" / "final")
    _model_dir(run / "dpo" / "final")
    assert chat.resolve_model(str(run)) == str(run / "dpo" / "final")
    (run / "ppo" / "final").mkdir(parents=True)
    (run / "ppo" / "final" / "adapter_config.json").write_text("{}")
    assert chat.resolve_model(str(run)) == str(run / "ppo" / "final")
    assert chat.resolve_model(str(run / "sft")) == str(run / "sft" / "final")  # a stage folder
    assert chat.resolve_model(str(run / "sft" / "final")) == str(run / "sft" / "final")
    assert chat.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    (tmp_path / "empty").mkdir()
    with pytest.raises(chat.ChatError, match="neither a model folder"):
        chat.resolve_model(str(tmp_path / "empty"))


def test_resolve_template(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    plain = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    plain.chat_template = None
    model = _model_dir(tmp_path / "sft" / "final")
    # nothing configured: the tokenizer's chat template, else StackLLaMA's text template
    assert chat.resolve_template(model, tok).is_chat
    assert chat.resolve_template(model, plain).text == chat.DEFAULT_TEMPLATE
    # the stage's config.yaml beside final/
    (tmp_path / "sft" / "config.yaml").write_text(
        "model:\n  name: x\ntemplate:\n  template: 'Q: {question}\n\n    A: {response}'\n  chat_template: false\n"
    )
    t = chat.resolve_template(model, tok)
    assert t.text == "Q: {prompt}\nA: " and t.source.endswith("config.yaml")
    (tmp_path / "sft" / "config.yaml").write_text(
        "template:\n  template: 'Q: {prompt} A: {response}'\n  chat_template: true\n"
    )
    assert chat.resolve_template(model, tok).is_chat
    assert chat.resolve_template(model, plain).text == "Q: {prompt} A: "  # no chat template to use: the text one
    # --template wins; literal \n from a shell becomes a newline
    assert chat.resolve_template(model, tok, "User: {prompt}\\nBot:").text == "User: {prompt}\nBot:"
    assert chat.resolve_template(model, plain, "{prompt} =").text == "{prompt} ="
    assert chat.resolve_template(None, tok, "chat").is_chat
    with pytest.raises(chat.ChatError, match="no chat template"):
        chat.resolve_template(None, plain, "chat")
    with pytest.raises(chat.ChatError, match="no \\{prompt\\}"):
        chat.resolve_template(None, tok, "just text")


def test_build_prompt(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    hist = chat.normalize_history(
        [
            {"role": "user", "content": [{"type": "text", "text": "hi {x}"}]},  # Gradio 6's content lists
            {"role": "assistant", "content": "hello"},
        ]
    )
    assert hist == [{"role": "user", "content": "hi {x}"}, {"role": "assistant", "content": "hello"}]
    text = chat.build_prompt(tok, chat.Template(chat.DEFAULT_TEMPLATE), "why?", hist)
    assert text == "Question: hi {x}\n\nAnswer: hello\n\nQuestion: why?\n\nAnswer: "
    text = chat.build_prompt(tok, chat.Template(None), "why?", hist)
    assert text == "<|user|>hi {x}</s><|assistant|>hello</s><|user|>why?</s><|assistant|>"
    # when the conversation outgrows the budget the oldest turns go first
    long_hist = [
        {"role": r, "content": f"{r} turn {i} " + "coffee " * 30} for i in range(3) for r in ("user", "assistant")
    ]
    tpl = chat.Template(chat.DEFAULT_TEMPLATE)
    full = chat._encode(tok, tpl, "why?", long_hist, None)
    cut = tok.decode(chat._encode(tok, tpl, "why?", long_hist, len(full) - 10))
    assert "user turn 0" not in cut and "user turn 1" in cut and cut.endswith("Question: why?\n\nAnswer: ")
    assert chat.normalize_history([("a", "b"), ("c", None)]) == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]


def _generate_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "rlhfkit-chat-generate"]


def test_stream_reply_grows(loaded):
    import torch

    model, tok, _ = loaded
    torch.manual_seed(0)
    outs = list(chat.stream_reply(model, tok, "how coffee good?", max_new_tokens=40, temperature=1.0))
    assert len(outs) >= 2, outs
    for prev, cur in zip(outs, outs[1:]):
        assert cur.startswith(prev) and len(cur) > len(prev)
    assert outs[-1].strip()
    # greedy is deterministic; a history is accepted in Gradio's format
    hist = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}]
    a = list(chat.stream_reply(model, tok, "why?", hist, max_new_tokens=12, temperature=0))
    b = list(chat.stream_reply(model, tok, "why?", hist, max_new_tokens=12, temperature=0))
    assert a and a[-1] == b[-1]
    # a reply abandoned after its first piece stops the generation thread
    g = chat.stream_reply(model, tok, "how", max_new_tokens=5000, temperature=1.0)
    next(g)
    g.close()
    assert not _generate_threads()
    # a prompt longer than the context window (max_position_embeddings=512) is cut, not an error
    ids = chat._encode(tok, chat.Template(chat.DEFAULT_TEMPLATE), "coffee " * 2000, [], 500)
    assert len(ids) == 500
    out = list(chat.stream_reply(model, tok, "coffee " * 2000, max_new_tokens=4, temperature=0))
    assert isinstance(out, list)
    list(chat.stream_reply(model, tok, "", template="{prompt}", max_new_tokens=2, temperature=0))  # empty prompt


def test_cli_usage_and_errors(tmp_path, capsys):
    from rlhfkit.cli import main as cli

    assert cli(["chat", "--help"]) == 0
    assert "MODEL_OR_RUN" in capsys.readouterr().out
    assert chat.main([]) == 2
    assert chat.main([str(tmp_path), "--temperature", "-1"]) == 2
    (tmp_path / "empty").mkdir()
    assert chat.main([str(tmp_path / "empty")]) == 1
    assert "rlhfkit chat: error:" in capsys.readouterr().err
    assert chat.main([str(tmp_path / "no" / "such" / "model")]) == 1
    assert "not found" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # pandas deprecations inside gradio
def test_chat_in_chromium(loaded):
    require_chromium()
    import torch
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    model, tok, target = loaded
    template = chat.resolve_template(target, tok)
    app = chat.build_app(model, tok, template=template, max_new_tokens=24, temperature=1.0)
    before = set(threading.enumerate())
    port = free_port()
    torch.manual_seed(0)
    app.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, share=False, quiet=True)
    try:
        with chromium(width=1100, height=800) as driver:
            driver.get(f"http://127.0.0.1:{port}/")
            box = wait_for(
                lambda: driver.find_element(By.CSS_SELECTOR, "#rlhfkit-input textarea"),
                timeout=60,
                what="the chat textbox",
            )
            box.send_keys("how coffee good?")
            box.send_keys(Keys.ENTER)
            user = wait_for(
                lambda: driver.find_element(By.CSS_SELECTOR, '#rlhfkit-chatbot [data-testid="user"]').text,
                what="the user message",
            )
            assert user.strip() == "how coffee good?"

            def reply_done():
                # finished = a non-empty bot message and no progress tracker showing (they show while streaming)
                bots = driver.find_elements(By.CSS_SELECTOR, '#rlhfkit-chatbot [data-testid="bot"]')
                busy = driver.find_elements(
                    By.CSS_SELECTOR,
                    '#rlhfkit-input [data-testid="status-tracker"]:not(.hide), '
                    '#rlhfkit-chatbot [data-testid="status-tracker"]:not(.hide)',
                )
                text = bots[-1].text.strip() if bots else ""
                return text if text and not busy else None

            reply = wait_for(reply_done, timeout=90, what="a non-empty, finished assistant reply")
            assert reply != chat.EMPTY_REPLY
            assert len(driver.find_elements(By.CSS_SELECTOR, '#rlhfkit-chatbot [data-testid="bot"]')) == 1
            shot = screenshot(driver, "chat.png")
            external = driver.execute_script(
                "return performance.getEntriesByType('resource').map(e => e.name)"
                ".filter(u => !u.startsWith('http://127.0.0.1') && !u.startsWith('data:'))"
            )
            assert external == [], external  # the page loads nothing from outside the loopback
        assert shot.stat().st_size > 5_000
    finally:
        app.close()
    # the server, its queue and the generation threads are gone (none started before launch remains)
    wait_for(
        lambda: not [t for t in threading.enumerate() if t not in before and t.is_alive()],
        timeout=20,
        what="the app's threads to end",
    )
    assert not _generate_threads()
