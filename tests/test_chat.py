"""``evotune chat``: one-shot and interactive, against a reference greedy decoding."""

from __future__ import annotations

import io
import sys

import pytest

from evotune.cli import main as cli_main
from test_evaluate import make_chat_model, naive_greedy


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("chat_cli_model"))
    make_chat_model(path, seed=1)
    return path


def reference_reply(model_dir: str, messages, max_new_tokens: int, system=None) -> str:
    """What the chat must answer: naive greedy decoding after the prompt, written out literally."""
    from evotune.model.load import load_model, load_tokenizer

    tok = load_tokenizer(model_dir)
    llm = load_model(model_dir, dtype="float32")
    text = "<s>" + (f"<|im_start|>system\n{system}<|im_end|>\n" if system else "")
    for role, content in messages:
        text += f"<|im_start|>{role}\n{content}<|im_end|>\n"
    text += "<|im_start|>assistant\n"
    prompt = tok.encode(text, add_special_tokens=False)
    stops = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    return tok.decode(naive_greedy(llm, prompt, max_new_tokens, stops), skip_special_tokens=True)


def test_one_shot_prompt_prints_the_reply_and_exits_0(model_dir, capsys):
    code = cli_main(["chat", model_dir, "--prompt", "hello cats", "--template", "internlm2_chat",
                     "--system", "be brief", "--max-new-tokens", "12"])
    out = capsys.readouterr().out
    assert code == 0
    want = reference_reply(model_dir, [("user", "hello cats")], 12, system="be brief")
    assert want.strip() and out.strip() == want.strip()


def test_interactive_keeps_the_conversation_until_reset(model_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello cats\nhow are\n/reset\nhow are\n/exit\nnot read\n"))
    code = cli_main(["chat", model_dir, "--template", "internlm2_chat", "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    assert code == 0
    first = reference_reply(model_dir, [("user", "hello cats")], 6)
    second = reference_reply(model_dir, [("user", "hello cats"), ("assistant", first), ("user", "how are")], 6)
    fresh = reference_reply(model_dir, [("user", "how are")], 6)
    assert second != fresh  # the history changes the answer, so the check below means something
    # each '>>> ' prompt is followed by its reply (none for /reset and /exit); 'not read' is never read
    assert [chunk.removesuffix("\n") for chunk in out.split(">>> ")[1:]] == [first, second, "", fresh, ""]


def test_bad_arguments_exit_2_with_one_line(model_dir, tmp_path, capsys):
    assert cli_main(["chat", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    assert cli_main(["chat", model_dir, "--prompt", "hi", "--template", "chatml"]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "--template 'chatml'" in err

