"""`evotune migrate`: InternEvo configs in, loadable evotune configs with the same batch out (issue 8)."""

from __future__ import annotations

import ast
import json
import math
import re
import textwrap
from dataclasses import fields
from pathlib import Path

import pytest

from evotune.cli import main as cli_main
from evotune.config import FILE_VARIABLES, build, load_config
from evotune.errors import EvotuneError
from evotune.migrate import migrate_internevo_config, read_internevo_config
from evotune.migrate.batch import internevo_parallel
from evotune.migrate.rules import CHANGED, MAPPED, NOT_NEEDED, UNSUPPORTED
from evotune.settings import SECTIONS, resolve

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CONFORMANCE = SHARED / "conformance" / "internevo_data"

# The body of InternEvo's configs/7B_sft.py (InternEvo develop, 2024), with the
# parallel block and a few data keys left to each fixture.
BASE = '''
JOB_NAME = "7b_train"
DO_ALERT = False

SEQ_LEN = {seq_len}
HIDDEN_SIZE = 4096
NUM_ATTENTION_HEAD = 32
MLP_RATIO = 8 / 3
NUM_LAYER = 32
VOCAB_SIZE = 103168

MODEL_ONLY_FOLDER = "local:{model}"
SAVE_CKPT_FOLDER = "local:llm_ckpts"
CHECKPOINT_EVERY = 50
ckpt = dict(
    enable_save_ckpt=False,  # enable ckpt save.
    save_ckpt_folder=SAVE_CKPT_FOLDER,  # Path to save training ckpt.
    load_ckpt_folder="local:llm_ckpts/",
    load_ckpt_info=dict(path=MODEL_ONLY_FOLDER, content=("model",), ckpt_type="internevo"),
    auto_resume=False,
    checkpoint_every=CHECKPOINT_EVERY,
    async_upload=True,  # async ckpt upload. (only work for boto3 ckpt)
    async_upload_tmp_folder="/dev/shm/internlm_tmp_ckpt/",
    oss_snapshot_freq=int(CHECKPOINT_EVERY / 2),  # snapshot ckpt save frequency.
)

TRAIN_FOLDER = "{train}"
VALID_FOLDER = {valid}
data = dict(
    seq_len=SEQ_LEN,
    # micro_num means the number of micro_batch contained in one gradient update
    micro_num={micro_num},
    # packed_length = micro_bsz * SEQ_LEN
    micro_bsz={micro_bsz},
    valid_micro_num=4,
    valid_every={valid_every},
    pack_sample_into_one={one},
    total_steps={total_steps},
    skip_batches="",
    rampup_batch_size="",
    min_length={min_length},
    train_folder=TRAIN_FOLDER,
    valid_folder=VALID_FOLDER,
    empty_cache_and_diag_interval=200,
    diag_outlier_ratio=1.1,
)

grad_scaler = dict(
    fp16=dict(initial_scale=2**16, min_scale=1, growth_interval=1000),
    growth_factor=2,
    backoff_factor=0.5,
    max_scale=2**24,
    hysteresis=2,
)

hybrid_zero_optimizer = dict(
    overlap_sync_grad=True,
    overlap_sync_param=False,
    reduce_bucket_size=512 * 1024 * 1024,
    clip_grad_norm=1.0,
)

loss = dict(label_smoothing=0)

adam = dict(
    lr=1e-4,
    adam_beta1=0.9,
    adam_beta2=0.95,
    adam_beta2_c=0,
    adam_eps=1e-8,
    weight_decay=0.01,
)

lr_scheduler = dict(
    total_steps=data["total_steps"],
    init_steps=0,  # optimizer_warmup_step
    warmup_ratio={warmup_ratio},
    eta_min=1e-5,
    last_epoch=-1,
)

beta2_scheduler = dict(
    init_beta2=adam["adam_beta2"],
    c=adam["adam_beta2_c"],
    cur_iter=-1,
)

use_fp32_norm = False
model = dict(
    checkpoint=False,
    num_attention_heads=NUM_ATTENTION_HEAD,
    embed_split_hidden=True,
    vocab_size=VOCAB_SIZE,
    embed_grad_scale=1,
    parallel_output=True,
    hidden_size=HIDDEN_SIZE,
    num_layers=NUM_LAYER,
    mlp_ratio=MLP_RATIO,
    apply_post_layer_norm=False,
    dtype="torch.bfloat16",
    norm_type="rmsnorm",
    layer_norm_epsilon=1e-5,
    use_flash_attn=True,
    num_chunks=1,
)
"""
zero1 parallel (dict): ... (InternEvo's docstring)
"""
parallel = {parallel}

cudnn_deterministic = False
cudnn_benchmark = False

monitor = dict(
    alert=dict(
        enable_feishu_alert=DO_ALERT,
        feishu_alert_address=None,
        light_monitor_address=None,
        alert_file_path=f"llm_alter/{{JOB_NAME}}_alert.log",
    ),
    tensorboard=dict(queue_max_length=10),
)
{extra}
'''

DEFAULTS = dict(seq_len=2048, micro_num=4, micro_bsz=2, one=False, valid=None, valid_every=50, total_steps=50000,
                min_length=50, warmup_ratio=0.01, train="/data/train", model="llm_ckpts/7b", extra="",
                parallel='dict(zero1=dict(size=-1), tensor=dict(size=1, mode="mtp"), pipeline=dict(size=1))')

# The four layouts the issue names; `world`: GPUs of the InternEvo job.
FIXTURES = {
    "tp1_pp1_zero_all": dict(
        world=16, parallel='dict(zero1=dict(size=-1), tensor=dict(size=1, mode="mtp"), '
                           'pipeline=dict(size=1, interleaved_overlap=True), '
                           'weight=dict(size=1, overlap=True, memory_pool=True))'),
    "tp2_pp2_zero8": dict(
        world=64, parallel='dict(zero1=dict(size=8), tensor=dict(size=2, mode="mtp"), '
                           'pipeline=dict(size=2, interleaved_overlap=True))'),
    "isp_sp4_wp4": dict(
        world=32, seq_len=8192, micro_num=2, micro_bsz=1,
        parallel='dict(zero1=dict(size=-1), tensor=dict(size=4, mode="isp"), pipeline=dict(size=1), '
                 'weight=dict(size=4, overlap=True, launch_allgather_before="wo", forward_overlap_per="layer"), '
                 'sequence_2D=dict(enable=False, head_size=2, context_size=2, window_size=1, '
                 'device_placement_strategy=dict(head_first=True, interleaved=False)))'),
    "pack_into_one_valid": dict(
        world=8, one=True, valid='"/data/valid"', valid_every=25, micro_bsz=4, min_length=0,
        parallel='dict(zero1=dict(size=-1), tensor=dict(size=1, mode="mtp"), pipeline=dict(size=1))'),
}


def internevo_text(**overrides) -> str:
    values = {**DEFAULTS, **overrides}
    return BASE.format(**values)


def write_fixture(tmp_path: Path, name: str, **overrides) -> tuple[Path, dict]:
    spec = {**FIXTURES.get(name, {}), **overrides}
    world = spec.pop("world", None)
    path = tmp_path / f"{name}.py"
    path.write_text(internevo_text(**spec))
    return path, {**DEFAULTS, **spec, "world": world}


def write_output(tmp_path: Path, text: str, name: str = "migrated.py") -> Path:
    out = tmp_path / name
    out.write_text(text)
    return out


def evotune_tokens_per_step(cfg: dict, world: int) -> int:
    """From the loaded evotune config alone: dp (= world / SP) x batch x accumulation x max_length."""
    assert world % cfg["sequence_parallel_size"] == 0
    dp = world // cfg["sequence_parallel_size"]
    return dp * cfg["batch_size"] * cfg["accumulative_counts"] * cfg["max_length"]


# Tokens per step of each fixture, worked out by hand from InternEvo's rule
# dp = world / (tensor * pipeline): tokens = dp * micro_num * micro_bsz * seq_len.
EXPECTED_TOKENS = {
    "tp1_pp1_zero_all": 16 * 4 * 2 * 2048,  # dp 16
    "tp2_pp2_zero8": 16 * 4 * 2 * 2048,  # dp 64 / (2 * 2) = 16
    "isp_sp4_wp4": 8 * 2 * 1 * 8192,  # dp 32 / 4 = 8 (weight parallel does not change dp)
    "pack_into_one_valid": 8 * 4 * 4 * 2048,
}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_migrated_config_loads_and_keeps_tokens_per_step(tmp_path, name):
    src, spec = write_fixture(tmp_path, name)
    result = migrate_internevo_config(src, world_size=spec["world"])
    cfg = load_config(write_output(tmp_path, result.text))

    parallel = read_internevo_config(src).values["parallel"]
    tp = parallel["tensor"]["size"]
    pp = parallel["pipeline"]["size"]
    internevo = spec["world"] // (tp * pp) * spec["micro_num"] * spec["micro_bsz"] * spec["seq_len"]
    assert internevo == EXPECTED_TOKENS[name]
    assert evotune_tokens_per_step(cfg, spec["world"]) == internevo
    # the packs themselves are InternEvo's: packed_length and the split length
    assert cfg["max_length"] == spec["seq_len"] * spec["micro_bsz"]
    assert cfg["max_length_per_sample"] == spec["seq_len"]
    assert cfg["train_dataset"]["packed_length"] == cfg["max_length"]
    assert cfg["train_dataset"]["pack_sample_into_one"] is spec["one"]
    assert cfg["train_dataset"]["dataset_cfg"]["min_length"] == spec["min_length"]
    assert cfg["optim_wrapper"]["accumulative_counts"] == cfg["accumulative_counts"]
    assert cfg["pretrained_model_name_or_path"] == spec["model"]  # 'local:' stripped
    assert cfg["dataset_folder"] == spec["train"]
    assert cfg["max_steps"] == spec["total_steps"]
    opt = cfg["optim_wrapper"]["optimizer"]
    assert (opt["lr"], opt["betas"], opt["eps"], opt["weight_decay"]) == (1e-4, (0.9, 0.95), 1e-8, 0.01)
    assert cfg["optim_wrapper"]["clip_grad"]["max_norm"] == 1.0
    assert not result.unsupported, [r.key for r in result.unsupported]


# Top-level names a settings field reads (evotune/settings.py): a place, or the dict a nested place is in.
READ_BY_SETTINGS = {place.split(".")[0] for section in SECTIONS.values() for f in fields(section)
                    for place in f.metadata["places"]}


@pytest.mark.parametrize("name, extra", [(n, "") for n in sorted(FIXTURES)] + [
    ("tp1_pp1_zero_all", 'data["dataset_weights"] = dict(en=0.7, cn=0.3)\nlr_scheduler["total_steps"] = 80\n'
                         'ckpt["checkpoint_every"] = float("inf")'),
])
def test_migrated_config_writes_only_keys_the_trainer_reads(tmp_path, name, extra):
    """Every top-level name the migrated config assigns is read by a settings field, or is a file
    variable (torch_dtype, warm_up_ratio) a later line of the file uses; the settings resolve to the plan."""
    src, spec = write_fixture(tmp_path, name, extra=extra)
    result = migrate_internevo_config(src, world_size=spec["world"])
    settings = resolve(load_config(write_output(tmp_path, result.text)))
    tree = ast.parse(result.text)
    written = [t.id for stmt in tree.body if isinstance(stmt, ast.Assign) for t in stmt.targets
               if isinstance(t, ast.Name) and not t.id.startswith("_")]
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    assert len(written) > 30
    for key in written:
        assert key in READ_BY_SETTINGS or (key in FILE_VARIABLES and key in used), key
    plan = result.plan
    assert (settings.optim.accumulative_counts, settings.data.batch_size, settings.data.max_length,
            settings.parallel.sequence_parallel_size) == (plan.accumulative_counts, 1, plan.max_length,
                                                          plan.sequence_parallel_size)
    assert (settings.data.max_length_per_sample, settings.data.min_length, settings.data.seed) == (
        spec["seq_len"], spec["min_length"], 1024)
    assert settings.data.dataset_weights == ({"en": 0.7, "cn": 0.3} if extra else None)
    assert settings.schedule.max_steps == spec["total_steps"]
    assert settings.checkpoint.interval == (spec["total_steps"] if extra else 50)
    assert settings.eval.freq == (spec["valid_every"] if spec["valid"] else None)
    assert (settings.optim.lr, settings.optim.betas, settings.optim.max_norm) == (1e-4, (0.9, 0.95), 1.0)
    assert settings.optim.dtype == "bfloat16"


def test_tp2_pp2_zero8_rows(tmp_path):
    src, spec = write_fixture(tmp_path, "tp2_pp2_zero8")
    result = migrate_internevo_config(src, world_size=64)
    rows = {r.key: r for r in result.rows}
    assert result.plan.internevo.data_parallel_size == 16
    assert (result.plan.sequence_parallel_size, result.plan.data_parallel_size) == (1, 64)
    assert result.plan.accumulative_counts == 1  # 16 dp x 4 micro_num = 64 packs over 64 ranks
    assert rows["data.micro_num"].status == CHANGED
    assert rows["parallel.zero1"].status == CHANGED and "groups of 8" in rows["parallel.zero1"].note
    assert rows["parallel.pipeline"].status == NOT_NEEDED and "pipeline" in rows["parallel.pipeline"].note
    assert result.deepspeed == "deepspeed_zero1"


def test_isp_maps_to_sequence_parallel_and_zero3(tmp_path):
    src, _ = write_fixture(tmp_path, "isp_sp4_wp4")
    result = migrate_internevo_config(src, world_size=32)
    cfg = load_config(write_output(tmp_path, result.text))
    assert cfg["sequence_parallel_size"] == 4
    assert cfg["accumulative_counts"] == 2  # dp 8 on both sides
    rows = {r.key: r for r in result.rows}
    assert rows["parallel.tensor"].status == MAPPED
    assert rows["parallel.weight"].status == CHANGED
    assert rows["parallel.sequence_2D"].status == NOT_NEEDED
    assert result.deepspeed == "deepspeed_zero3"
    ie = internevo_parallel(read_internevo_config(src).values["parallel"], 32)
    assert (ie.data_parallel_size, ie.weight_data_parallel_size, ie.zero_group) == (8, 8, 8)


def test_pack_into_one_with_validation(tmp_path):
    src, _ = write_fixture(tmp_path, "pack_into_one_valid")
    result = migrate_internevo_config(src, world_size=8)
    cfg = load_config(write_output(tmp_path, result.text))
    assert cfg["pack_sample_into_one"] is True
    assert cfg["valid_folder"] == "/data/valid"
    assert cfg["evaluation_freq"] == 25
    rows = {r.key: r for r in result.rows}
    assert rows["data.valid_folder"].status == MAPPED and rows["data.valid_every"].status == MAPPED


def test_every_translated_line_names_its_internevo_key(tmp_path):
    src, _ = write_fixture(tmp_path, "tp1_pp1_zero_all")
    text = migrate_internevo_config(src, world_size=16).text
    settings = text.split("PART 1  Settings")[1].split("PART 2")[0]
    assignments = [ln for ln in settings.splitlines() if re.match(r"^_?[a-zA-Z_]+ = ", ln)]
    assert len(assignments) > 20
    for ln in assignments:
        assert "  # " in ln, f"no comment: {ln}"
    comment = {ln.split(" = ")[0]: ln.split("  # ", 1)[1] for ln in assignments}
    sources = {
        "pretrained_model_name_or_path": "ckpt.load_ckpt_info.path", "dataset_folder": "data.train_folder",
        "max_length": "data.micro_bsz", "max_length_per_sample": "data.seq_len", "min_length": "data.min_length",
        "accumulative_counts": "data.micro_num", "max_steps": "data.total_steps", "lr": "adam.lr",
        "betas": "adam.adam_beta2", "eps": "adam.adam_eps", "weight_decay": "adam.weight_decay",
        "max_norm": "hybrid_zero_optimizer.clip_grad_norm", "warm_up_ratio": "lr_scheduler.warmup_ratio",
        "label_smoothing": "loss.label_smoothing", "sequence_parallel_size": "parallel.tensor",
        "save_steps": "ckpt.checkpoint_every", "torch_dtype": "model.dtype", "_eta_min": "lr_scheduler.eta_min",
        "seed": "data.seed", "pack_sample_into_one": "data.pack_sample_into_one",
    }
    for name, key in sources.items():
        assert key in comment[name], (name, comment[name])
    # and the line the key sits on in the source
    src_lines = src.read_text().splitlines()
    line = int(re.search(r"data\.micro_num \(line (\d+)\)", comment["accumulative_counts"]).group(1))
    assert src_lines[line - 1].strip().startswith("micro_num=")


def _internevo_lr(step: int, lr: float, total: int, ratio: float, eta_min: float) -> float:
    """InternEvo's FineTuneCosineAnnealingWarmupLR (init_steps=0) in closed form."""
    warmup = int(total * ratio)
    if step < warmup:
        return lr * (step + 1) / warmup
    return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2


@pytest.mark.parametrize("ratio", [0.1, 0.01, 0.005])  # W = 10, 1 and 0 warm-up steps
def test_schedule_matches_internevo_step_for_step(tmp_path, ratio):
    import torch

    from evotune.train.schedule import build_scheduler

    src, _ = write_fixture(tmp_path, "tp1_pp1_zero_all", total_steps=100, warmup_ratio=ratio)
    cfg = load_config(write_output(tmp_path, migrate_internevo_config(src, world_size=16).text))
    param = torch.nn.Parameter(torch.zeros(1))
    opt = build(cfg["optim_wrapper"]["optimizer"], params=[param])
    sched = build_scheduler(opt, [build(p) for p in cfg["param_scheduler"]], steps_per_epoch=7,
                            total_steps=cfg["max_steps"])
    for step in range(100):
        want = _internevo_lr(step, 1e-4, 100, ratio, 1e-5)
        assert sched.get_last_lr()[0] == pytest.approx(want, rel=1e-12, abs=1e-18), step
        opt.step()
        sched.step()


def test_schedule_with_its_own_total_steps(tmp_path):
    import torch

    from evotune.train.schedule import build_scheduler

    src, _ = write_fixture(tmp_path, "tp1_pp1_zero_all", total_steps=100, warmup_ratio=0.1,
                           extra='lr_scheduler["total_steps"] = 80')
    cfg = load_config(write_output(tmp_path, migrate_internevo_config(src, world_size=16).text))
    assert cfg["max_steps"] == 100
    opt = build(cfg["optim_wrapper"]["optimizer"], params=[torch.nn.Parameter(torch.zeros(1))])
    sched = build_scheduler(opt, [build(p) for p in cfg["param_scheduler"]], steps_per_epoch=7, total_steps=100)
    for step in range(80):  # past its total_steps InternEvo's torch cosine turns back up; evotune stays at eta_min
        assert sched.get_last_lr()[0] == pytest.approx(_internevo_lr(step, 1e-4, 80, 0.1, 1e-5), rel=1e-12), step
        opt.step()
        sched.step()


def test_checkpoint_and_precision_translation(tmp_path):
    extra = textwrap.dedent('''
        model["dtype"] = "torch.float16"
        model["checkpoint"] = 0.5
        ckpt["auto_resume"] = True
        ckpt["load_ckpt_info"] = dict(path="local:/ckpt/7b", content=("model", "optimizer"), ckpt_type="hf")
        ckpt["save_ckpt_folder"] = "boto3:s3://bucket/ckpt"
    ''')
    src, _ = write_fixture(tmp_path, "tp1_pp1_zero_all", extra=extra)
    result = migrate_internevo_config(src, world_size=16)
    rows = {r.key: r for r in result.rows}
    cfg = load_config(write_output(tmp_path, result.text))
    assert cfg["torch_dtype"] == "bfloat16" and rows["model.dtype"].status == CHANGED
    assert rows["grad_scaler"].status == CHANGED
    assert cfg["activation_checkpointing"] is True and rows["model.checkpoint"].status == CHANGED
    assert cfg["pretrained_model_name_or_path"] == "/ckpt/7b"
    assert rows["ckpt.auto_resume"].status == CHANGED
    assert {r.key for r in result.unsupported} == {"ckpt.load_ckpt_info.content", "ckpt.save_ckpt_folder"}
    assert "work_dir" not in cfg


def test_unsupported_keys_are_reported_and_exit_non_zero(tmp_path, capsys):
    extra = textwrap.dedent('''
        data["rampup_batch_size"] = "192 24 8"
        moe_loss_coeff = 0.1
    ''')
    src, _ = write_fixture(tmp_path, "tp1_pp1_zero_all", extra=extra)
    result = migrate_internevo_config(src, world_size=16)
    unsupported = {r.key: r for r in result.unsupported}
    assert set(unsupported) == {"data.rampup_batch_size", "moe_loss_coeff"}
    out = tmp_path / "out.py"
    rc = cli_main(["migrate", str(src), "-o", str(out), "--world-size", "16", "--plain"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "data.rampup_batch_size" in captured.err and "moe_loss_coeff" in captured.err
    table = [ln for ln in captured.out.splitlines() if ln.startswith("data.rampup_batch_size")]
    assert len(table) == 1 and UNSUPPORTED in table[0]
    load_config(out)  # still written and loadable



@pytest.mark.parametrize("experts, status", [(1, NOT_NEEDED), (4, UNSUPPORTED)])
def test_one_expert_is_a_dense_model(tmp_path, experts, status):
    src, _ = write_fixture(tmp_path, "tp1_pp1_zero_all", extra=f'model["num_experts"] = {experts}')
    result = migrate_internevo_config(src, world_size=16)
    assert {r.key: r for r in result.rows}["model.num_experts"].status == status
    assert [r.key for r in result.unsupported] == ([] if experts == 1 else ["model.num_experts"])

def test_no_integer_fit_proposes_nearest_world_sizes(tmp_path):
    src, _ = write_fixture(tmp_path, "tp1_pp1_zero_all")
    # InternEvo on 24 GPUs: 24 dp x 4 micro_num = 96 packs per step; 64 ranks cannot share 96 packs
    with pytest.raises(EvotuneError) as info:
        migrate_internevo_config(src, world_size=24, target_world_size=64)
    message = str(info.value)
    assert "no integer accumulation fits" in message and "96 packs" in message
    assert "48 (dp 48, accumulative_counts 2)" in message and "96 (dp 96, accumulative_counts 1)" in message
    # a proposal that is taken works
    result = migrate_internevo_config(src, world_size=24, target_world_size=48)
    assert result.plan.tokens_per_step == result.plan.internevo_tokens_per_step == 24 * 4 * 2 * 2048


def test_sequence_parallel_raised_when_tensor_ranks_must_stay_together(tmp_path):
    # mtp tp=2 pp=2 on 32 GPUs with micro_num 2: dp 8 x 2 = 16 packs; 32 ranks cannot share them,
    # 16 ranks (SP 2) can
    src, _ = write_fixture(tmp_path, "tp2_pp2_zero8", micro_num=2,
                           parallel='dict(zero1=dict(size=-1), tensor=dict(size=2, mode="mtp"), pipeline=dict(size=2))')
    result = migrate_internevo_config(src, world_size=32)
    assert (result.plan.sequence_parallel_size, result.plan.accumulative_counts) == (2, 1)
    assert {r.key: r for r in result.rows}["parallel.tensor"].status == CHANGED
    with pytest.raises(EvotuneError, match="no integer accumulation fits.*--sequence-parallel-size 2"):
        migrate_internevo_config(src, world_size=32, sequence_parallel_size=1)


def test_sequence_parallel_size_splits_the_attention_heads(tmp_path):
    # InternEvo's configs/20B_isp_sft.py layout: isp over 32 ranks, 48 heads, 64k packs, 64 GPUs -> dp 2.
    # Ulysses cannot give 32 ranks 48 / 32 heads: the largest size that splits them and the batch is 16.
    src, _ = write_fixture(tmp_path, "isp_20b", seq_len=65536, micro_bsz=1, micro_num=4,
                           parallel='dict(zero1=dict(size=-1), tensor=dict(size=32, mode="isp"), '
                                    'pipeline=dict(size=1), weight=dict(size=4))')
    src.write_text(src.read_text().replace("NUM_ATTENTION_HEAD = 32", "NUM_ATTENTION_HEAD = 48"))
    result = migrate_internevo_config(src, world_size=64)
    cfg = load_config(write_output(tmp_path, result.text))
    assert (cfg["sequence_parallel_size"], cfg["accumulative_counts"]) == (16, 2)
    assert evotune_tokens_per_step(cfg, 64) == 2 * 4 * 65536
    assert "48 attention heads" in {r.key: r for r in result.rows}["parallel.tensor"].note
    with pytest.raises(EvotuneError, match="48 attention heads cannot be split over 32 ranks"):
        migrate_internevo_config(src, world_size=64, sequence_parallel_size=32)


def test_world_size_internevo_would_reject(tmp_path):
    src, _ = write_fixture(tmp_path, "tp2_pp2_zero8")
    with pytest.raises(EvotuneError, match="would not run on 12 GPUs.*zero1 size 8 does not divide"):
        migrate_internevo_config(src, world_size=12)  # dp 3
    with pytest.raises(EvotuneError, match="would not run on 10 GPUs.*not a multiple of tensor 2 x pipeline 2"):
        migrate_internevo_config(src, world_size=10)
    result = migrate_internevo_config(src)  # no world size: the smallest InternEvo accepts, said out loud
    assert result.plan.internevo.world_size == 32 and "32 GPUs" in result.assumptions[0]
    assert "Assumed:" in result.text


@pytest.mark.skipif(not (SHARED / "conformance" / "internlm2").is_dir(), reason="../shared is absent")
def test_model_dimensions_are_checked_against_the_checkpoint(tmp_path):
    ckpt = SHARED / "conformance" / "internlm2" / "internevo_ckpt_tp2pp2"
    dims = dict(NUM_LAYER="4", HIDDEN_SIZE="64", NUM_ATTENTION_HEAD="8", VOCAB_SIZE="128")

    def fixture(**changed) -> Path:
        text = internevo_text(model=str(ckpt))
        for name, value in {**dims, **changed}.items():
            text = re.sub(rf"^{name} = .*$", f"{name} = {value}", text, flags=re.M)
        path = tmp_path / "dims.py"
        path.write_text(text)
        return path

    rows = {r.key: r for r in migrate_internevo_config(fixture(), world_size=8).rows}
    assert "checked: equal" in rows["model.hidden_size"].note
    assert "checked: equal" in rows["model.num_layers"].note
    with pytest.raises(EvotuneError, match=r"dims\.py:\d+: model\.hidden_size = 128 but the checkpoint .* has 64"):
        migrate_internevo_config(fixture(HIDDEN_SIZE="128"), world_size=8)


def test_cli_writes_once_and_prints_the_table(tmp_path, capsys):
    src, _ = write_fixture(tmp_path, "isp_sp4_wp4")
    out = tmp_path / "sub" / "evotune_cfg.py"
    assert cli_main(["migrate", str(src), "-o", str(out), "--world-size", "32", "--plain"]) == 0
    printed = capsys.readouterr().out
    assert "parallel.tensor" in printed and "tokens per optimizer step: InternEvo 131,072 = evotune 131,072" in printed
    assert "--deepspeed deepspeed_zero3" in printed
    assert load_config(out)["sequence_parallel_size"] == 4
    assert cli_main(["migrate", str(src), "-o", str(out), "--world-size", "32"]) == 2  # exists, no --force
    assert "already exists" in capsys.readouterr().err


def test_every_shipped_config_loads():
    from evotune.configs import config_path, names

    required = {"pretrained_model_name_or_path", "use_varlen_attn", "dataset_folder", "max_length",
                "accumulative_counts", "sequence_parallel_size", "train_dataset", "train_dataloader",
                "optim_wrapper", "param_scheduler", "model", "tokenizer"}
    assert len(names()) >= 7
    for name in names():
        cfg = load_config(config_path(name))
        missing = required - set(cfg)
        assert not missing, (name, missing)
        assert cfg["train_dataset"]["packed_length"] == cfg["max_length"], name


def _batches(tmp_path: Path, config: Path, steps: int, world: int, rank: int) -> list[dict]:
    out = tmp_path / f"batches_w{world}_r{rank}.jsonl"
    assert cli_main(["batches", str(config), "--steps", str(steps), "--world-size", str(world), "--rank", str(rank),
                     "--out", str(out)]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def _golden_micro_batches(golden: dict, rank: int) -> list[dict]:
    return [{"step": step["step"], "micro": micro, "input_ids": mb["input_ids"], "labels": mb["labels"],
             "cu_seqlens": mb["cu_seqlens"], "position_ids": mb["indexes"], "type_ids": mb["type_ids"]}
            for step in golden["ranks"][rank]["steps"] for micro, mb in enumerate(step["micro_batches"])]


def _migrate_golden_case(tmp_path: Path, case_id: str, **kwargs) -> tuple[dict, Path]:
    golden = json.loads((CONFORMANCE / "golden" / "small" / f"{case_id}.json").read_text())
    p = golden["params"]
    src, _ = write_fixture(tmp_path, "golden", seq_len=p["seq_len"], micro_bsz=p["micro_bsz"],
                           micro_num=p["micro_num"], min_length=p["min_length"], one=p["pack_sample_into_one"],
                           train=str(CONFORMANCE / p["train_folder"]), total_steps=40,
                           extra=f'data["seed"] = {p["seed"]}')
    result = migrate_internevo_config(src, world_size=p["dp_world"])
    return golden, write_output(tmp_path, result.text)


needs_conformance = pytest.mark.skipif(not (CONFORMANCE / "golden" / "index.json").is_file(),
                                       reason="../shared/conformance/internevo_data is absent")


@needs_conformance
@pytest.mark.parametrize("case_id", [
    "small-s16-b1-n1-dp2-m0-cut-seed1024", "small-s16-b1-n3-dp2-m0-cut-seed1024",
    "small-s16-b2-n1-dp1-m0-cut-seed1024", "small-s16-b2-n3-dp2-m0-cut-seed1024",
    "small-s16-b2-n3-dp1-m5-one-seed1024",
])
def test_batches_of_a_migrated_config_are_internevos(tmp_path, monkeypatch, case_id):
    monkeypatch.setenv("EVOTUNE_CACHE", str(tmp_path / "cache"))
    golden, config = _migrate_golden_case(tmp_path, case_id)
    world = golden["params"]["dp_world"]
    for rank in range(world):
        steps = len(golden["ranks"][rank]["steps"])
        assert _batches(tmp_path, config, steps, world, rank) == _golden_micro_batches(golden, rank)


@needs_conformance
def test_fewer_gpus_train_the_same_packs_per_step(tmp_path, monkeypatch):
    """InternEvo on 2 GPUs (micro_num 3) -> evotune on 1 GPU with accumulation 6: each optimizer step
    trains the same 6 packs (InternEvo's global permutation in blocks of dp x micro_num), across epochs."""
    monkeypatch.setenv("EVOTUNE_CACHE", str(tmp_path / "cache"))
    golden, _ = _migrate_golden_case(tmp_path, "small-s16-b2-n3-dp2-m0-cut-seed1024")
    p = golden["params"]
    src = tmp_path / "golden.py"
    config = write_output(tmp_path, migrate_internevo_config(src, world_size=2, target_world_size=1).text, "one_gpu.py")
    assert load_config(config)["accumulative_counts"] == 6
    steps = len(golden["ranks"][0]["steps"])
    assert steps > golden["steps_per_epoch"]  # the comparison crosses an epoch boundary
    ours = _batches(tmp_path, config, steps, 1, 0)
    for s in range(steps):
        theirs = sorted(mb["input_ids"] for r in range(p["dp_world"])
                        for mb in golden["ranks"][r]["steps"][s]["micro_batches"])
        assert sorted(b["input_ids"] for b in ours if b["step"] == s) == theirs, s


@pytest.mark.skipif(not (SHARED / "conformance" / "internlm2").is_dir(), reason="../shared is absent")
def test_migrated_config_trains_from_the_internevo_checkpoint(tmp_path, monkeypatch):
    """An InternEvo tp2/pp2 checkpoint and folder, migrated, train 3 steps on CPU with InternEvo's lr and batch."""
    import numpy as np

    from tests.conftest import random_documents, write_folder

    monkeypatch.setenv("EVOTUNE_CACHE", str(tmp_path / "cache"))
    rng = np.random.RandomState(0)
    folder = write_folder(tmp_path / "data", {"en/a/x.bin": random_documents(rng, 60),
                                              "cn/b/y.bin": random_documents(rng, 40)})
    ckpt = SHARED / "conformance" / "internlm2" / "internevo_ckpt_tp2pp2"
    extra = textwrap.dedent('''
        model["num_layers"] = 4
        model["hidden_size"] = 64
        model["num_attention_heads"] = 8
        model["vocab_size"] = 128
        model["dtype"] = "torch.float32"
    ''')
    src, _ = write_fixture(tmp_path, "tiny", seq_len=32, micro_bsz=2, micro_num=2, total_steps=3, min_length=0,
                           warmup_ratio=0.34, model=str(ckpt), train=folder, extra=extra)
    config = write_output(tmp_path, migrate_internevo_config(src, world_size=1).text)
    work = tmp_path / "work"
    assert cli_main(["train", str(config), "--device", "cpu", "--work-dir", str(work)]) == 0
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:  # W = int(3 * 0.34) = 1 warm-up step, then cosine over 2
        assert r["lr"] == pytest.approx(_internevo_lr(r["step"] - 1, 1e-4, 3, 0.34, 1e-5), rel=1e-12)
    assert records[-1]["tokens"] == 3 * 2 * 64  # steps x micro_num x packed_length, every token real
    assert (work / "hf" / "config.json").is_file()
