"""``evotune plot`` and the optional TensorBoard writer."""

from __future__ import annotations

import json
import struct
import sys
import types

import pytest

from evotune.cli import main as cli_main
from evotune.errors import EvotuneError
from evotune.train.plot import plot_metrics, read_metrics, series
from evotune.train.tensorboard import TensorBoardWriter, build_visualizer


def _records(n: int = 30) -> list[dict]:
    out = []
    for step in range(1, n + 1):
        r = {"step": step, "loss": 5.0 / step, "lr": 1e-3 * min(1.0, step / 5), "grad_norm": 2.0 / step ** 0.5,
             "tokens": 512 * step, "tgs": 1000.0 + step, "data_time": 0.001, "step_time": 0.5, "epoch": 0,
             "loss/cn": 5.5 / step}
        if step % 3:
            r["loss/en"] = 4.5 / step  # a type missing from some steps
        out.append(r)
        if step % 10 == 0:
            out.append({"step": step, "val_loss/valid": 4.0 / step})
    return out


def _write(path, records, extra_lines=()):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")


def test_figure_has_the_four_panels_with_every_loss_series():
    fig = plot_metrics(_records())
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["loss", "learning rate", "gradient norm",
                                               "throughput (tokens/GPU/s)"]
    lines = {line.get_label(): line for line in axes[0].get_lines()}
    assert set(lines) == {"loss", "loss/cn", "loss/en", "val_loss/valid"}
    assert list(lines["val_loss/valid"].get_xdata()) == [10, 20, 30]
    assert list(lines["loss/en"].get_xdata()) == [s for s in range(1, 31) if s % 3]
    assert list(axes[3].get_lines()[0].get_ydata()) == [1000.0 + s for s in range(1, 31)]
    assert axes[1].get_lines()[0].get_ydata()[0] == pytest.approx(2e-4)


def test_resumed_run_last_record_of_a_step_wins():
    records = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "loss": 2.5}, {"step": 3, "loss": 1.0}]
    assert series(records, "loss") == ([1, 2, 3], [3.0, 2.5, 1.0])


def test_cli_writes_a_png(tmp_path, capsys):
    _write(tmp_path / "metrics.jsonl", _records())
    out = tmp_path / "plots" / "run.png"
    assert cli_main(["plot", str(tmp_path), "-o", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1200, 800)  # 12 x 8 inches at 100 dpi
    assert len(data) > 20_000  # four panels of lines, not an empty canvas
    assert str(out) in capsys.readouterr().out
    assert cli_main(["plot", str(tmp_path)]) == 0  # default: WORK_DIR/metrics.png
    assert (tmp_path / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_metrics_name_the_file_and_line(tmp_path, capsys):
    assert cli_main(["plot", str(tmp_path / "nowhere")]) == 2
    _write(tmp_path / "metrics.jsonl", _records(3), extra_lines=['{"step": 4, "loss": '])
    with pytest.raises(EvotuneError, match=r"metrics.jsonl:4: not JSON"):
        read_metrics(str(tmp_path / "metrics.jsonl"))
    assert cli_main(["plot", str(tmp_path), "-o", str(tmp_path / "x.jpg")]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "x.jpg" in err


class _FakeSummaryWriter:
    instances: list = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        _FakeSummaryWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_writer_logs_numeric_fields_per_step(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=_FakeSummaryWriter))
    monkeypatch.setattr(_FakeSummaryWriter, "instances", [])
    writer = build_visualizer("tensorboard", str(tmp_path))
    assert writer.log_dir == str(tmp_path / "tensorboard")
    writer.write({"step": 3, "loss": 1.5, "loss/en": 1.25, "epoch": None, "tgs": float("nan"), "note": "x"})
    writer.close()
    fake = _FakeSummaryWriter.instances[-1]
    assert fake.scalars == [("loss", 1.5, 3), ("loss/en", 1.25, 3)] and fake.closed
    spec = {"type": TensorBoardWriter, "log_dir": str(tmp_path / "tb")}
    assert build_visualizer(spec, str(tmp_path)).log_dir == str(tmp_path / "tb")
    silent = build_visualizer(spec, str(tmp_path), enabled=False)  # other ranks
    silent.write({"step": 1, "loss": 1.0})
    assert len(_FakeSummaryWriter.instances) == 2  # no SummaryWriter for a disabled writer
    assert build_visualizer(None, str(tmp_path)) is None
    with pytest.raises(EvotuneError, match="visualizer"):
        build_visualizer({"type": "wandb"}, str(tmp_path))


def test_tensorboard_writer_real_or_clear_error(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(EvotuneError, match=r"pip install 'evotune\[tensorboard\]'"):
            TensorBoardWriter(str(tmp_path))
        return
    writer = TensorBoardWriter(str(tmp_path))
    writer.write({"step": 1, "loss": 2.0})
    writer.close()
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())
