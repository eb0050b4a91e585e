"""evotune/settings.py: one reader of the config; every accepted key acts, at every depth (issue 13)."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from evotune.checkpoint import dcp
from evotune.cli import main as cli_main
from evotune.config import FILE_VARIABLES, KNOWN_KEYS, load_config
from evotune.configs import config_path, names
from evotune.data.build import build_data
from evotune.data.collate import packed_collate
from evotune.data.loader import StepLoader
from evotune.errors import EvotuneError
from evotune.settings import SECTIONS, load_settings, plain_dicts, resolve
from tests.test_distributed import read_metrics, run_single, tiny_options

TINY = config_path("tiny_llama_cpu")

DATA_CONFIG = """
from evotune import SequenceParallelSampler, build_packed_dataset, load_intern_repo_tokenized_dataset
dataset_folder = {data!r}
max_length = 64
batch_size = 1
accumulative_counts = 2
train_dataset = dict(type=build_packed_dataset,
                     dataset_cfg=dict(type=load_intern_repo_tokenized_dataset, folder=dataset_folder),
                     packed_length=max_length, seed=1024)
train_dataloader = dict(batch_size=batch_size, num_workers=0, sampler=dict(type=SequenceParallelSampler))
optim_wrapper = dict(accumulative_counts=accumulative_counts)
"""


def _write(tmp_path, text: str, name="cfg.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def _data_config(tmp_path, folder, extra: str = "") -> str:
    return _write(tmp_path, DATA_CONFIG.format(data=folder) + textwrap.dedent(extra))


def _steps(settings, n: int, num_workers: int | None = None) -> list:
    """The first ``n`` steps of the loader the training loop builds from ``settings``."""
    dataset, sampler = build_data(settings.data, settings.optim.accumulative_counts, 1, 0)
    loader = StepLoader(dataset, sampler, batch_size=settings.data.batch_size,
                        micro_num=settings.optim.accumulative_counts,
                        num_workers=settings.data.num_workers if num_workers is None else num_workers,
                        collate=lambda packs: packed_collate(packs, "pack"))
    try:
        return [next(loader) for _ in range(n)]
    finally:
        loader.close()


# --------------------------------------------------------------------------- plain dicts


@pytest.mark.parametrize("line, typo, closest", [
    ("optim_wrapper = dict(accumulative_count=2)", "accumulative_count", "accumulative_counts"),
    ("optim_wrapper = dict(clip_grad=dict(max_nrom=1))", "max_nrom", "max_norm"),
    ("checkpoint = dict(intervall=5)", "intervall", "interval"),
    ("train_dataloader = dict(num_worker=2)", "num_worker", "num_workers"),
    ("train_cfg = dict(max_epoch=2)", "max_epoch", "max_epochs"),
    ("randomness = dict(sed=3)", "sed", "seed"),
])
def test_a_typo_inside_a_plain_dict_names_the_closest_key(tmp_path, line, typo, closest):
    path = _write(tmp_path, line + "\n")
    with pytest.raises(EvotuneError, match=f"cfg.py: .*'{typo}' is not a key of .*did you mean '{closest}'"):
        load_settings(path)


def test_every_plain_dict_of_the_settings_is_covered():
    assert set(plain_dicts()) == {"optim_wrapper", "optim_wrapper.clip_grad", "checkpoint", "train_dataloader",
                                  "train_cfg", "randomness",
                                  # XTuner's runtime part (evotune/xtuner_compat.py)
                                  "default_hooks", "default_hooks.checkpoint", "default_hooks.logger",
                                  "custom_hooks", "custom_hooks.EvaluateChatHook", "env_cfg", "env_cfg.mp_cfg",
                                  "env_cfg.dist_cfg"}


def test_a_typo_in_a_dotted_cfg_option_is_an_error():
    with pytest.raises(EvotuneError, match="^--cfg-options train_dataloader.num_worker: 'num_worker' is not a key "
                                           "of train_dataloader; did you mean 'num_workers'"):
        load_settings(TINY, ["train_dataloader.num_worker=2"])


def test_clip_grad_typo_no_longer_trains_without_clipping(tmp_path, capsys):
    """The seed's bug: clip_grad=dict(max_nrom=1) trained without clipping; now it never starts."""
    path = _write(tmp_path, "optim_wrapper = dict(clip_grad=dict(max_nrom=1.0))\n")
    assert cli_main(["train", path, "--work-dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "did you mean 'max_norm'" in err
    assert not (tmp_path / "w").exists()


# --------------------------------------------------------------------------- nested XTuner places act


def test_nested_xtuner_keys_change_the_batches(tmp_path, small_folder):
    """optim_wrapper.accumulative_counts=4: 4 micro-batches per step; train_dataloader.batch_size=2: 2 packs each."""
    path = _data_config(tmp_path, small_folder)
    plain = _steps(load_settings(path), 2)
    assert [len(s.micro_batches) for s in plain] == [2, 2]
    assert all(mb["input_ids"].shape[-1] == 64 for s in plain for mb in s.micro_batches)

    nested = load_settings(path, ["optim_wrapper.accumulative_counts=4", "train_dataloader.batch_size=2"])
    assert (nested.optim.accumulative_counts, nested.data.batch_size) == (4, 2)
    assert nested.sources["optim.accumulative_counts"] == "--cfg-options optim_wrapper.accumulative_counts"
    got = _steps(nested, 2)
    assert [len(s.micro_batches) for s in got] == [4, 4]
    assert all(mb["input_ids"].shape[-1] == 2 * 64 and len(mb["doc_lengths"]) > 0
               for s in got for mb in s.micro_batches)
    # the same packs as the top-level settings give (which the file passes on)
    top = _steps(load_settings(path, ["accumulative_counts=4", "batch_size=2"]), 2)
    for a, b in zip(got, top):
        assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a.micro_batches, b.micro_batches))
    assert got[1].sampler_state == top[1].sampler_state and got[1].sampler_state["consumed"] == 16


def test_nested_keys_reach_the_training_loop(tiny_llama_dir, small_folder, tmp_path):
    """Steps of 4 micro-batches x 2 packs x 64 tokens = 512 tokens; train_cfg.max_steps stops the run,
    checkpoint.interval/max_keep_ckpts decide the checkpoints (the file's top-level values say otherwise)."""
    opts = tiny_options(tiny_llama_dir, small_folder, save_steps=0)  # max_steps=4, accumulative_counts=2
    work = tmp_path / "w"
    summary = run_single([*opts, "optim_wrapper.accumulative_counts=4", "train_dataloader.batch_size=2",
                          "train_cfg.max_steps=2", "checkpoint.interval=1", "checkpoint.max_keep_ckpts=1"], work)
    assert summary["steps"] == 2
    assert [r["tokens"] for r in read_metrics(work)] == [512, 1024]
    assert [s for s, _ in dcp.list_checkpoints(work / "checkpoints")] == [2]
    assert dcp.read_trainer_state(str(work / "checkpoints" / "step_2"))["sampler"]["consumed"] == 16


@pytest.mark.parametrize("option, field, value", [
    ("train_cfg.max_epochs=3", "schedule.max_epochs", 3),
    ("checkpoint.interval=7", "checkpoint.interval", 7),
    ("checkpoint.max_keep_ckpts=1", "checkpoint.keep", 1),
    ("randomness.seed=5", "runtime.seed", 5),
    ("optim_wrapper.clip_grad.max_norm=0.5", "optim.max_norm", 0.5),
    ("optim_wrapper.dtype='bf16'", "optim.dtype", "bfloat16"),
    ("train_dataloader.num_workers=2", "data.num_workers", 2),
])
def test_each_nested_place_is_the_one_read(option, field, value):
    settings = load_settings(TINY, [option])
    section, name = field.split(".")
    assert getattr(getattr(settings, section), name) == value
    assert settings.sources[field] == f"--cfg-options {option.split('=')[0]}"


def test_command_line_flags_win_and_say_so():
    from evotune.parallel.zero import read_deepspeed

    settings = load_settings(TINY, ["randomness.seed=5"], seed=9, work_dir="/tmp/x",
                             deepspeed=read_deepspeed("deepspeed_zero2"))
    assert (settings.runtime.seed, settings.sources["runtime.seed"]) == (9, "--seed")
    assert settings.runtime.work_dir == "/tmp/x"
    assert settings.parallel.deepspeed.stage == 2
    assert load_settings(TINY).runtime.work_dir == "work_dirs/tiny_llama_cpu"


# --------------------------------------------------------------------------- conflicts, values


def test_top_level_and_nested_values_that_disagree_are_one_error(tmp_path, small_folder):
    path = _data_config(tmp_path, small_folder, "optim_wrapper = dict(accumulative_counts=4)\n")
    with pytest.raises(EvotuneError) as e:
        load_settings(path)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("accumulative_counts=2 (cfg.py: accumulative_counts) but "
                              "optim_wrapper.accumulative_counts=4 (cfg.py: optim_wrapper.accumulative_counts)")
    # a plain override of the top-level setting cannot reach a nested literal: the same error, naming the option
    literal = _data_config(tmp_path, small_folder, "optim_wrapper = dict(accumulative_counts=2)\n")
    with pytest.raises(EvotuneError, match=r"^accumulative_counts=3 \(--cfg-options accumulative_counts\) but "
                                           r"optim_wrapper.accumulative_counts=2"):
        load_settings(literal, ["accumulative_counts=3"])


@pytest.mark.parametrize("option, message", [
    ("batch_size=0", "train_dataloader.batch_size: expected a positive integer, got 0"),
    ("accumulative_counts=0", "optim_wrapper.accumulative_counts: expected a positive integer, got 0"),
    ("accumulative_counts=None", "optim_wrapper.accumulative_counts: expected a positive integer, got None"),
    ("max_length='abc'", "train_dataset.packed_length: expected a positive integer, got 'abc'"),
    ("max_steps=-1", "max_steps: expected a positive integer, got -1"),
    ("sequence_parallel_size=0", "sequence_parallel_size: expected a positive integer, got 0"),
    ("train_dataloader.num_workers=-1", "train_dataloader.num_workers: expected an integer >= 0, got -1"),
    ("optim_wrapper.dtype='bf17'", "optim_wrapper.dtype: unknown dtype 'bf17'"),
    ("loss_reduction='mean'", "loss_reduction: expected one of 'pack', 'token', got 'mean'"),
])
def test_bad_values_are_one_line_naming_key_and_value(option, message):
    with pytest.raises(EvotuneError) as e:
        load_settings(TINY, [option])
    assert str(e.value).startswith(message) and "--cfg-options" in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- one reader per setting


def test_every_known_key_is_read_by_a_setting_or_used_by_the_file():
    read = {p.split(".")[0] for cls in SECTIONS.values() for f in cls.__dataclass_fields__.values()
            for p in f.metadata["places"]}
    unread = sorted(KNOWN_KEYS - read - FILE_VARIABLES)
    assert not unread, (f"known keys that no settings field reads: {unread}; give each a field in "
                        "evotune/settings.py, or list it in config.FILE_VARIABLES if only the file uses it")
    assert read <= KNOWN_KEYS and not read & FILE_VARIABLES
    with pytest.raises(EvotuneError, match="unknown key 'min_lr_ratio'"):
        load_config(TINY, ["min_lr_ratio=0.1"])


@pytest.mark.parametrize("name", sorted(FILE_VARIABLES))
def test_a_file_variable_no_line_uses_is_refused(tmp_path, name):
    with pytest.raises(EvotuneError, match=f"^{tmp_path}/cfg.py: {name} is set but no line of cfg.py uses it"):
        load_config(_write(tmp_path, f"{name} = 1\n"))
    with pytest.raises(EvotuneError, match=f"^--cfg-options: {name} is set but no line of empty.py uses it"):
        load_config(_write(tmp_path, "\n", name="empty.py"), [f"{name}=1"])


def test_xtuner_file_variables_act_through_the_lines_that_use_them(tmp_path, small_folder):
    settings = load_settings(_data_config(tmp_path, small_folder, """
        dataloader_num_workers = 2
        train_dataloader = dict(batch_size=batch_size, num_workers=dataloader_num_workers)
    """), ["dataloader_num_workers=3"])
    assert settings.data.num_workers == 3
    assert settings.sources["data.num_workers"] == "cfg.py: train_dataloader.num_workers"


@pytest.mark.parametrize("name", names())
def test_every_shipped_config_resolves(name):
    settings = load_settings(config_path(name))
    assert settings.optim.accumulative_counts >= 1 and settings.data.max_length >= 512
    assert all(source != "default" for key, source in settings.sources.items()
               if key in ("data.batch_size", "optim.accumulative_counts", "schedule.max_epochs", "optim.max_norm"))


def test_a_top_level_setting_reaches_a_type_dict_that_does_not_pass_it_on(tmp_path, small_folder):
    """min_length: one value for training and validation, also when dataset_cfg does not name it."""
    settings = load_settings(_data_config(tmp_path, small_folder, "min_length = 30\n"))
    assert settings.data.min_length == 30
    assert settings.data.dataset["dataset_cfg"]["min_length"] == 30
    assert settings.sources["data.min_length"] == "cfg.py: min_length"
    nested = load_settings(_data_config(tmp_path, small_folder), ["train_dataset.dataset_cfg.min_length=30"])
    packs = [len(build_data(s.data, 1, 1, 0)[0]) for s in (settings, nested, load_settings(str(tmp_path / "cfg.py")))]
    assert packs[0] == packs[1] < packs[2]  # the filter acts, as if dataset_cfg named it


def test_a_top_level_setting_that_cannot_act_is_refused(tmp_path):
    with pytest.raises(EvotuneError, match="min_length.*'min_length' is not a parameter of write_bin"):
        load_settings(_write(tmp_path, """
            from evotune import build_packed_dataset, write_bin
            min_length = 3
            train_dataset = dict(type=build_packed_dataset, dataset_cfg=dict(type=write_bin, path='x'),
                                 packed_length=8)
        """))
    with pytest.raises(EvotuneError, match=r"^min_length cannot act \(cfg.py: min_length\): train_dataset.dataset_cfg is not a dict"):
        load_settings(_write(tmp_path, """
            from evotune import build_packed_dataset
            min_length = 3
            train_dataset = dict(type=build_packed_dataset, dataset_cfg=None, packed_length=8)
        """))


def test_data_seed_and_rng_seed_are_separate(tmp_path, small_folder):
    path = _data_config(tmp_path, small_folder)
    settings = load_settings(path, ["randomness={'seed': 7}"], seed=None)
    assert (settings.data.seed, settings.runtime.seed) == (1024, 7)
    assert load_settings(path, seed=3).data.seed == 1024  # --seed is the RNG seed only


def test_the_settings_table_names_value_and_source():
    settings = load_settings(TINY, ["optim_wrapper.accumulative_counts=4", "max_length=128"], seed=0)
    rows = {name: (value, source) for name, value, source in settings.table()}
    assert rows["optim.accumulative_counts"] == ("4", "--cfg-options optim_wrapper.accumulative_counts")
    assert rows["data.max_length"] == ("128", "--cfg-options max_length")
    assert rows["data.batch_size"] == ("1", "tiny_llama_cpu.py: train_dataloader.batch_size")
    assert rows["runtime.seed"] == ("0", "--seed")
    assert rows["eval.system"] == ("None", "default")
    lines = settings.format_table().splitlines()
    assert len(lines) == len(rows) and any("optim.accumulative_counts" in line and "--cfg-options" in line
                                           for line in lines)


def test_resolve_takes_a_plain_dict():
    settings = resolve({"evaluation_freq": 3, "evaluation_inputs": ["hi"]})
    assert (settings.eval.freq, settings.eval.inputs, settings.optim.accumulative_counts) == (3, ("hi",), 1)
    with pytest.raises(Exception):
        settings.eval.freq = 4  # frozen


# --------------------------------------------------------------------------- num_workers


def test_worker_processes_give_the_same_batches_and_sampler_states(tmp_path, small_folder):
    settings = load_settings(_data_config(tmp_path, small_folder), ["train_dataloader.batch_size=2"])
    n = 13  # past an epoch boundary of the small folder
    threads, workers = _steps(settings, n, num_workers=0), _steps(settings, n, num_workers=2)
    assert [s.sampler_state for s in threads] == [s.sampler_state for s in workers]
    assert len({s.sampler_state["epoch"] for s in threads}) > 1
    for a, b in zip(threads, workers):
        assert len(a.micro_batches) == len(b.micro_batches) == 2
        for x, y in zip(a.micro_batches, b.micro_batches):
            assert x.keys() == y.keys()
            for k in x:
                assert type(x[k]) is type(y[k]), k
                if isinstance(x[k], torch.Tensor):
                    assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k
                elif isinstance(x[k], np.ndarray):
                    assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), k
                else:
                    assert x[k] == y[k], k
