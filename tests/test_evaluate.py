"""Sample generation during training: prompts, greedy decoding, the schedule, 2 FSDP ranks."""

from __future__ import annotations

import datetime
import gc
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from evotune.errors import EvotuneError
from evotune.settings import resolve
from evotune.train.evaluate import (PromptEncoder, build_sample_evaluator, generate_samples,
                                    greedy_generate)

DOCS = ["hello world, this is a tiny corpus about cats and dogs.",
        "the quick brown fox jumps over the lazy dog", "how are you? fine, thanks."] * 10
INPUTS = ["hello cats", "the quick brown fox", "how are"]


def make_chat_model(out_dir: str, seed: int = 0):
    """Tiny Llama (hidden 64) + byte-level BPE with ChatML tokens, saved as a HF directory."""
    from evotune.demo import build_tokenizer
    from evotune.model.load import load_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(DOCS, out_dir, vocab_size=300)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.save_pretrained(out_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
                      initializer_range=0.2)  # large weights: clear argmax margins, no near-ties
    LlamaForCausalLM(cfg).save_pretrained(out_dir)
    return load_tokenizer(out_dir)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("chat_model"))
    make_chat_model(path)
    return path


def wrapped_model(path: str):
    from evotune.model.finetune import SupervisedFinetune
    from evotune.model.load import load_model

    model = SupervisedFinetune(load_model(path, dtype="float32"), activation_checkpointing=True)
    model.train()
    return model


def naive_greedy(llm, prompt: list[int], max_new_tokens: int, stop_ids) -> list[int]:
    """Reference decoding: the whole sequence through the model for every token, no cache, no padding."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(llm(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax())
            out.append(nxt)
            seq.append(nxt)
            if nxt in stop_ids:
                break
    return out


def test_prompt_is_the_template_text_before_the_reply(chat_dir):
    from evotune.model.load import load_tokenizer

    tok = load_tokenizer(chat_dir)
    enc = PromptEncoder(tok, "internlm2_chat", system="be brief")
    ids = enc("hello cats")
    assert tok.decode(ids) == ("<s><|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello cats<|im_end|>\n"
                               "<|im_start|>assistant\n")
    assert enc.stop_ids == sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")})
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
               {"role": "user", "content": "and?"}]
    assert tok.decode(enc(history)) == (
        "<s><|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello"
        "<|im_end|>\n<|im_start|>user\nand?<|im_end|>\n<|im_start|>assistant\n")
    plain = PromptEncoder(tok, None)  # no chat_template in this tokenizer: BOS + text
    assert plain("hello cats") == [tok.bos_token_id] + tok.encode("hello cats", add_special_tokens=False)
    assert plain.stop_ids == [tok.eos_token_id]


def test_batched_greedy_equals_naive_decoding_and_restores_training_state(chat_dir):
    from evotune.model.load import load_tokenizer

    tok = load_tokenizer(chat_dir)
    model = wrapped_model(chat_dir)
    enc = PromptEncoder(tok, "internlm2_chat")
    prompts = [enc(x) for x in INPUTS]
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    # stop at a token the first prompt produces early, so rows end at different steps
    free = naive_greedy(model.llm, prompts[0], 12, ())
    stop = [free[3]]
    got = greedy_generate(model, prompts, max_new_tokens=12, stop_ids=stop, pad_id=tok.eos_token_id)
    want = [naive_greedy(model.llm, p, 12, stop) for p in prompts]
    assert got == want
    assert len(got[0]) <= 4 and got[0][-1] == stop[0]
    assert model.training and model.llm.training
    assert model.llm.config._attn_implementation == "evotune_varlen"


def test_samples_at_start_every_freq_steps_and_at_end(chat_dir, tmp_path):
    from evotune.model.load import load_tokenizer

    tok = load_tokenizer(chat_dir)
    model = wrapped_model(chat_dir)
    cfg = {"evaluation_inputs": INPUTS[:2], "evaluation_freq": 3, "max_new_tokens": 5,
           "prompt_template": "internlm2_chat", "SYSTEM": "be brief"}
    printed = []
    ev = build_sample_evaluator(resolve(cfg).eval, str(tmp_path), tok, print_fn=printed.append)
    n_steps = 7
    ev.run(model, 0)  # the loop calls this before the first step
    for step in range(1, n_steps + 1):
        if ev.due(step, n_steps):
            ev.run(model, step)
    records = [json.loads(line) for line in open(tmp_path / "eval_samples.jsonl")]
    assert [r["step"] for r in records] == [0, 0, 3, 3, 6, 6, 7, 7]
    assert [r["input"] for r in records] == INPUTS[:2] * 4
    want = generate_samples(model, tok, INPUTS[:2], system="be brief", template="internlm2_chat", max_new_tokens=5)
    assert [r["output"] for r in records[:2]] == want
    assert all(r["output"] for r in records)
    assert len(printed) == 4 and INPUTS[0] in printed[0]
    # other ranks generate too but write nothing
    other = tmp_path / "rank1"
    build_sample_evaluator(resolve(cfg).eval, str(other), tok, is_main=False, print_fn=printed.append).run(model, 0)
    assert not other.exists() and len(printed) == 4
    assert build_sample_evaluator(resolve({}).eval, str(tmp_path), tok) is None


@pytest.mark.parametrize("key, value, message", [
    ("evaluation_inputs", "hello", "evaluation_inputs"),
    ("evaluation_freq", 0, "evaluation_freq"),
    ("max_new_tokens", "10", "max_new_tokens"),
    ("prompt_template", "chatml", "prompt_template 'chatml'"),
    ("prompt_template", "tokenizer", "no chat_template"),
])
def test_bad_evaluation_settings_name_the_key(chat_dir, tmp_path, key, value, message):
    from evotune.model.load import load_tokenizer

    cfg = {"evaluation_inputs": ["hi"], key: value}
    with pytest.raises(EvotuneError, match=message):
        build_sample_evaluator(resolve(cfg).eval, str(tmp_path), load_tokenizer(chat_dir))


def test_template_needs_its_special_tokens(tmp_path):
    from evotune.demo import build_tokenizer

    tok = build_tokenizer(DOCS, str(tmp_path), vocab_size=300)  # no <|start_header_id|> etc.
    with pytest.raises(EvotuneError, match="prompt_template.*<\\|begin_of_text\\|>"):
        PromptEncoder(tok, "llama3")


# ---------------------------------------------------------------- 2 ranks, FSDP2 (ZeRO-3)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_worker(rank: int, world: int, port: int, chat_dir: str, work_dir: str, stop: list[int]):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from evotune.model.load import load_tokenizer
    from evotune.train.type_loss import TypeLoss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=180))  # slow imports on a loaded machine
    try:
        tok = load_tokenizer(chat_dir)
        model = wrapped_model(chat_dir)
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.llm.model.layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=True)
        fully_shard(model, mesh=mesh, reshard_after_forward=True)
        cfg = {"evaluation_inputs": INPUTS, "evaluation_freq": 1, "max_new_tokens": 8,
               "prompt_template": "internlm2_chat"}
        ev = build_sample_evaluator(resolve(cfg).eval, work_dir, tok, is_main=rank == 0)
        result = {"start": ev.run(model, 0)}  # before any training forward: the wrapper must become the root
        # each rank its own prompt: rank 0 stops early, rank 1 runs to max_new_tokens (needs the synced stop)
        enc = PromptEncoder(tok, "internlm2_chat")
        result["own"] = greedy_generate(model, [enc(INPUTS[rank])], max_new_tokens=10, stop_ids=stop)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ids = torch.tensor([enc(INPUTS[0]) + enc(INPUTS[1])])
        n = ids.shape[1]
        batch = dict(input_ids=ids, position_ids=torch.arange(n)[None], loss_index=torch.arange(n - 1),
                     loss_labels=ids[0, 1:], loss_weight=torch.full((n - 1,), 1.0 / (n - 1)))
        for _ in range(2):
            model(**batch).backward()
            opt.step()
            opt.zero_grad()
            result.setdefault("after", []).append(ev.run(model, 1))
        result["loss"] = float(model(**batch))
        meter = TypeLoss(["cn", "en"])
        meter.add(torch.tensor([1.0 + rank, 4.0 * rank]), {"type_ids": torch.tensor([[0, 0, 1]]),
                                                              "loss_index": torch.tensor([0, 1 + rank])})
        result["type_loss"] = meter.reduce()
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        if rank == 0:
            with open(os.path.join(work_dir, "result.json"), "w") as f:
                json.dump(gathered, f)
    finally:
        model = ev = None
        gc.collect()  # as evotune.parallel.env.process_group does: free FSDP's hold on the group first
        dist.destroy_process_group()


def test_two_fsdp_ranks_generate_in_lockstep(chat_dir, tmp_path):
    from evotune.model.load import load_tokenizer

    tok = load_tokenizer(chat_dir)
    model = wrapped_model(chat_dir)
    enc = PromptEncoder(tok, "internlm2_chat")
    free = naive_greedy(model.llm, enc(INPUTS[0]), 10, ())
    stop = [free[2]]
    own = [naive_greedy(model.llm, enc(x), 10, stop) for x in INPUTS[:2]]
    assert len(own[0]) == 3 and len(own[1]) == 10
    start = generate_samples(model, tok, INPUTS, template="internlm2_chat", max_new_tokens=8)

    mp.spawn(_fsdp_worker, args=(2, _free_port(), chat_dir, str(tmp_path), stop), nprocs=2, join=True)
    results = json.load(open(tmp_path / "result.json"))
    assert [r["start"] for r in results] == [start, start]
    assert [r["own"][0] for r in results] == own
    assert results[0]["after"] == results[1]["after"]
    assert results[0]["after"][0] != start  # it learned something
    assert results[0]["loss"] == results[1]["loss"] < 10
    records = [json.loads(line) for line in open(tmp_path / "eval_samples.jsonl")]
    assert [r["step"] for r in records] == [0] * 3 + [1] * 6
    # loss/<type> over both ranks: cn (1 + 2) over 2 + 1 tokens, en 4 over the 1 token of rank 1
    assert results[0]["type_loss"] == results[1]["type_loss"] == {"loss/cn": 1.0, "loss/en": 4.0}


def test_internlm2_sentencepiece_tokenizer_uses_the_chat_token_ids():
    """The bare InternLM2 .model names <|im_start|>/<|im_end|> [UNUSED_TOKEN_146/145] (ids 92543/92542)."""
    from pathlib import Path

    import sentencepiece

    from evotune.model.load import load_tokenizer

    model = Path(__file__).resolve().parents[1].parent / "shared" / "tokenizers" / "internlm2.model"
    if not model.is_file():
        pytest.skip(f"{model} is not available")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    enc = PromptEncoder(load_tokenizer(model), "internlm2_chat", system="sys")
    start, end, nl = [92543], [92542], sp.encode("\n")
    want = ([1] + start + sp.encode("system\n") + sp.encode("sys") + end + nl
            + start + sp.encode("user\n") + sp.encode("你好") + end + nl + start + sp.encode("assistant\n"))
    assert enc("你好") == want
    assert enc.stop_ids == [2, 92542]
