"""XTuner's data formats: its dataset map functions, its prompt templates applied, and its loss mask.

XTuner 0.2 turns every supervised record into its own ``conversation`` format
(``xtuner/dataset/map_fns/`` in XTuner)::

    {"conversation": [{"system": "...", "input": "...", "output": "..."}, ...]}

A *dataset map function* (``alpaca_map_fn``, ``openai_map_fn``, ...) maps one
record of a public data set to that format; ``template_map_fn_factory(template)``
wraps each turn in a prompt template (``PROMPT_TEMPLATE.<name>``,
evotune/data/templates.py); :func:`encode_conversation` turns the result into
token ids with XTuner's loss rule. The functions here take and return the same
values as XTuner's (tests/test_xtuner_data.py checks them against XTuner's
documented examples); a record without a field a map function reads raises
``KeyError`` (the field), which :mod:`evotune.data.hf_dataset` reports with the
file and record number.

Loss rule (XTuner's ``encode_fn``), per turn: BOS when the previous turn ended
with EOS (always for the first turn; XTuner's Qwen tokenizers have none), the
input (no loss), the output (trained unless ``output_with_loss`` is False),
EOS (trained likewise) unless ``need_eos_token`` is False, then ``sep`` (no
loss); the document is cut at ``max_length`` tokens. evotune writes the result
as InternEvo's signed ids (a negative id is input only, docs/data.md), so the
trained tokens are exactly the ones XTuner computes a loss on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from evotune.data.templates import SYSTEM_TEMPLATE, RecordError, json_type, prompt_template

# --------------------------------------------------------------------------- dataset map functions


def alpaca_map_fn(example: dict) -> dict:
    """tatsu-lab/alpaca: instruction + "\\n" + input -> output; ``<nooutput>`` records are dropped."""
    if example.get("output") == "<nooutput>":
        return {"conversation": []}
    return {"conversation": [{"input": f"{example['instruction']}\n{example['input']}",
                              "output": example["output"]}]}


def alpaca_zh_map_fn(example: dict) -> dict:
    """silk-road/alpaca-data-gpt4-chinese: the ``*_zh`` fields of an alpaca record."""
    return {"conversation": [{"input": f"{example['instruction_zh']}\n{example['input_zh']}",
                              "output": example["output_zh"]}]}


def _with_system(system: str, question: str, answer: str) -> dict:
    return {"conversation": [{"system": system, "input": question, "output": answer}]}


def arxiv_map_fn(example: dict) -> dict:
    """arXiv abstracts -> titles, with ``SYSTEM_TEMPLATE.arxiv_gentile``."""
    return _with_system(SYSTEM_TEMPLATE["arxiv_gentile"], example["abstract"], example["title"])


def code_alpaca_map_fn(example: dict) -> dict:
    """HuggingFaceH4/CodeAlpaca_20K: prompt -> completion, with ``SYSTEM_TEMPLATE.coder``."""
    return _with_system(SYSTEM_TEMPLATE["coder"], example["prompt"], example["completion"])


def colors_map_fn(example: dict) -> dict:
    """burkelibbey/colors: the description after its first ``:`` -> the colour code."""
    description = ":".join(example["description"].split(":")[1:]).strip()
    return _with_system(SYSTEM_TEMPLATE["colorist"], description, example["color"])


def crime_kg_assitant_map_fn(example: dict) -> dict:
    """CrimeKgAssitant (XTuner's spelling): input -> output, with ``SYSTEM_TEMPLATE.lawyer``."""
    return _with_system(SYSTEM_TEMPLATE["lawyer"], example["input"], example["output"])


def default_map_fn(example: dict) -> dict:
    """Records that already have ``input`` and ``output``."""
    return {"conversation": [{"input": example["input"], "output": example["output"]}]}


def law_reference_map_fn(example: dict) -> dict:
    """law reference data: question -> answer, with ``SYSTEM_TEMPLATE.lawyer``."""
    return _with_system(SYSTEM_TEMPLATE["lawyer"], example["question"], example["answer"])


def medical_map_fn(example: dict) -> dict:
    """shibing624/medical: instruction + "\\n" + input -> output, with ``SYSTEM_TEMPLATE.medical``."""
    return _with_system(SYSTEM_TEMPLATE["medical"], f"{example['instruction']}\n{example['input']}",
                        example["output"])


def oasst1_map_fn(example: dict) -> dict:
    """timdettmers/openassistant-guanaco: ``### Human: ... ### Assistant: ...`` text -> turns.

    The text is split at ``###``; ``Human:`` / ``Assistant:`` parts (prefix and
    surrounding spaces removed) alternate as input and output; a last input
    without an answer is dropped, as it would carry no loss.
    """
    parts = []
    for sentence in example["text"].strip().split("###"):
        sentence = sentence.strip()
        for prefix in ("Human:", "Assistant:"):
            if sentence.startswith(prefix):
                parts.append(sentence[len(prefix):].strip())
    if len(parts) % 2:
        parts.pop()
    return {"conversation": [{"input": parts[i], "output": parts[i + 1]} for i in range(0, len(parts), 2)]}


def _loss_flag(value) -> bool:
    """XTuner reads a message's ``loss`` as ``str(value).lower() == 'true'`` (missing: trained)."""
    return str(value).lower() == "true"


def openai_map_fn(example: dict) -> dict:
    """OpenAI chat records (``messages``: system/user/assistant) -> one turn per assistant message.

    Leading assistant messages are skipped; the user messages before an
    assistant message are joined (no separator) into its input, the latest
    system message before it is its system; ``"loss": false`` on an assistant
    message makes it input only.
    """
    messages = example["messages"]
    if not isinstance(messages, list):
        raise RecordError(f"'messages' is {json_type(messages)}, expected an array")
    start = 0
    while start < len(messages) and _role(messages, start) == "assistant":
        start += 1
    conversation, system, question = [], "", ""
    for k in range(start, len(messages)):
        role, content = _role(messages, k), messages[k]["content"]
        if role == "system":
            system = content
        elif role == "user":
            question += content
        else:
            conversation.append({"system": system, "input": question, "output": content,
                                 "output_with_loss": _loss_flag(messages[k].get("loss", True))})
            system, question = "", ""
    return {"conversation": conversation}


def _role(messages: list, k: int) -> str:
    m = messages[k]
    if not isinstance(m, dict):
        raise RecordError(f"messages[{k}] is {json_type(m)}, expected an object")
    role = m["role"]
    if role not in ("system", "user", "assistant"):
        raise RecordError(f"messages[{k}] has role {role!r}; XTuner's openai format has system, user and assistant")
    return role


def openorca_map_fn(example: dict) -> dict:
    """Open-Orca/OpenOrca: system_prompt, question -> response."""
    return _with_system(example["system_prompt"], example["question"], example["response"])


def pretrain_map_fn(example: dict) -> dict:
    """Plain text: no input, the stripped text is the output, no EOS (XTuner's incremental pretraining)."""
    return {"conversation": [{"input": "", "output": example["text"].strip(), "need_eos_token": False}]}


def sql_map_fn(example: dict) -> dict:
    """b-mc2/sql-create-context: context + "\\n" + question -> answer, with ``SYSTEM_TEMPLATE.sql``."""
    return _with_system(SYSTEM_TEMPLATE["sql"], f"{example['context']}\n{example['question']}", example["answer"])


def stack_exchange_map_fn(example: dict) -> dict:
    """ArmelR/stack-exchange-instruction: question -> response."""
    return {"conversation": [{"input": example["question"], "output": example["response"]}]}


def tiny_codes_map_fn(example: dict) -> dict:
    """nampdn-ai/tiny-codes: prompt -> response, with ``SYSTEM_TEMPLATE.coder``."""
    return _with_system(SYSTEM_TEMPLATE["coder"], example["prompt"], example["response"])


def wizardlm_map_fn(example: dict) -> dict:
    """WizardLM's ShareGPT-style ``conversations`` (``from``: human/gpt, ``value``) -> turns."""
    messages = example["conversations"]
    start = 0
    while start < len(messages) and messages[start]["from"] == "gpt":
        start += 1
    conversation, question = [], ""
    for k in range(start, len(messages)):
        speaker = messages[k]["from"]
        if speaker == "human":
            question += messages[k]["value"]
        elif speaker == "gpt":
            conversation.append({"input": question, "output": messages[k]["value"]})
            question = ""
        else:
            raise RecordError(f"conversations[{k}] is from {speaker!r}; wizardlm_map_fn reads human and gpt")
    return {"conversation": conversation}


# XTuner's names for the map functions (``DATASET_FORMAT_MAPPING``; XTuner spells crime_kg_assitan)
DATASET_FORMAT_MAPPING: dict[str, Callable[[dict], dict]] = dict(
    alpaca=alpaca_map_fn, alpaca_zh=alpaca_zh_map_fn, arxiv=arxiv_map_fn, code_alpaca=code_alpaca_map_fn,
    colors=colors_map_fn, crime_kg_assitan=crime_kg_assitant_map_fn, default=default_map_fn,
    law_reference=law_reference_map_fn, medical=medical_map_fn, oasst1=oasst1_map_fn, openai=openai_map_fn,
    openorca=openorca_map_fn, pretrain=pretrain_map_fn, sql=sql_map_fn, stack_exchange=stack_exchange_map_fn,
    tiny_codes=tiny_codes_map_fn, wizardlm=wizardlm_map_fn)


def dataset_map_fn_of(spec) -> Callable[[dict], dict] | None:
    """A map function given as a function, ``None`` (records are XTuner's ``conversation`` already), a
    :data:`DATASET_FORMAT_MAPPING` name (``'alpaca'``) or a function name (``'alpaca_map_fn'``, also
    XTuner's dotted ``'xtuner.dataset.map_fns.alpaca_map_fn'``)."""
    if spec is None or callable(spec):
        return spec
    if isinstance(spec, str):
        name = spec.rsplit(".", 1)[-1]
        by_name = {fn.__name__: fn for fn in DATASET_FORMAT_MAPPING.values()}
        fn = DATASET_FORMAT_MAPPING.get(name) or by_name.get(name)
        if fn is not None:
            return fn
        raise RecordError(f"dataset_map_fn {spec!r}: not one of XTuner's map functions "
                          f"({', '.join(DATASET_FORMAT_MAPPING)}); give a function")
    raise RecordError(f"dataset_map_fn: expected a function, a map function's name or None, got {spec!r}")


# --------------------------------------------------------------------------- the prompt template


def template_map_fn(example: dict, template) -> dict:
    """Each turn of ``example['conversation']`` wrapped in ``template`` (XTuner's ``template_map_fn``).

    ``input`` becomes ``SYSTEM.format(system)`` (when the turn has a system) +
    ``INSTRUCTION.format(input, round)``; ``output`` gets ``SUFFIX``;
    ``need_eos_token`` is ``not SUFFIX_AS_EOS``; ``sep`` is ``SEP``. The
    example is not modified.
    """
    template = prompt_template(template)
    turns = []
    for i, turn in enumerate(example.get("conversation", [])):
        turn = dict(turn)
        text = template["INSTRUCTION"].format(input=turn.get("input") or "", round=i + 1)
        system = turn.get("system", "")
        if system not in ("", None):
            if "SYSTEM" not in template:
                raise RecordError(f"conversation[{i}] has a system, but the prompt template has no SYSTEM "
                                  "(XTuner fails on it too); drop the system or use another template")
            text = template["SYSTEM"].format(system=system) + text
        turn["input"] = text
        if template.get("SUFFIX"):
            turn["output"] = turn.get("output", "") + template["SUFFIX"]
        turn["need_eos_token"] = not template.get("SUFFIX_AS_EOS", False)
        turn["sep"] = template.get("SEP", "")
        turns.append(turn)
    return {"conversation": turns}


def template_map_fn_factory(template) -> Callable[[dict], dict]:
    """``template_map_fn`` bound to ``template`` (a ``PROMPT_TEMPLATE`` entry, a name or XTuner's dotted path)."""
    return functools.partial(template_map_fn, template=prompt_template(template))


def template_of(fn) -> dict | None:
    """The template a :func:`template_map_fn_factory` result applies (None for any other function)."""
    if isinstance(fn, functools.partial) and fn.func is template_map_fn:
        return fn.keywords["template"]
    return None


# --------------------------------------------------------------------------- tokens and loss


def check_conversation(record) -> list[dict]:
    """``record['conversation']`` if it is XTuner's conversation format, else :class:`RecordError`.

    A missing ``conversation``, or a turn without ``output``, is a ``KeyError``
    (reported as a missing field); ``input``, ``system`` and ``sep`` may be
    missing. Checked before the template too, which would fill in a missing
    output with its suffix alone (as XTuner's does)."""
    if not isinstance(record, dict):
        raise RecordError(f"the record is {json_type(record)}, expected an object")
    turns = record["conversation"]
    if not isinstance(turns, list):
        raise RecordError(f"'conversation' is {json_type(turns)}, expected an array")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"conversation[{i}] is {json_type(turn)}, expected an object")
        if "output" not in turn:
            raise KeyError(f"conversation[{i}].output")
        if not isinstance(turn["output"], str):
            raise RecordError(f"conversation[{i}].output is {json_type(turn['output'])}, expected a string")
        for key in ("input", "sep", "system"):  # may be missing (XTuner reads them as '')
            if turn.get(key) is not None and not isinstance(turn[key], str):
                raise RecordError(f"conversation[{i}].{key} is {json_type(turn[key])}, expected a string")
    return turns


def encode_conversation(turns: Sequence[dict], encode: Callable[[list[str]], list[list[int]]],
                        bos: Sequence[int], eos: Sequence[int], max_length: int | None) -> list[int]:
    """Signed token ids of one conversation (XTuner's ``encode_fn``; positive = trained, see module doc).

    ``encode(texts)`` tokenizes without adding special tokens (special-token
    spellings in templates become special tokens); ``bos``/``eos``: the ids
    XTuner puts around turns. The inputs of all turns are tokenized in one call.
    """
    texts = []
    for turn in turns:
        texts += [turn.get("input") or "", turn["output"], turn.get("sep") or ""]
    ids = encode(texts)
    tokens: list[int] = []
    needs_bos = True
    for k, turn in enumerate(turns):
        question, answer, sep = ids[3 * k: 3 * k + 3]
        if needs_bos:
            tokens += [-t for t in bos]
        tokens += [-t for t in question]
        trained = turn.get("output_with_loss", True)
        sign = 1 if trained else -1
        tokens += [sign * t for t in answer]
        needs_bos = turn.get("need_eos_token", True)
        if needs_bos:
            tokens += [sign * t for t in eos]
        tokens += [-t for t in sep]
    return tokens[:max_length] if max_length is not None else tokens


# XTuner's get_bos_eos_token_ids: these tokenizers put no BOS before a turn (Qwen has none)
_NO_BOS_TOKENIZERS = ("QWenTokenizer", "QWen2Tokenizer", "Qwen2Tokenizer", "Qwen2TokenizerFast")


def turn_bos(tokenizer_class: str, bos_id: int | None) -> list[int]:
    """The ids XTuner puts before a turn that follows an EOS (and before the first)."""
    return [] if tokenizer_class in _NO_BOS_TOKENIZERS or bos_id is None else [bos_id]


def record_tokens(record, encode: Callable[[list[str]], list[list[int]]], bos: Sequence[int], eos: Sequence[int],
                  max_length: int | None, map_fn=None, template_fn=None, rename_maps=()) -> list[int] | None:
    """Signed ids of one record through XTuner's pipeline: ``map_fn`` -> checked conversation ->
    ``template_fn`` -> ``rename_maps`` -> :func:`encode_conversation`. None: no turn left (XTuner drops
    the record). A missing field is a ``KeyError``, any other bad value a :class:`RecordError`."""
    if not isinstance(record, dict):
        raise RecordError(f"the record is {json_type(record)}, expected an object")
    if map_fn is not None:
        record = {**record, **map_fn(record)}
    check_conversation(record)
    if template_fn is not None:
        record = {**record, **template_fn(record)}
    for old, new in rename_maps:
        record[new] = record.pop(old)
    turns = check_conversation(record)
    if not turns:
        return None
    return encode_conversation(turns, encode, bos, eos, max_length)
