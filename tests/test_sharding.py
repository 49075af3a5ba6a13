"""Sharded training: 1 vs 8 devices, 2 processes vs 1, the gradient all-reduce, FSDP parent, errors.

Simulated CPU devices need XLA_FLAGS before jax starts, so the multi-device
runs happen in subprocesses (``tests/multihost_worker.py``); the one-device
reference runs here. Tiny toy nets with BatchNorm in the child, 5 HKT steps.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from hkt_jax.training import sharding
from tests import multihost_worker as worker
from tests.conftest import REPO_ROOT

WORKER_TIMEOUT_S = 240
RTOL = 1e-5


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("XLA_FLAGS", None)  # the worker sets its own device count
    return env


def _worker_cmd(out, *args):
    return [sys.executable, "-m", "tests.multihost_worker", *args, "--out", str(out)]


def _read(path):
    result = json.loads(path.read_text())
    assert "error" not in result, f"worker failed:\n{result['error']}"
    return result


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    """One process with 8 simulated devices runs every single-process task once."""
    out = tmp_path_factory.mktemp("eight") / "result.json"
    proc = subprocess.run(
        _worker_cmd(out, "--devices", "8", "--task", "steps,allreduce,errors,model_axis"),
        cwd=REPO_ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=WORKER_TIMEOUT_S,
    )
    assert proc.returncode == 0 or out.exists(), proc.stderr[-4000:]
    result = _read(out)
    assert result["device_count"] == 8
    return result


def _assert_same_run(a, b, rtol=RTOL):
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=rtol)
    assert len(a["losses"]) >= 5 or len(a["losses"]) == len(b["losses"])
    for group in ("params", "batch_stats"):
        assert a[group].keys() == b[group].keys()
        for key in a[group]:
            x, y = np.asarray(a[group][key]), np.asarray(b[group][key])
            # Relative to the leaf's scale; the floor covers leaves that stay ~0 (e.g. adapter
            # biases, whose exact gradient is 0 under softmax GA and that hold only rounding noise).
            tol = rtol * np.abs(y).max() + 1e-8
            assert np.abs(x - y).max() <= tol, f"{group}{key}: max diff {np.abs(x - y).max():.3g} > {tol:.3g}"


# -- global-batch semantics -------------------------------------------------------------------------


def test_one_device_matches_eight_devices(eight):
    """Same global batches and seed: 5 HKT steps on 1 and on 8 devices give the same losses,
    params and BatchNorm running statistics (so the statistics are over the global batch)."""
    one = worker.hkt_steps(sharding.make_mesh(1, 1, devices=jax.devices()[:1]))
    assert len(one["losses"]) == worker.STEPS >= 5
    _assert_same_run(eight["steps"], one)
    assert np.isfinite(one["losses"]).all()
    # The run does something: params moved, the BN running mean left zero.
    assert any(np.abs(np.asarray(v)).max() > 0 for v in one["batch_stats"].values())


def test_two_processes_match_one_process_with_eight_devices(eight, tmp_path):
    """jax.distributed on localhost (gloo): 2 processes x 4 devices == 1 process x 8 devices,
    and an orbax checkpoint written by both processes restores exactly onto the same shardings."""
    port = _free_port()
    out = tmp_path / "mp.json"
    procs = [
        subprocess.Popen(
            _worker_cmd(
                out,
                "--devices",
                "4",
                "--coordinator",
                f"localhost:{port}",
                "--num_processes",
                "2",
                "--process_id",
                str(i),
                "--task",
                "steps",
                "--workdir",
                str(tmp_path / "ckpt"),
            ),
            cwd=REPO_ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=WORKER_TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail("the two-process run hung (killed after %ds)" % WORKER_TIMEOUT_S)
    for i, proc in enumerate(procs):
        assert proc.returncode == 0, f"process {i} failed:\n{logs[i][-4000:]}"
    results = [_read(tmp_path / f"mp.json.{i}") for i in range(2)]
    for i, result in enumerate(results):
        assert (result["process_index"], result["process_count"]) == (i, 2)
        assert (result["device_count"], result["local_device_count"]) == (8, 4)
    _assert_same_run(results[0]["steps"], eight["steps"])
    _assert_same_run(results[1]["steps"], results[0]["steps"], rtol=0)  # both see the same global values
    for result in results:
        ckpt = result["steps"]["checkpoint"]
        assert ckpt["equal"] and ckpt["same_sharding"]
        assert ckpt["step"] == worker.STEPS and ckpt["data_state"] == {"position": 5}
        assert ckpt["next_loss_restored"] == ckpt["next_loss_live"]


# -- what the step communicates ---------------------------------------------------------------------


def test_gradient_allreduce_moves_only_trainable_bytes(eight):
    """Bytes all-reduced per step, read from the compiled HLO, against the param trees:

        trainable (child + adapters)                            every gradient once
      + child params after the first stage                      reduced once per child stream
                                                                (native and backbone): XLA:CPU
                                                                all-reduces the two partial
                                                                gradients before adding them
      + 3 x 4 bytes x BatchNorm channels                        global batch statistics: mean
                                                                and mean-square forward, one
                                                                extra batch sum backward
      + a few scalars                                           the loss terms and metrics

    Nothing for the frozen parent: a 4x larger parent changes only the adapters it needs.
    """
    small, big, child = (eight["allreduce"][k] for k in ("hkt", "hkt_big_parent", "child"))
    for case in (small, big, child):
        assert case["collective_kinds"] == ["all-reduce"]
        scalars = (
            case["allreduce_bytes"]
            - case["trainable_bytes"]
            - 12 * case["bn_channels"]
            - (case["child_later_stage_bytes"] if case is not child else 0)
        )
        assert 0 <= scalars <= 4 * 16 and scalars % 4 == 0, case
    assert big["parent_bytes"] > 3 * small["parent_bytes"]
    excess = [c["allreduce_bytes"] - c["trainable_bytes"] for c in (small, big)]
    assert excess[0] == excess[1], "all-reduce volume beyond the trainable params must not depend on the parent"
    assert small["allreduce_bytes"] < small["parent_bytes"]


def test_hlo_collective_parser():
    text = """
  %all-reduce.66 = (f32[3,3,3,16]{3,2,1,0}, f32[10]{0}, /*index=2*/bf16[4,8]{1,0}) all-reduce(%a, %b, %c), channel_id=2
  %ar.1 = f32[16]{0} all-reduce(%x), channel_id=3, to_apply=%add
  %ars = f32[7]{0} all-reduce-start(%y), channel_id=4
  %ard = f32[7]{0} all-reduce-done(%ars)
  %ag = f32[8,4]{1,0} all-gather(%z), dimensions={0}
  %not = f32[5]{0} add(%all-reduce.1, %b)
"""
    assert sharding.collective_ops(text) == [
        ("all-reduce", 4 * (3 * 3 * 3 * 16 + 10) + 2 * 32),
        ("all-reduce", 64),
        ("all-reduce", 28),
        ("all-gather", 128),
    ]
    assert sharding.allreduce_bytes(text) == 4 * 442 + 64 + 64 + 28


# -- FSDP parent and sharded trainable state --------------------------------------------------------


def test_model_axis_shards_the_parent_and_keeps_the_loss(eight):
    result = eight["model_axis"]
    specs = result["sharded"]["parent_specs"]
    sharded = {k: v for k, v in specs.items() if "model" in v}
    assert "['params']['body_conv']['kernel']" in sharded, specs  # 3x3x16x32: split over 'model'
    assert all("model" not in v for v in result["replicated"]["parent_specs"].values())
    _assert_same_run(result["sharded"], result["replicated"])
    _assert_same_run(result["shard_trainable"], result["replicated"])


def test_fsdp_spec_picks_the_largest_divisible_axis():
    P = sharding.P
    assert sharding.fsdp_spec((3, 3, 16, 32), 2, min_elements=0) == P(None, None, None, "model")
    assert sharding.fsdp_spec((3, 3, 64, 30), 4, min_elements=0) == P(None, None, "model", None)
    assert sharding.fsdp_spec((3, 5), 2, min_elements=0) == P()  # nothing divisible: replicated
    assert sharding.fsdp_spec((16,), 2) == P()  # below the size threshold: replicated
    assert sharding.fsdp_spec((64, 64), 1) == P()


# -- clear errors -----------------------------------------------------------------------------------


def test_batch_not_divisible_by_data_shards_is_a_clear_error(eight):
    errors = eight["errors"]
    assert "not divisible by the 8 batch shards" in errors["check_global_batch"]
    assert "cannot be split over the 8 batch shards" in errors["global_batch"]
    assert "does not divide the 8 devices" in errors["model_not_dividing"]


def test_mesh_larger_than_devices_is_a_clear_error(eight):
    assert "needs 16 devices, but only 8 are present" in eight["errors"]["mesh_too_large"]
    n = jax.device_count()
    with pytest.raises(ValueError, match=f"needs {2 * n} devices, but only {n} are present.*device_count"):
        sharding.make_mesh(2 * n, 1)
    with pytest.raises(ValueError, match="mesh.model must be >= 1"):
        sharding.make_mesh(-1, 0)


def test_initialize_distributed_flags():
    assert sharding.initialize_distributed() is False  # single process: nothing to start
    with pytest.raises(ValueError, match="needs all of --coordinator_address, --num_processes and --process_id"):
        sharding.initialize_distributed("localhost:1234", 2, None)
    with pytest.raises(ValueError, match="--process_id=2 must lie in"):
        sharding.initialize_distributed("localhost:1234", 2, 2)


def test_simulated_cpu_env_replaces_the_device_count():
    env = sharding.simulated_cpu_env(8, {"XLA_FLAGS": "--xla_cpu_foo=1 --xla_force_host_platform_device_count=2"})
    assert env["XLA_FLAGS"] == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8"
