"""XTuner's data path (issue 14 parts 3 and 5): map functions, templates, loss rule, packing, cache, order.

Expected values are written from XTuner 0.2.0's documentation and source
(docs/en/user_guides/dataset_format.md, single_turn_conversation.md,
docs/zh_cn/training/custom_sft_dataset.rst, the docstrings of
xtuner/dataset/map_fns/, xtuner/utils/templates.py), not from evotune's output.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import evotune
from evotune.data import hf_dataset, xtuner_maps
from evotune.data.ftdp import main_data_order, walk_data_files, walk_listing_order
from evotune.data.packing import build_packed_dataset
from evotune.data.templates import PROMPT_TEMPLATE, SYSTEM_TEMPLATE, chat_prompt
from evotune.errors import EvotuneError

IM = "<|im_start|>", "<|im_end|>"
SPECIALS = ["<unk>", "<s>", "</s>", *IM, "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """A tiny byte-level BPE tokenizer with ChatML and Llama-3 special tokens (BOS 1, EOS 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["give three tips for staying healthy, eat a balanced diet, hello world"] * 5
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                additional_special_tokens=SPECIALS[3:])
    out = tmp_path_factory.mktemp("xtok") / "tok"
    t.save_pretrained(out)
    return evotune.load_tokenizer(out)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOTUNE_CACHE", str(tmp_path / "cache"))


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


# --------------------------------------------------------------------------- map functions (XTuner's examples)

ALPACA_SYSTEM = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n")
CODER = ("You are a professional programer. Please provide the corresponding code based on the description of "
         "Human.\n")
MAP_EXAMPLES = [
    # single_turn_conversation.md: alpaca's instruction and input joined by a newline
    ("alpaca_map_fn", {"instruction": "Give three tips for staying healthy.", "input": "", "output": "1.Eat"},
     [{"input": "Give three tips for staying healthy.\n", "output": "1.Eat"}]),
    ("alpaca_map_fn", {"instruction": "I", "input": "x", "output": "<nooutput>"}, []),
    ("alpaca_zh_map_fn", {"instruction_zh": "写", "input_zh": "诗", "output_zh": "好"}, [{"input": "写\n诗", "output": "好"}]),
    ("arxiv_map_fn", {"abstract": "We study X.", "title": "On X"},
     [{"system": "If you are an expert in writing papers, please generate a good paper title for this paper based "
                 "on other authors' descriptions of their abstracts.\n", "input": "We study X.", "output": "On X"}]),
    ("code_alpaca_map_fn", {"prompt": "sum a list", "completion": "sum(x)"},
     [{"system": CODER, "input": "sum a list", "output": "sum(x)"}]),
    ("colors_map_fn", {"description": "Prompt: a deep sea blue: dark", "color": "#123456"},
     [{"system": "You are a professional color designer. Please provide the corresponding colors based on the "
                 "description of Human.\n", "input": "a deep sea blue: dark", "output": "#123456"}]),
    ("crime_kg_assitant_map_fn", {"input": "问", "output": "答"},
     [{"system": "你现在是一名专业的中国律师，请根据用户的问题给出准确、有理有据的回复。\n", "input": "问", "output": "答"}]),
    ("default_map_fn", {"input": "q", "output": "a"}, [{"input": "q", "output": "a"}]),
    ("law_reference_map_fn", {"question": "问", "answer": "答"},
     [{"system": "你现在是一名专业的中国律师，请根据用户的问题给出准确、有理有据的回复。\n", "input": "问", "output": "答"}]),
    ("medical_map_fn", {"instruction": "头痛", "input": "三天", "output": "休息"},
     [{"system": "如果你是一名医生，请根据患者的描述回答医学问题。\n", "input": "头痛\n三天", "output": "休息"}]),
    # oasst1_map_fn's docstring
    ("oasst1_map_fn", {"text": "### Human: Can you explain xxx### Assistant: Sure! xxx### Human: I didn't understand "
                               "how xxx### Assistant: It has to do with a process xxx."},
     [{"input": "Can you explain xxx", "output": "Sure! xxx"},
      {"input": "I didn't understand how xxx", "output": "It has to do with a process xxx."}]),
    ("oasst1_map_fn", {"text": "### Human: a### Assistant: b### Human: unanswered"}, [{"input": "a", "output": "b"}]),
    # openai_map_fn's docstring
    ("openai_map_fn", {"messages": [
        {"role": "system", "content": "You are an assistant that occasionally misspells words."},
        {"role": "user", "content": "Tell me a story."},
        {"role": "assistant", "content": "One day a student went to schoool."}]},
     [{"system": "You are an assistant that occasionally misspells words.", "input": "Tell me a story.",
       "output": "One day a student went to schoool.", "output_with_loss": True}]),
    # custom_sft_dataset.rst (zh): "loss": False on an assistant message; leading assistant skipped; users joined
    ("openai_map_fn", {"messages": [
        {"role": "assistant", "content": "skipped"}, {"role": "system", "content": "s"},
        {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1", "loss": False},
        {"role": "user", "content": "u2"}, {"role": "user", "content": "u3"},
        {"role": "assistant", "content": "a2", "loss": True}]},
     [{"system": "s", "input": "u1", "output": "a1", "output_with_loss": False},
      {"system": "", "input": "u2u3", "output": "a2", "output_with_loss": True}]),
    ("openorca_map_fn", {"system_prompt": "s", "question": "q", "response": "r"},
     [{"system": "s", "input": "q", "output": "r"}]),
    # pretrain_map_fn's docstring, and XTuner's incremental pre-training format (no EOS)
    ("pretrain_map_fn", {"text": " xxx \n"}, [{"input": "", "output": "xxx", "need_eos_token": False}]),
    ("sql_map_fn", {"context": "CREATE TABLE t", "question": "count", "answer": "SELECT"},
     [{"system": "If you are an expert in SQL, please generate a good SQL Query for Question based on the CREATE "
                 "TABLE statement.\n", "input": "CREATE TABLE t\ncount", "output": "SELECT"}]),
    ("stack_exchange_map_fn", {"question": "q", "response": "r"}, [{"input": "q", "output": "r"}]),
    ("tiny_codes_map_fn", {"prompt": "p", "response": "r"}, [{"system": CODER, "input": "p", "output": "r"}]),
    ("wizardlm_map_fn", {"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "h1"},
                                           {"from": "gpt", "value": "g1"}]}, [{"input": "h1", "output": "g1"}]),
]


@pytest.mark.parametrize("name,record,expected", MAP_EXAMPLES, ids=[m[0] for m in MAP_EXAMPLES])
def test_map_functions_give_xtuners_documented_output(name, record, expected):
    fn = getattr(evotune, name)
    assert fn(record) == {"conversation": expected}
    assert xtuner_maps.DATASET_FORMAT_MAPPING[name[:-7].replace("crime_kg_assitant", "crime_kg_assitan")] is fn


def test_system_templates_are_xtuners():
    assert SYSTEM_TEMPLATE.alpaca == ALPACA_SYSTEM and SYSTEM_TEMPLATE.coder == CODER
    assert SYSTEM_TEMPLATE.moss_sft.startswith("You are an AI assistant whose name is {bot_name}.\n")


# --------------------------------------------------------------------------- templates (xtuner/utils/templates.py)

LLAMA2_SYS = ("[INST] <<SYS>>\n You are a helpful, respectful and honest assistant. Always answer as helpfully as "
              "possible, while being safe. Your answers should not include any harmful, unethical, racist, sexist, "
              "toxic, dangerous, or illegal content. Please ensure that your responses are socially unbiased and "
              "positive in nature.\nS\n<</SYS>>\n [/INST] ")
IM_1 = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n"
IM_2 = "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n"
INST = ("[INST] S [/INST]\n[INST] Q1 [/INST]", "A1", "[INST] Q2 [/INST]", True, "\n")
# name: (turn 1 input with system S, turn 1 output, turn 2 input, need_eos_token, sep)
TEMPLATE_TURNS = {
    "default": ("<|System|>:S\n<|User|>:Q1\n<|Bot|>:", "A1", "<|User|>:Q2\n<|Bot|>:", True, "\n"),
    "internlm_chat": ("<|System|>:S\n<|User|>:Q1<eoh>\n<|Bot|>:", "A1<eoa>", "<|User|>:Q2<eoh>\n<|Bot|>:", False,
                      "\n"),
    "internlm2_chat": (IM_1, "A1<|im_end|>", IM_2, False, "\n"),
    "qwen_chat": (IM_1, "A1<|im_end|>", IM_2, False, "\n"),
    "minicpm3": (IM_1, "A1<|im_end|>", IM_2, False, "\n"),
    "llama3_chat": ("<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user"
                    "<|end_header_id|>\n\nQ1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
                    "A1<|eot_id|>", "<|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n", False, ""),
    "llama2_chat": (LLAMA2_SYS + "[INST] Q1 [/INST]", "A1", "[INST] Q2 [/INST]", True, "\n"),
    "chatglm2": ("S\n[Round 1]\n\n问：Q1\n\n答：", "A1", "[Round 2]\n\n问：Q2\n\n答：", True, "\n\n"),
    "chatglm3": ("<|system|>\nS<|user|>\nQ1<|assistant|>\n", "A1", "<|user|>\nQ2<|assistant|>\n", True, "\n"),
    "baichuan_chat": ("S\n<reserved_102>Q1<reserved_103>", "A1", "<reserved_102>Q2<reserved_103>", True, "\n"),
    "baichuan2_chat": ("S\n<reserved_106>Q1<reserved_107>", "A1", "<reserved_106>Q2<reserved_107>", True, "\n"),
    "moss_sft": ("S\n<|Human|>: Q1<eoh>\n", "A1", "<|Human|>: Q2<eoh>\n", True, "\n"),
    "mistral": INST, "mixtral": INST, "deepseek_moe": INST,
    "zephyr": ("<|system|>\nS\n<|user|>\nQ1\n<|assistant|>\n", "A1", "<|user|>\nQ2\n<|assistant|>\n", True, "\n"),
    "gemma": ("<start_of_turn>system\nS<end_of_turn>\n<start_of_turn>user\nQ1<end_of_turn>\n<start_of_turn>model\n",
              "A1<end_of_turn>", "<start_of_turn>user\nQ2<end_of_turn>\n<start_of_turn>model\n", True, "\n"),
    "phi3_chat": ("<|system|>\nS<|end|>\n<|user|>\nQ1<|end|>\n<|assistant|>\n", "A1<|end|>",
                  "<|user|>\nQ2<|end|>\n<|assistant|>\n", False, "\n"),
    "deepseek_v2": ("S\n\nUser: Q1\n\nAssistant: ", "A1<｜end▁of▁sentence｜>", "User: Q2\n\nAssistant: ", False, ""),
    "deepseek_coder": ("You are an AI programming assistant, utilizing the DeepSeek Coder model, developed by "
                       "DeepSeekCompany, and you only answer questions related to computer science. For politically "
                       "sensitive questions, security and privacy issues, and other non-computer science questions, "
                       "you will refuse to answer. S\n### Instruction:\nQ1\n### Response:\n", "A1",
                       "### Instruction:\nQ2\n### Response:\n", True, "\n"),
}


@pytest.mark.parametrize("name", sorted(TEMPLATE_TURNS))
def test_templates_wrap_turns_as_xtuner(name):
    first, output, second, eos, sep = TEMPLATE_TURNS[name]
    conversation = [{"system": "S", "input": "Q1", "output": "A1"}, {"input": "Q2", "output": "A2"}]
    fn = evotune.template_map_fn_factory(template=getattr(evotune.PROMPT_TEMPLATE, name))
    got = fn({"conversation": conversation})["conversation"]
    assert got[0] == {"system": "S", "input": first, "output": output, "need_eos_token": eos, "sep": sep}
    assert got[1] == {"input": second, "output": output.replace("A1", "A2"), "need_eos_token": eos, "sep": sep}
    assert conversation[0]["input"] == "Q1"  # the record is not modified
    # XTuner's resume form: the template by its dotted name
    assert evotune.template_map_fn_factory(f"xtuner.utils.PROMPT_TEMPLATE.{name}")(
        {"conversation": conversation}) == {"conversation": got}


def test_minicpm_has_no_system_and_says_so():
    fn = evotune.template_map_fn_factory(PROMPT_TEMPLATE.minicpm)
    assert fn({"conversation": [{"input": "Q1", "output": "A1"}]})["conversation"][0]["input"] == "<用户> Q1 <AI>"
    with pytest.raises(xtuner_maps.RecordError, match="no SYSTEM"):
        fn({"conversation": [{"system": "S", "input": "Q1", "output": "A1"}]})


def test_chat_prompt_is_evaluate_chat_hooks():
    assert chat_prompt(PROMPT_TEMPLATE.internlm2_chat, "Hi", system="S") == (IM_1.replace("Q1", "Hi"),
                                                                              ["<|im_end|>"])
    assert chat_prompt(PROMPT_TEMPLATE.qwen_chat, "Hi")[1] == ["<|im_end|>", "<|endoftext|>"]
    assert chat_prompt(None, "Hi") == ("Hi", [])


# --------------------------------------------------------------------------- loss rule


def xtuner_labels(tok, turns, max_length):
    """XTuner's encode_fn written out: (input_ids, labels) with -100 where no loss."""
    ids, labels, bos = [], [], True
    for t in turns:
        if bos:
            ids += [1]
            labels += [-100]
        q, a, sep = enc(tok, t["input"]), enc(tok, t["output"]), enc(tok, t.get("sep", ""))
        trained = t.get("output_with_loss", True)
        ids += q + a
        labels += [-100] * len(q) + (a if trained else [-100] * len(a))
        bos = t.get("need_eos_token", True)
        if bos:
            ids += [2]
            labels += [2 if trained else -100]
        ids += sep
        labels += [-100] * len(sep)
    return ids[:max_length], labels[:max_length]


def signed(ids, labels):
    return [t if label != -100 else -t for t, label in zip(ids, labels)]


@pytest.mark.parametrize("template", ["internlm2_chat", "default", "llama3_chat"])
def test_encode_trains_outputs_only(tok, template):
    record = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                           {"role": "assistant", "content": "world", "loss": False},
                           {"role": "user", "content": "tips"}, {"role": "assistant", "content": "eat a diet"}]}
    turns = evotune.template_map_fn_factory(template)(evotune.openai_map_fn(record))["conversation"]
    encoder = hf_dataset.Encoder.of(tok)
    got = xtuner_maps.encode_conversation(turns, encoder.encode, encoder.bos, encoder.eos, 1000)
    assert got == signed(*xtuner_labels(tok, turns, 1000))
    trained = tok.decode([t for t in got if t > 0])
    tail = PROMPT_TEMPLATE[template].get("SUFFIX", "</s>")
    assert trained == "eat a diet" + tail  # the loss=False answer and every prompt are inputs only
    assert xtuner_maps.encode_conversation(turns, encoder.encode, encoder.bos, encoder.eos, 7) == got[:7]


# --------------------------------------------------------------------------- process_hf_dataset

RECORDS = [{"instruction": f"give {i} tips" + " healthy" * (i % 4), "input": "hello" * (i % 3),
            "output": "eat a balanced diet" + " world" * (i % 5)} for i in range(30)]


def write_jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def alpaca_docs(tok, records, template, max_length):
    fn = evotune.template_map_fn_factory(template)
    return [signed(*xtuner_labels(tok, fn(evotune.alpaca_map_fn(r))["conversation"], max_length)) for r in records]


def internevo_stream(docs):
    """InternEvo's labels of documents laid end to end: the next token when it is trained, -100 at a doc end."""
    ids, labels, starts = [], [], []
    for d in docs:
        starts.append(len(ids))
        ids += [abs(t) for t in d]
        labels += [t if t > 0 else -100 for t in d[1:]] + [-100]
    return np.array(ids), np.array(labels), starts


def process(tok, data, **kw):
    from datasets import load_dataset

    args = dict(dataset=dict(type=load_dataset, path="json", data_files=data), tokenizer=tok, max_length=48,
                dataset_map_fn=evotune.alpaca_map_fn,
                template_map_fn=dict(type=evotune.template_map_fn_factory, template=PROMPT_TEMPLATE.internlm2_chat),
                remove_unused_columns=True, shuffle_before_pack=False, pack_to_max_length=True, use_varlen_attn=True)
    args.update(kw)
    return evotune.process_hf_dataset(**args)


def test_packed_hf_dataset_equals_the_documents_one_by_one(tok, tmp_path):
    data = write_jsonl(tmp_path / "alpaca.jsonl", RECORDS)
    ds = process(tok, data)
    docs = alpaca_docs(tok, RECORDS, PROMPT_TEMPLATE.internlm2_chat, 48)
    ids, labels, starts = internevo_stream(docs)
    assert len(ds) == len(ids) // 48 > 3
    for k in range(len(ds)):
        pack = ds[k]
        window = slice(48 * k, 48 * (k + 1))
        np.testing.assert_array_equal(pack["input_ids"], ids[window])
        np.testing.assert_array_equal(pack["labels"], labels[window])
        bounds = sorted({0, 48, *(s - 48 * k for s in starts if 48 * k < s < 48 * (k + 1))})
        np.testing.assert_array_equal(pack["cu_seqlens"], bounds)
    # use_varlen_attn=False: one attention window per pack, the same labels
    whole = process(tok, data, use_varlen_attn=False)
    np.testing.assert_array_equal(whole[1]["cu_seqlens"], [0, 48])
    np.testing.assert_array_equal(whole[1]["position_ids"], np.arange(48))
    np.testing.assert_array_equal(whole[1]["labels"][:-1], ds[1]["labels"][:-1])
    assert whole[1]["labels"][-1] == -100  # InternEvo's pack_sample_into_one: no target at the pack's end


def test_shuffle_before_pack_uses_internevos_fixed_document_shuffle(tok, tmp_path):
    data = write_jsonl(tmp_path / "alpaca.jsonl", RECORDS)
    docs = alpaca_docs(tok, RECORDS, PROMPT_TEMPLATE.internlm2_chat, 48)
    order = np.arange(len(docs))
    np.random.RandomState(1024).shuffle(order)
    ids, labels, _ = internevo_stream([docs[i] for i in order])
    ds = process(tok, data, shuffle_before_pack=True)
    np.testing.assert_array_equal(np.concatenate([ds[k]["labels"] for k in range(len(ds))]), labels[:48 * len(ds)])


def test_conversation_records_and_a_local_folder(tok, tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    records = [{"conversation": [{"system": "", "input": "hello", "output": "world"},
                                 {"input": "tips", "output": "eat a balanced diet"}]}] * 6
    (folder / "part.json").write_text(json.dumps(records))  # a JSON array, XTuner's documented layout
    ds = process(tok, None, dataset=dict(path=str(folder)), dataset_map_fn=None, max_length=32)
    turns = evotune.template_map_fn_factory("internlm2_chat")(records[0])["conversation"]
    ids, labels, _ = internevo_stream([signed(*xtuner_labels(tok, turns, 32))] * 6)
    np.testing.assert_array_equal(ds[0]["labels"], labels[:32])


@pytest.mark.parametrize("records,line,field", [
    ([RECORDS[0], RECORDS[1], {"input": "", "output": "x"}], 3, "'instruction' (alpaca_map_fn reads it)"),
])
def test_record_without_a_field_names_file_record_and_field(tok, tmp_path, records, line, field):
    data = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(EvotuneError) as e:
        process(tok, data)
    assert str(e.value) == f"{data}: record {line}: no field {field}"
    conv = write_jsonl(tmp_path / "conv.jsonl", [{"conversation": [{"input": "q"}]}])
    with pytest.raises(EvotuneError, match=r"conv.jsonl: record 1: no field 'conversation\[0\].output'"):
        process(tok, conv, dataset_map_fn=None)
    with pytest.raises(EvotuneError, match=r"conv.jsonl: record 1: no field 'text' \(oasst1_map_fn reads it\)"):
        process(tok, conv, dataset_map_fn="oasst1")


def test_cache_hit_does_not_tokenize_again(tok, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "alpaca.jsonl", RECORDS)
    first = process(tok, data)
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        raise AssertionError("tokenized again")

    monkeypatch.setattr(xtuner_maps, "encode_conversation", counted)
    again = process(tok, data)
    assert calls == []
    for k in range(len(first)):
        np.testing.assert_array_equal(first[k]["labels"], again[k]["labels"])
    with pytest.raises(AssertionError, match="tokenized again"):  # another max_length is another entry
        process(tok, data, max_length=40)
    with pytest.raises(AssertionError, match="tokenized again"):  # so is another template
        process(tok, data, template_map_fn=evotune.template_map_fn_factory(PROMPT_TEMPLATE.default))
    os.utime(data, ns=(1, 1))  # and changed data
    with pytest.raises(AssertionError, match="tokenized again"):
        process(tok, data)


@pytest.mark.parametrize("key,value,says", [
    ("pack_to_max_length", False, "evotune trains on packs"),
    ("input_ids_with_output", False, "training needs the outputs"),
    ("with_image_token", True, "language models only"),
    ("max_length", None, "max_length must be"),
])
def test_refused_arguments_say_why(tok, tmp_path, key, value, says):
    data = write_jsonl(tmp_path / "alpaca.jsonl", RECORDS)
    with pytest.raises(EvotuneError, match=f"process_hf_dataset: .*{says}"):
        process(tok, data, **{key: value})


# --------------------------------------------------------------------------- untokenized InternEvo folders


def test_untokenized_folder_is_read_as_an_internevo_folder(tok, tmp_path):
    folder = tmp_path / "untokenized"
    chats = {"cn/a.json": [[{"role": "user", "content": f"hello {i}"},
                            {"role": "assistant", "content": "world" * (i + 1)}] for i in range(8)],
             "en/b.json": [[{"role": "system", "content": "s"}, {"role": "user", "content": "tips"},
                            {"role": "assistant", "content": f"eat {i}", "loss": i % 2 == 0}] for i in range(8)]}
    for rel, lines in chats.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text("".join(json.dumps(m) + "\n" for m in lines))
    spec = dict(type=evotune.load_intern_repo_untokenized_dataset, folder=str(folder), tokenizer=tok, max_length=64,
                template_map_fn=dict(type=evotune.template_map_fn_factory, template=PROMPT_TEMPLATE.internlm2_chat),
                file_type=".json")
    ds = build_packed_dataset(spec, packed_length=64)
    assert ds.type_names == ["cn", "en"] and [f.rel_path for f in ds.folder.files] == ["cn/a.bin", "en/b.bin"]
    template = evotune.template_map_fn_factory(PROMPT_TEMPLATE.internlm2_chat)
    for f, rel in zip(ds.folder.files, chats):
        want = [signed(*xtuner_labels(tok, template(evotune.openai_map_fn({"messages": m}))["conversation"], 64))
                for m in chats[rel]]
        want = [d for d in want if any(t > 0 for t in d[1:])]  # XTuner drops records without a trained token
        assert [f.document(r).tolist() for r in range(len(f.lengths))] == want
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.json").write_text(json.dumps([{"role": "user", "content": "q"}]) + "\n" + '{"role": "user"}\n')
    with pytest.raises(EvotuneError, match=r"x.json: record 2: a line is one JSON list of messages"):
        evotune.load_intern_repo_untokenized_dataset(folder=str(bad), tokenizer=tok, max_length=24)


# --------------------------------------------------------------------------- InternEvo's native file order


def test_internevo_walk_visits_folders_in_listing_order_and_sorts_only_files(tmp_path, monkeypatch, capsys):
    for rel in ("b/2.bin", "b/1.bin", "a/z/9.bin", "a/3.bin", "c.bin", "b/x.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    real_scandir = os.scandir

    class Listing:  # a filesystem that lists names in reverse order
        def __init__(self, path):
            self.entries = iter(sorted(real_scandir(path), key=lambda e: e.name, reverse=True))

        def __iter__(self):
            return self

        def __next__(self):
            return next(self.entries)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(os, "scandir", Listing)
    # InternEvo: list(os.walk(...)) then dirs.sort() too late: b before a, z inside a; files sorted per folder
    assert walk_listing_order(str(tmp_path)) == ["c.bin", "b/1.bin", "b/2.bin", "a/3.bin", "a/z/9.bin"]
    assert walk_data_files(str(tmp_path)) == ["c.bin", "a/3.bin", "a/z/9.bin", "b/1.bin", "b/2.bin"]
    out = tmp_path / "order.txt"
    main_data_order(type("Args", (), {"folder": str(tmp_path), "output": str(out), "file_type": ".bin",
                                       "walk": "internevo"})())
    assert out.read_text() == "c.bin\nb/1.bin\nb/2.bin\na/3.bin\na/z/9.bin\n"


def test_internevo_walk_does_not_enter_a_link_loop(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.bin").write_text("")
    os.symlink(tmp_path, tmp_path / "a" / "up")
    assert walk_listing_order(str(tmp_path)) == ["a/1.bin"]


# --------------------------------------------------------------------------- evotune tokenize, same formats


def read_bin(path) -> list[list[int]]:
    return [json.loads(line)["tokens"] for line in Path(path).read_text().splitlines()]


def test_tokenize_writes_xtuners_formats_with_xtuners_loss(tok, tmp_path):
    from evotune.data import tokenize as tk

    conversation = [{"conversation": [{"system": "s", "input": "hello", "output": "world"},
                                      {"input": "tips", "output": "eat a balanced diet"}]}]
    chats = [{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world",
                                                                  "loss": False},
                           {"role": "user", "content": "tips"}, {"role": "assistant", "content": "eat"}]}]
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_jsonl(inputs / "conv.jsonl", conversation)
    write_jsonl(inputs / "chat.jsonl", chats)
    write_jsonl(inputs / "alpaca.jsonl", RECORDS[:3])
    tk.tokenize_files([str(inputs / "conv.jsonl"), str(inputs / "chat.jsonl")], tmp_path / "out",
                      tok.name_or_path, template="qwen_chat", progress=False)
    qwen = evotune.template_map_fn_factory(PROMPT_TEMPLATE.qwen_chat)
    got = read_bin(tmp_path / "out" / "train" / "default" / "conv" / "conv.bin")
    assert got == [signed(*xtuner_labels(tok, qwen(conversation[0])["conversation"], 10**6))]
    got = read_bin(tmp_path / "out" / "train" / "default" / "chat" / "chat.bin")
    assert got == [signed(*xtuner_labels(tok, qwen(evotune.openai_map_fn(chats[0]))["conversation"], 10**6))]
    assert tok.decode([t for t in got[0] if t > 0]) == "eat<|im_end|>"  # the loss=False answer is input only

    tk.tokenize_files([str(inputs / "alpaca.jsonl")], tmp_path / "alpaca", tok.name_or_path, map_fn="alpaca",
                      template="internlm2_chat", max_length=40, progress=False)
    assert read_bin(tmp_path / "alpaca" / "train" / "default" / "alpaca" / "alpaca.bin") == \
        alpaca_docs(tok, RECORDS[:3], PROMPT_TEMPLATE.internlm2_chat, 40)
    with pytest.raises(EvotuneError, match=r"conv.jsonl:1: no field 'instruction' \(alpaca_map_fn reads it\)"):
        tk.tokenize_files([str(inputs / "conv.jsonl")], tmp_path / "bad", tok.name_or_path, map_fn="alpaca",
                          on_error="fail", progress=False)


def test_built_and_saved_datasets_and_pretokenized_records(tok, tmp_path):
    from datasets import Dataset, DatasetDict

    built = Dataset.from_list(RECORDS)
    ds = process(tok, None, dataset=built)
    want = process(tok, write_jsonl(tmp_path / "same.jsonl", RECORDS))
    np.testing.assert_array_equal(ds[2]["labels"], want[2]["labels"])
    DatasetDict({"train": built}).save_to_disk(tmp_path / "saved")
    np.testing.assert_array_equal(process(tok, None, dataset=dict(path=str(tmp_path / "saved")))[2]["labels"],
                                  want[2]["labels"])
    # XTuner's own tokenized records (input_ids + unshifted labels, -100 = no loss), and its saved DatasetDict
    docs = alpaca_docs(tok, RECORDS, PROMPT_TEMPLATE.internlm2_chat, 48)
    rows = [{"input_ids": [abs(t) for t in d], "labels": [t if t > 0 else -100 for t in d]} for d in docs]
    pre = process(tok, None, dataset=Dataset.from_list(rows), do_dataset_tokenization=False, dataset_map_fn=None,
                  template_map_fn=None)
    np.testing.assert_array_equal(pre[2]["labels"], want[2]["labels"])
    DatasetDict({"1": Dataset.from_list(rows[15:]), "0": Dataset.from_list(rows[:15])}).save_to_disk(
        tmp_path / "processed")
    folder = evotune.load_intern_repo_untokenized_dataset(processed_dataset_dict_path=str(tmp_path / "processed"))
    assert [f.rel_path for f in folder.files] == ["0.bin", "1.bin"]
    assert [folder.files[1].document(r).tolist() for r in range(15)] == docs[15:]


def test_map_num_proc_processes_give_the_same_packs_and_report_the_first_bad_record(tok, tmp_path):
    many = [RECORDS[i % len(RECORDS)] for i in range(600)]
    data = write_jsonl(tmp_path / "many.jsonl", many)
    one = process(tok, data, map_num_proc=1)
    os.environ["EVOTUNE_CACHE"] = str(tmp_path / "other_cache")  # own_cache's monkeypatch restores it
    two = process(tok, data, map_num_proc=2)
    assert len(one) == len(two) > 100
    for k in (0, len(one) // 2, len(one) - 1):
        np.testing.assert_array_equal(one[k]["input_ids"], two[k]["input_ids"])
        np.testing.assert_array_equal(one[k]["labels"], two[k]["labels"])
    bad = write_jsonl(tmp_path / "bad.jsonl", many[:400] + [{"output": "x"}] + many[:100] + [{"input": "y"}])
    with pytest.raises(EvotuneError, match=r"bad.jsonl: record 401: no field 'instruction'"):
        process(tok, bad, map_num_proc=2)


def test_tokenize_with_a_bare_sentencepiece_model_maps_the_templates_special_tokens(tmp_path):
    from evotune.data import tokenize as tk

    model = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "internlm2.model"
    if not model.is_file():
        pytest.skip(f"{model} is not available")
    sp = tk.SentencePieceCodec(str(model))
    write_jsonl(tmp_path / "conv.jsonl", [{"conversation": [{"system": "s", "input": "hello", "output": "world"}]}])
    tk.tokenize_files([str(tmp_path / "conv.jsonl")], tmp_path / "out", str(model), template="internlm2_chat",
                      progress=False)
    (doc,) = read_bin(tmp_path / "out" / "train" / "default" / "conv" / "conv.bin")
    # README facts: <s> 1, <|im_start|> 92543, <|im_end|> 92542, "\n" 364; the text between them encoded alone
    pieces = [[1], [92543], sp.encode_text(["system\ns"])[0], [92542], sp.encode_text(["\n"])[0], [92543],
              sp.encode_text(["user\nhello"])[0], [92542], sp.encode_text(["\n"])[0], [92543],
              sp.encode_text(["assistant\n"])[0]]
    prompt = [-t for piece in pieces for t in piece]
    answer = sp.encode_text(["world"])[0] + [92542]
    assert doc == prompt + answer + [-t for t in sp.encode_text(["\n"])[0]]
