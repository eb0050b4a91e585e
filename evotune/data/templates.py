"""Chat templates rendered as pieces, so that the loss mask is exact.

A conversation is rendered as a list of :class:`Piece`: each piece is tokenized
on its own and carries whether it is trained, so the boundary between prompt and
reply is a token boundary by construction (no offsets mapping, no guessing).
Only an assistant message's content and the end-of-turn token right after it
are trained; the BOS, role headers, separators and every other message are
inputs only.

Named templates reproduce the text of the models' published Jinja templates:

* ``internlm2_chat``: ``<s><|im_start|>{role}\\n{content}<|im_end|>\\n`` ... (ChatML with BOS)
* ``qwen2``: the same ChatML without BOS, with the default system message
  ``You are a helpful assistant.`` when the conversation has none
* ``llama3``: ``<|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``
  with the content stripped of surrounding whitespace, as Meta's template does

Roles are written as they appear in the record (``tool`` stays ``tool``), which
is what these published templates do.

The tokenizer's own ``chat_template`` (:func:`render_with_chat_template`) is
handled by rendering growing prefixes of the conversation: the text one message
adds is that message's piece, and inside an assistant message the content is
located after the generation prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

ROLES = ("system", "user", "assistant", "tool")

# Piece kinds: how a piece becomes token ids.
SPECIAL = "special"  # exactly one special token, by its spelling
TEXT = "text"  # plain text: special-token spellings in it stay text
MARKUP = "markup"  # template output: special-token spellings in it are special tokens


@dataclass(frozen=True)
class Piece:
    kind: str
    text: str
    trained: bool = False


class RecordError(ValueError):
    """A record that cannot be tokenized (wrong shape, or a template cannot render it); the message says why."""


def json_type(value) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def check_messages(messages) -> list[dict]:
    """Return ``messages`` if it is a trainable conversation, else raise :class:`RecordError`."""
    if not isinstance(messages, list):
        raise RecordError(f"'messages' is {json_type(messages)}, expected an array")
    if not messages:
        raise RecordError("'messages' is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RecordError(f"messages[{i}] is {json_type(m)}, expected an object")
        role = m.get("role")
        if role not in ROLES:
            raise RecordError(f"messages[{i}] has role {role!r}, expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise RecordError(f"messages[{i}] has no string 'content'")
        if role == "assistant" and not m["content"].strip():
            raise RecordError(f"messages[{i}] (assistant) has empty content")
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("no assistant message (nothing to train on)")
    return messages


@dataclass(frozen=True)
class ChatTemplate:
    """A template where every turn is ``header(role) + content + end + separator``.

    ``header`` is a sequence of (text, is_special) parts; ``{role}`` in a text
    part is replaced by the message's role.
    """

    name: str
    bos: str | None
    header: tuple[tuple[str, bool], ...]
    end: str
    separator: str
    default_system: str | None = None
    strip_content: bool = False

    @property
    def special_tokens(self) -> list[str]:
        names = [self.bos] if self.bos else []
        return names + [t for t, special in self.header if special] + [self.end]

    def render(self, messages: Sequence[dict]) -> list[Piece]:
        messages = check_messages(messages)
        if self.default_system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.default_system}, *messages]
        pieces = [Piece(SPECIAL, self.bos)] if self.bos else []
        for m in messages:
            for text, special in self.header:
                pieces.append(Piece(SPECIAL, text) if special else Piece(TEXT, text.format(role=m["role"])))
            trained = m["role"] == "assistant"
            content = m["content"].strip() if self.strip_content else m["content"]
            if content:
                pieces.append(Piece(TEXT, content, trained))
            pieces.append(Piece(SPECIAL, self.end, trained))
            if self.separator:
                pieces.append(Piece(TEXT, self.separator))
        return pieces


_CHATML = (("<|im_start|>", True), ("{role}\n", False))

TEMPLATES: dict[str, ChatTemplate] = {
    "internlm2_chat": ChatTemplate("internlm2_chat", "<s>", _CHATML, "<|im_end|>", "\n"),
    "qwen2": ChatTemplate("qwen2", None, _CHATML, "<|im_end|>", "\n",
                          default_system="You are a helpful assistant."),
    "llama3": ChatTemplate(
        "llama3", "<|begin_of_text|>",
        (("<|start_header_id|>", True), ("{role}", False), ("<|end_header_id|>", True), ("\n\n", False)),
        "<|eot_id|>", "", strip_content=True),
}

# --template value that selects the tokenizer's own chat_template
TOKENIZER_TEMPLATE = "tokenizer"


def render_with_chat_template(messages: Sequence[dict],
                              render: Callable[[list[dict], bool], str],
                              special_tokens: Sequence[str]) -> list[Piece]:
    """Pieces of a conversation rendered by a tokenizer's Jinja ``chat_template``.

    ``render(messages, add_generation_prompt)`` returns the template's text.
    The text that message k adds is ``render(m[:k+1])`` minus ``render(m[:k])``;
    a template whose renderings are not prefixes of each other (one that
    rewrites earlier turns) cannot be split this way and is reported. Inside an
    assistant message, the content is searched from the end of the generation
    prompt (``render(m[:k], True)``) on, as is or stripped; the trained span is
    the content plus the special token that immediately follows it (the
    longest of ``special_tokens`` the rest starts with). All pieces are
    ``MARKUP``: as in ``apply_chat_template(tokenize=True)``, special-token
    spellings inside messages are special tokens.
    """
    messages = check_messages(messages)
    specials = sorted(set(special_tokens), key=len, reverse=True)
    pieces: list[Piece] = []
    done = ""
    for k, m in enumerate(messages):
        text = render(list(messages[: k + 1]), False)
        if not text.startswith(done):
            raise RecordError(
                f"the tokenizer's chat_template renders messages[:{k + 1}] without the text of "
                f"messages[:{k}] as its prefix; use a named --template")
        if m["role"] != "assistant":
            pieces.append(Piece(MARKUP, text[len(done):]))
            done = text
            continue
        prompt = render(list(messages[:k]), True) if k else ""
        start = len(prompt) if prompt.startswith(done) and text.startswith(prompt) else len(done)
        for content in (m["content"], m["content"].strip()):
            pos = text.find(content, start)
            if pos >= 0:
                break
        else:
            raise RecordError(f"the tokenizer's chat_template does not render messages[{k}]'s content verbatim; "
                                "use a named --template")
        end = pos + len(content)
        end_token = next((s for s in specials if text.startswith(s, end)), None)
        if end_token is None:
            raise RecordError(f"the tokenizer's chat_template puts no special end token right after "
                                f"messages[{k}]'s content ({text[end:end + 20]!r} follows); use a named --template")
        pieces += [Piece(MARKUP, text[len(done):pos]), Piece(MARKUP, content, True),
                   Piece(SPECIAL, end_token, True), Piece(MARKUP, text[end + len(end_token):])]
        done = text
    return [p for p in pieces if p.text]
