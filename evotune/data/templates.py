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


# --------------------------------------------------------------------------- XTuner's prompt templates
# XTuner's configs name a template as ``PROMPT_TEMPLATE.<name>`` (xtuner/utils/templates.py in XTuner 0.2).
# A template is text around each turn of an XTuner ``conversation`` (evotune/data/xtuner_maps.py applies it):
#   turn 1: SYSTEM.format(system) + INSTRUCTION.format(input, round) -> input, no loss
#           output + SUFFIX -> trained; EOS (trained) unless SUFFIX_AS_EOS; SEP -> input, no loss
# STOP_WORDS end a generated answer (samples). The strings are XTuner's, character for character.


class AttrDict(dict):
    """A dict whose keys read as attributes (``PROMPT_TEMPLATE.internlm2_chat.SUFFIX``), as mmengine's
    ``ConfigDict`` reads in XTuner's configs; values that are dicts read the same way."""

    def __getattr__(self, name: str):
        try:
            value = self[name]
        except KeyError:
            raise AttributeError(f"{name!r}; known: {', '.join(self)}") from None
        return AttrDict(value) if isinstance(value, dict) and not isinstance(value, AttrDict) else value


_LLAMA2_SYSTEM = ("[INST] <<SYS>>\n You are a helpful, respectful and honest assistant. Always answer as helpfully "
                  "as possible, while being safe. Your answers should not include any harmful, unethical, racist, "
                  "sexist, toxic, dangerous, or illegal content. Please ensure that your responses are socially "
                  "unbiased and positive in nature.\n{system}\n<</SYS>>\n [/INST] ")
_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                  "helpful, detailed, and polite answers to the user's questions. {system}\n ")
_DEEPSEEK_CODER_SYSTEM = ("You are an AI programming assistant, utilizing the DeepSeek Coder model, developed by "
                          "DeepSeekCompany, and you only answer questions related to computer science. For "
                          "politically sensitive questions, security and privacy issues, and other non-computer "
                          "science questions, you will refuse to answer. {system}\n")
_IM_SYSTEM = "<|im_start|>system\n{system}<|im_end|>\n"
_IM_INSTRUCTION = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
_INST = dict(SYSTEM="[INST] {system} [/INST]\n", INSTRUCTION="[INST] {input} [/INST]", SEP="\n")
_DEEPSEEK_EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"  # <｜end▁of▁sentence｜>

PROMPT_TEMPLATE = AttrDict(
    default=dict(SYSTEM="<|System|>:{system}\n", INSTRUCTION="<|User|>:{input}\n<|Bot|>:", SEP="\n"),
    zephyr=dict(SYSTEM="<|system|>\n{system}\n", INSTRUCTION="<|user|>\n{input}\n<|assistant|>\n", SEP="\n"),
    internlm_chat=dict(SYSTEM="<|System|>:{system}\n", INSTRUCTION="<|User|>:{input}<eoh>\n<|Bot|>:",
                       SUFFIX="<eoa>", SUFFIX_AS_EOS=True, SEP="\n", STOP_WORDS=["<eoa>"]),
    internlm2_chat=dict(SYSTEM=_IM_SYSTEM, INSTRUCTION=_IM_INSTRUCTION, SUFFIX="<|im_end|>", SUFFIX_AS_EOS=True,
                        SEP="\n", STOP_WORDS=["<|im_end|>"]),
    moss_sft=dict(SYSTEM="{system}\n", INSTRUCTION="<|Human|>: {input}<eoh>\n", SEP="\n",
                  STOP_WORDS=["<eoc>", "<eom>"]),
    llama2_chat=dict(SYSTEM=_LLAMA2_SYSTEM, INSTRUCTION="[INST] {input} [/INST]", SEP="\n"),
    code_llama_chat=dict(SYSTEM="{system}\n", INSTRUCTION="[INST] {input} [/INST]"),
    chatglm2=dict(SYSTEM="{system}\n", INSTRUCTION="[Round {round}]\n\n问：{input}\n\n答：", SEP="\n\n"),
    chatglm3=dict(SYSTEM="<|system|>\n{system}", INSTRUCTION="<|user|>\n{input}<|assistant|>\n", SEP="\n"),
    qwen_chat=dict(SYSTEM=_IM_SYSTEM, INSTRUCTION=_IM_INSTRUCTION, SUFFIX="<|im_end|>", SUFFIX_AS_EOS=True,
                   SEP="\n", STOP_WORDS=["<|im_end|>", "<|endoftext|>"]),
    baichuan_chat=dict(SYSTEM="{system}\n", INSTRUCTION="<reserved_102>{input}<reserved_103>", SEP="\n"),
    baichuan2_chat=dict(SYSTEM="{system}\n", INSTRUCTION="<reserved_106>{input}<reserved_107>", SEP="\n"),
    wizardlm=dict(SYSTEM=_VICUNA_SYSTEM, INSTRUCTION="USER: {input} ASSISTANT:", SEP="\n"),
    wizardcoder=dict(SYSTEM="Below is an instruction that describes a task. Write a response that appropriately "
                            "completes the request.\n\n{system}\n ",
                     INSTRUCTION="### Instruction:\n{input}\n\n### Response:", SEP="\n\n"),
    vicuna=dict(SYSTEM=_VICUNA_SYSTEM, INSTRUCTION="USER: {input} ASSISTANT:", SEP="\n"),
    deepseek_coder=dict(SYSTEM=_DEEPSEEK_CODER_SYSTEM, INSTRUCTION="### Instruction:\n{input}\n### Response:\n",
                        SEP="\n"),
    deepseekcoder=dict(SYSTEM=_DEEPSEEK_CODER_SYSTEM, INSTRUCTION="### Instruction:\n{input}\n### Response:\n",
                       SEP="\n"),  # XTuner's deprecated spelling of deepseek_coder
    deepseek_moe=dict(_INST),
    deepseek_v2=dict(SYSTEM="{system}\n\n", INSTRUCTION="User: {input}\n\nAssistant: ", SUFFIX=_DEEPSEEK_EOS,
                     SUFFIX_AS_EOS=True, STOP_WORDS=[_DEEPSEEK_EOS]),
    mistral=dict(_INST),
    mixtral=dict(_INST),
    minicpm=dict(INSTRUCTION="<用户> {input} <AI>", SEP="\n"),
    minicpm3=dict(SYSTEM=_IM_SYSTEM, INSTRUCTION=_IM_INSTRUCTION, SUFFIX="<|im_end|>", SUFFIX_AS_EOS=True,
                  SEP="\n", STOP_WORDS=["<|im_end|>", "<|endoftext|>"]),
    gemma=dict(SYSTEM="<start_of_turn>system\n{system}<end_of_turn>\n",
               INSTRUCTION="<start_of_turn>user\n{input}<end_of_turn>\n<start_of_turn>model\n",
               SUFFIX="<end_of_turn>", SUFFIX_AS_EOS=False, SEP="\n", STOP_WORDS=["<end_of_turn>"]),
    cohere_chat=dict(SYSTEM="<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{system}<|END_OF_TURN_TOKEN|>",
                     INSTRUCTION="<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{input}<|END_OF_TURN_TOKEN|>"
                                 "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
                     SUFFIX="<|END_OF_TURN_TOKEN|>", SUFFIX_AS_EOS=True, STOP_WORDS=["<|END_OF_TURN_TOKEN|>"]),
    llama3_chat=dict(SYSTEM="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
                     INSTRUCTION="<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
                                 "<|start_header_id|>assistant<|end_header_id|>\n\n",
                     SUFFIX="<|eot_id|>", SUFFIX_AS_EOS=True, STOP_WORDS=["<|eot_id|>"]),
    phi3_chat=dict(SYSTEM="<|system|>\n{system}<|end|>\n", INSTRUCTION="<|user|>\n{input}<|end|>\n<|assistant|>\n",
                   SUFFIX="<|end|>", SUFFIX_AS_EOS=True, SEP="\n", STOP_WORDS=["<|end|>"]),
)

# System prompts XTuner's map functions and configs use (``SYSTEM_TEMPLATE.<name>``).
SYSTEM_TEMPLATE = AttrDict(
    moss_sft="You are an AI assistant whose name is {bot_name}.\n"
             "Capabilities and tools that {bot_name} can possess.\n"
             "- Inner thoughts: enabled.\n"
             "- Web search: enabled. API: Search(query)\n"
             "- Calculator: enabled. API: Calculate(expression)\n"
             "- Equation solver: enabled. API: Solve(equation)\n"
             "- Text-to-image: disabled.\n"
             "- Image edition: disabled.\n"
             "- Text-to-speech: disabled.\n",
    alpaca="Below is an instruction that describes a task. Write a response that appropriately completes the "
           "request.\n",
    arxiv_gentile="If you are an expert in writing papers, please generate a good paper title for this paper based "
                  "on other authors' descriptions of their abstracts.\n",
    colorist="You are a professional color designer. Please provide the corresponding colors based on the "
             "description of Human.\n",
    coder="You are a professional programer. Please provide the corresponding code based on the description of "
          "Human.\n",
    lawyer="你现在是一名专业的中国律师，请根据用户的问题给出准确、有理有据的回复。\n",
    medical="如果你是一名医生，请根据患者的描述回答医学问题。\n",
    sql="If you are an expert in SQL, please generate a good SQL Query for Question based on the CREATE TABLE "
        "statement.\n",
)


def prompt_template(template) -> dict:
    """An XTuner template given as its dict, its name (``'internlm2_chat'``) or XTuner's dotted path
    (``'xtuner.utils.PROMPT_TEMPLATE.internlm2_chat'``, what XTuner writes when it resumes)."""
    if isinstance(template, dict):
        if "INSTRUCTION" not in template:
            raise RecordError(f"a prompt template needs INSTRUCTION (got keys {', '.join(template) or 'none'})")
        return template
    if isinstance(template, str):
        name = template.rsplit(".", 1)[-1]
        if name in PROMPT_TEMPLATE:
            return PROMPT_TEMPLATE[name]
        raise RecordError(f"prompt template {template!r} is not one of XTuner's: {', '.join(PROMPT_TEMPLATE)}")
    raise RecordError(f"a prompt template is a dict (PROMPT_TEMPLATE.<name>) or a name, got {template!r}")


def chat_prompt(template, text: str, system: str = "", round: int = 1) -> tuple[str, list[str]]:
    """``(prompt, stop words)`` for generating an answer to ``text``, as XTuner's ``EvaluateChatHook``
    builds it: ``SYSTEM.format(system)`` (when ``system`` is given) + ``INSTRUCTION.format(input=text)``;
    no template: the text itself. The tokenizer then adds its BOS, as XTuner's hook encodes the prompt."""
    if template is None:
        return text, []
    template = prompt_template(template)
    head = template.get("SYSTEM", "{system}\n").format(system=system) if system else ""
    return head + template["INSTRUCTION"].format(input=text, round=round), list(template.get("STOP_WORDS", []))
