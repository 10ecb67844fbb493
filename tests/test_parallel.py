"""[parallel] single, pmap and mesh give the same training; sharded checkpoints resume anywhere; multi-host.

Multi-device runs happen in subprocesses with `XLA_FLAGS=--xla_force_host_platform_device_count=N`, many
runs per process (`tests/helpers/parallel_driver.py`, run by `tests/helpers/parallel_runs.py`) so JAX
starts once. The recipe is configs/stories260k-alpaca.yaml with `data.seq_len` 128 (to keep CPU time low),
10 steps, a checkpoint every 5 and losses logged at every step.
"""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from jaxlora.config import config_from_dict
from jaxlora.train import train
from tests.helpers.parallel_runs import DRIVER, STEPS, _config, _drive, _env, _results

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
VARIANTS = {  # run name -> overrides; every one is compared with "single"
    "single": {"parallel.strategy": "single"},
    "pmap": {"parallel.strategy": "pmap"},
    "data4": {"parallel.strategy": "mesh"},
    "fsdp4": {"parallel.strategy": "mesh", "parallel.mesh.fsdp": 4},
    "d2t2": {"parallel.strategy": "mesh", "parallel.mesh.tensor": 2},
}
LABELS = {
    "pmap": "pmap x4",
    "data4": "mesh data=4",
    "fsdp4": "mesh fsdp=4",
    "d2t2": "mesh data=2 x tensor=2",
}


def _max_diff(a: dict, b: dict, steps) -> float:
    assert set(steps) <= set(a) and set(steps) <= set(b), (sorted(a), sorted(b))
    return max(abs(a[s] - b[s]) for s in steps)


def _adapter(run_dir: Path) -> dict:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _adapter_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def _resumable_copy(src: Path, dst: Path, keep_up_to: int) -> None:
    """`src` run folder copied without its checkpoints after `keep_up_to` or its logs and exports."""
    shutil.copytree(src, dst)
    for p in (dst / "checkpoints").iterdir():
        if int(p.name) > keep_up_to:
            shutil.rmtree(p)
    for name in ("metrics.jsonl", "tensorboard", "adapter", "run_state.json"):
        path = dst / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.fixture(scope="module")
def four(assets, tmp_path_factory):
    """One 4-device process: every strategy, a resume onto another mesh, NF4 on a mesh, sharding specs."""
    root = tmp_path_factory.mktemp("parallel4")
    model = str(assets / "models" / "stories260K")
    runs = [
        {
            "name": "specs fsdp4 nf4",
            "plan": {"strategy": "mesh", "mesh": {"fsdp": 4}},
            "model": model,
            "quant": "nf4",
        },
        {
            "name": "specs d2t2 int8",
            "plan": {"strategy": "mesh", "mesh": {"tensor": 2}},
            "model": model,
            "quant": "int8",
        },
        {
            "name": "specs f2t2",
            "plan": {"strategy": "mesh", "mesh": {"fsdp": 2, "tensor": 2}},
            "model": model,
            "quant": "none",
        },
    ]
    runs += [{"name": n, "config": _config(assets, root / n, **over)} for n, over in VARIANTS.items()]
    runs.append(
        {
            "name": "resume fsdp4 -> d2t2",
            "config": _config(
                assets, root / "resume-d2t2", **VARIANTS["d2t2"], **{"checkpoint.resume": "always"}
            ),
            "copy_from": str(root / "fsdp4"),
            "keep_up_to": 5,
        }
    )
    quick = {
        "train.max_steps": 3,
        "train.warmup_steps": 2,
        "train.eval_every_steps": None,
        "checkpoint.every_steps": None,
    }
    for name, over in (
        ("nf4 single", VARIANTS["single"]),
        ("nf4 f2t2", {"parallel.mesh.fsdp": 2, "parallel.mesh.tensor": 2}),
    ):
        cfg = _config(assets, root / name.replace(" ", "-"), **over, **quick, **{"quant.weights": "nf4"})
        runs.append({"name": name, "config": cfg})
    return root, _drive(runs, 4, root / "runs.json")


def test_strategies_give_the_single_device_losses(four):
    _, res = four
    single = res["single"]
    assert sorted(single["losses"]) == list(range(1, STEPS + 1))
    for name, label in LABELS.items():
        diff = _max_diff(res[name]["losses"], single["losses"], range(1, STEPS + 1))
        evals = max(abs(a[1] - b[1]) for a, b in zip(res[name]["eval"], single["eval"], strict=True))
        print(
            f"{label}: max train-loss diff vs single over {STEPS} steps {diff:.2e}, "
            f"eval-loss diff {evals:.2e}"
        )
        assert diff <= TOL and evals <= TOL, label
    assert len(single["eval"]) == 2
    print("single losses:", [round(single["losses"][s], 4) for s in range(1, STEPS + 1)])


def test_sharding_rules(four):
    _, res = four
    f4 = res["specs fsdp4 nf4"]["specs"]
    assert f4["lora/attn/q_proj/a"] == [None, "fsdp"]  # A [L, in, r]: in = embed
    assert f4["lora/mlp/down_proj/b"] == [None, None, "fsdp"]  # B [L, r, out]: out = embed
    assert f4["base/layers/attn/q_proj/kernel/data"] == [None, "fsdp"]  # NF4 packed [L, in/2, out]
    assert f4["base/layers/attn/q_proj/kernel/scale_codes"] == []
    t2 = res["specs d2t2 int8"]["specs"]
    assert t2["base/layers/attn/q_proj/kernel/data"] == [None, None, "tensor"]  # column split
    assert t2["base/layers/attn/q_proj/kernel/scale"] == [None, None, "tensor"]
    assert t2["base/layers/attn/o_proj/kernel/data"] == [None, "tensor"]  # row split
    assert t2["base/embed/embedding"] == ["tensor"]  # vocab
    both = res["specs f2t2"]["specs"]
    assert both["base/layers/mlp/gate_proj/kernel"] == [None, "fsdp", "tensor"]
    assert both["base/layers/mlp/down_proj/kernel"] == [None, "tensor", "fsdp"]
    assert both["lora/mlp/down_proj/a"] == [None, "tensor"]
    assert both["lora/attn/k_proj/b"] == [None, None, "tensor"]
    assert both["base/layers/attn_norm/scale"] == []


def test_nf4_base_on_a_mesh_matches_single(four):
    _, res = four
    diff = _max_diff(res["nf4 f2t2"]["losses"], res["nf4 single"]["losses"], range(1, 4))
    print(f"NF4 base, mesh fsdp=2 x tensor=2 vs single: max loss diff {diff:.2e}")
    assert diff <= TOL


def test_fsdp_checkpoint_resumes_on_data_x_tensor(four):
    root, res = four
    resumed = res["resume fsdp4 -> d2t2"]["losses"]
    assert sorted(resumed) == list(range(6, STEPS + 1))  # really resumed from step 5
    diff = _max_diff(resumed, res["fsdp4"]["losses"], range(6, STEPS + 1))
    adapter = _adapter_diff(_adapter(root / "resume-d2t2"), _adapter(root / "single"))
    print(
        f"fsdp=4 checkpoint resumed on data=2 x tensor=2: max loss diff {diff:.2e}, "
        f"adapter vs single {adapter:.2e}"
    )
    assert diff <= TOL and adapter <= TOL


def test_fsdp_checkpoint_resumes_on_one_device(four, assets, tmp_path):
    root, res = four
    out = tmp_path / "run"
    _resumable_copy(root / "fsdp4", out, keep_up_to=5)
    losses = {}
    cfg = config_from_dict(_config(assets, out, **VARIANTS["single"]))  # in this pytest process
    train(cfg, on_step=lambda step, m: losses.__setitem__(step, m["train/loss"]))
    assert sorted(losses) == list(range(6, STEPS + 1))
    diff = _max_diff(losses, res["fsdp4"]["losses"], range(6, STEPS + 1))
    adapter = _adapter_diff(_adapter(out), _adapter(root / "single"))
    print(f"fsdp=4 checkpoint resumed on 1 device: max loss diff {diff:.2e}, adapter vs single {adapter:.2e}")
    assert diff <= TOL and adapter <= TOL


def test_peft_export_of_sharded_runs_equals_single(four):
    root, _ = four
    single = _adapter(root / "single")
    assert len(single) == 2 * 7 * 5  # A and B of 7 modules in 5 layers
    for name, label in LABELS.items():
        diff = _adapter_diff(_adapter(root / name), single)
        print(f"{label}: adapter_model.safetensors max abs diff vs single {diff:.2e}")
        assert diff <= TOL, label


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_four_devices(four, assets, tmp_path):
    root, res = four
    port = _free_port()
    procs = []
    for pid in range(2):
        dist = {
            "parallel.distributed.coordinator_address": f"127.0.0.1:{port}",
            "parallel.distributed.num_processes": 2,
            "parallel.distributed.process_id": pid,
        }
        runs = [
            {"name": "auto", "config": _config(assets, tmp_path / "auto", **dist)},
            {"name": "pmap", "config": _config(assets, tmp_path / "pmap", **VARIANTS["pmap"], **dist)},
        ]
        spec = tmp_path / f"runs{pid}.json"
        spec.write_text(json.dumps(runs))
        procs.append(
            subprocess.Popen(
                [sys.executable, str(DRIVER), str(spec)],
                cwd=ROOT,
                env=_env(2),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=900))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-4000:]
    first, second = (_results(o) for o, _ in outs)
    for name, ref in (("auto", "data4"), ("pmap", "pmap")):
        assert first[name]["losses"] == second[name]["losses"]  # both hosts saw the same global step
        diff = _max_diff(first[name]["losses"], res[ref]["losses"], range(1, STEPS + 1))
        adapter = _adapter_diff(_adapter(tmp_path / name), _adapter(root / ref))
        print(
            f"2 processes x 2 devices ({name}) vs 1 process x 4 devices ({LABELS[ref]}): "
            f"max loss diff {diff:.2e}, adapter diff {adapter:.2e}"
        )
        assert diff <= TOL and adapter <= TOL
    # Only process 0 writes the logs: one line per step, one event file.
    lines = [json.loads(x) for x in (tmp_path / "auto" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(d["step"] for d in lines if "train/loss" in d) == list(range(1, STEPS + 1))
    assert len(list((tmp_path / "auto" / "tensorboard").iterdir())) == 1
    assert sorted(int(p.name) for p in (tmp_path / "auto" / "checkpoints").iterdir()) == [5, 10]


@pytest.mark.parametrize(
    ("devices", "overrides", "needle"),
    [
        (
            4,
            ["train.batch_size=6"],
            "train.batch_size 6 is not divisible by the data-parallel size 4 "
            "(parallel.mesh data=4 x fsdp=1: rows split over both); use a multiple of 4, e.g. 4 or 8",
        ),
        (
            4,
            ["parallel.mesh.data=2"],
            "parallel.mesh data=2 x fsdp=1 x tensor=1 = 2 devices, but there are 4; make the product 4",
        ),
        (
            8,
            ["parallel.mesh.tensor=8"],
            "parallel.mesh.tensor=8 does not divide the model's 4 KV heads (num_key_value_heads); "
            "use a tensor size among 1, 2, 4",
        ),
    ],
    ids=["batch-not-divisible", "mesh-not-device-count", "tensor-not-dividing-kv-heads"],
)
def test_bad_parallel_input_one_line_exit_2(devices, overrides, needle, assets, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_config(assets, tmp_path / "run")))
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", "--config", str(path), *overrides],
        cwd=ROOT,
        env=_env(devices),
        capture_output=True,
        text=True,
    )
    lines = proc.stderr.strip().splitlines()
    print(lines[-1] if lines else "")
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()  # refused before touching output_dir
