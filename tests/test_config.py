"""Config loading: overrides propagate, typos are errors with suggestions (issue 2 c)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from evotune.config import build, load_config
from evotune.configs import config_path, names
from evotune.errors import EvotuneError
from evotune.train.schedule import CosineAnnealingLR, LinearLR, build_scheduler

SHIPPED = config_path("internlm2_7b_w_internevo_dataset")


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "cfg.py"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_shipped_configs_load_and_override_propagates():
    assert "internlm2_7b_w_internevo_dataset" in names() and "tiny_llama_cpu" in names()
    cfg = load_config(SHIPPED, ["max_length=4096", "accumulative_counts=8", "train_dataloader.num_workers=3"])
    assert cfg["train_dataset"]["packed_length"] == 4096  # settings flow into later parts
    assert cfg["optim_wrapper"]["accumulative_counts"] == 8
    assert cfg["train_dataloader"]["num_workers"] == 3
    assert cfg["train_dataset"]["dataset_cfg"]["folder"] == "/path/to/your/dataset"


def test_unknown_top_level_key_is_rejected_with_suggestion(tmp_path):
    path = _write(tmp_path, """
        max_lenght = 10
    """)
    with pytest.raises(EvotuneError, match="unknown key 'max_lenght'.*did you mean 'max_length'"):
        load_config(path)


def test_unknown_type_parameter_is_rejected_with_suggestion(tmp_path):
    path = _write(tmp_path, """
        from evotune import build_packed_dataset
        train_dataset = dict(type=build_packed_dataset, dataset_cfg=None, packed_lenght=8)
    """)
    with pytest.raises(EvotuneError, match="'packed_lenght' is not a parameter.*did you mean 'packed_length'"):
        load_config(path)


def test_misspelt_type_is_rejected_with_suggestion(tmp_path):
    path = _write(tmp_path, """
        from evotune import *
        train_dataset = dict(type=build_packd_dataset)
    """)
    with pytest.raises(EvotuneError, match="'build_packd_dataset' is not defined.*did you mean 'build_packed_dataset'"):
        load_config(path)
    path = _write(tmp_path, """
        train_dataset = dict(type='build_packd_dataset')
    """)
    with pytest.raises(EvotuneError, match="did you mean 'build_packed_dataset'"):
        load_config(path)


def test_cfg_option_unknown_key(tmp_path):
    with pytest.raises(EvotuneError, match="unknown key 'lrr'.*did you mean 'lr'"):
        load_config(SHIPPED, ["lrr=1"])
    with pytest.raises(EvotuneError, match="'train_dataloder' is not in the config.*train_dataloader"):
        load_config(SHIPPED, ["train_dataloder.num_workers=1"])


def test_build_calls_type_with_extra_arguments():
    assert build(dict(type=dict, a=1), b=2) == {"a": 1, "b": 2}
    assert build(5) == 5


def test_schedule_warmup_then_cosine_to_floor():
    import torch

    lr = 1e-3
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    phases = [LinearLR(start_factor=1 / 40, begin=0, end=0.1), CosineAnnealingLR(eta_min=0.15 * lr, begin=0.1, end=1)]
    sched = build_scheduler(opt, phases, steps_per_epoch=100, total_steps=100)
    lrs = []
    for _ in range(101):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(lr / 40)
    assert lrs[5] == pytest.approx(lr / 40 + (lr - lr / 40) * 0.5)
    assert lrs[10] == pytest.approx(lr)
    assert lrs[55] == pytest.approx(0.15 * lr + 0.85 * lr * 0.5)
    assert lrs[100] == pytest.approx(0.15 * lr)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "evotune.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_cli_config_typo_is_one_line_without_traceback(tmp_path):
    path = _write(tmp_path, "max_lenght = 3\n")
    out = _cli("train", path)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "max_length" in out.stderr


def test_cli_list_and_copy_cfg(tmp_path):
    out = _cli("list-cfg", "-p", "INTERNLM2")
    names = out.stdout.split()
    assert out.returncode == 0 and "internlm2_7b_w_internevo_dataset" in names
    assert all("internlm2" in n for n in names) and "tiny_llama_cpu" not in names  # the filter, case-insensitive
    out = _cli("copy-cfg", "internlm2_7b_w_internevo_dataset", str(tmp_path))
    assert out.returncode == 0
    assert (tmp_path / "internlm2_7b_w_internevo_dataset_copy.py").read_text() == open(SHIPPED).read()
    again = _cli("copy-cfg", "internlm2_7b_w_internevo_dataset", str(tmp_path))
    assert again.returncode != 0 and "already exists" in again.stderr
    assert _cli("version").stdout.strip() == "0.1.0"
