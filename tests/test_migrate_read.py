"""`evotune migrate` reads an InternEvo config without running it (evotune/migrate/read.py)."""

from __future__ import annotations

import re
import textwrap

import pytest

from evotune.errors import EvotuneError
from evotune.migrate import read_internevo_config


@pytest.mark.parametrize("line, message", [
    ("import os", "imports are not allowed"),
    ('TRAIN_FOLDER = os.environ["DATA"]', "'os.environ' is not allowed"),
    ('X = open("/etc/passwd")', "call 'open(...)' is not allowed"),
    ("X = [i for i in range(3)]", "is not allowed"),
    ("for i in range(3):\n    pass", "a 'for' statement is not allowed"),
    ("X = UNDEFINED_NAME + 1", "name 'UNDEFINED_NAME' is not defined above this line"),
    ("X = (lambda: 1)()", "is not allowed"),
    ("X = 2 ** 100000", "exponent 100000 is too large"),
    ('X = "a".join(["b"])', "is not allowed"),
])
def test_unsafe_config_is_rejected_naming_the_line(tmp_path, line, message):
    path = tmp_path / "bad.py"
    path.write_text(f'SEQ_LEN = 4\n# a comment\n{line}\ndata = dict(seq_len=SEQ_LEN)\n')
    with pytest.raises(EvotuneError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(message)):
        read_internevo_config(path)


def test_safe_evaluation_of_what_internevo_configs_use(tmp_path):
    path = tmp_path / "ok.py"
    path.write_text(textwrap.dedent('''
        """docstring"""
        JOB = "x"
        SEQ = 4 * 1024
        data = dict(seq_len=SEQ, total=50, **{"extra": True})
        lr_scheduler = dict(total_steps=data["total"], half=int(SEQ / 2), path=f"logs/{JOB}_{SEQ:06d}.log")
        parallel = dict(zero1=-1 if SEQ > 1 else 1, tensor={"size": 2, "mode": "isp"})
        data["micro_num"] = max(1, 2)
        flags = (True and not False, 3 in [1, 2, 3], -SEQ, 7 // 2, 7 % 4, 2 ** 10, [1, 2][::-1])
    '''))
    cfg = read_internevo_config(path)
    assert cfg.get("data.seq_len") == 4096 and cfg.get("data.extra") is True and cfg.get("data.micro_num") == 2
    assert cfg.get("lr_scheduler.total_steps") == 50 and cfg.get("lr_scheduler.half") == 2048
    assert cfg.get("lr_scheduler.path") == "logs/x_004096.log"
    assert cfg.get("parallel.zero1") == -1 and cfg.get("parallel.tensor.mode") == "isp"
    assert cfg.values["flags"] == (True, True, -4096, 3, 3, 1024, [2, 1])
    assert cfg.lines["data.seq_len"] == 5 and cfg.lines["parallel.tensor.mode"] == 7
