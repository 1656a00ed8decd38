"""jax_rnn.distributed: data-parallel unrolls and training over several devices and hosts.

This process initialised JAX with one CPU device, and the device count is fixed when JAX
starts, so the multi-device checks run in subprocesses (``tests/_distributed_worker.py``)
with ``--xla_force_host_platform_device_count``: one process with 4 devices, and two
processes with 2 devices each joined by :func:`jax.distributed.initialize` (multi-host).
The workers compute; the tests below assert on their JSON reports. Every numeric check
compares against the same computation on one device, in float64.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jax_rnn
from jax_rnn import distributed

WORKER = Path(__file__).with_name("_distributed_worker.py")
TOL = 1e-12
DEVICES, BATCH = 4, 8
MODELS = ("elman", "gru", "lstm", "stack_bidirectional")

# --------------------------------------------------------------------------------------
# The workers: started together, read once per module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(*args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _report(name: str, proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"worker {name} failed:\n{err[-4000:]}"
    report = json.loads(out.strip().splitlines()[-1])
    crashes = {k: v for k, v in report.items() if k.startswith("crash/")}
    assert not crashes, "\n".join(crashes.values())
    return report


def _run_workers() -> dict:
    port, nproc = _free_port(), 2
    procs = {"spmd": _start("spmd")}
    for pid in range(nproc):
        procs[f"host{pid}"] = _start("multihost", str(pid), str(nproc), str(port))
    try:
        return {name: _report(name, proc) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()


@pytest.fixture(scope="module")
def reports(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The workers' reports, computed once per run: under pytest-xdist every pytest
    worker that runs a test of this module needs them, and the first to ask runs the
    workers while the others wait for its file (a lock beside the run's temporary
    directories, named by xdist's id of this run, so no other run's file is ever read).
    If the workers fail, each pytest worker tries again and fails alike."""
    try:
        import fcntl
    except ImportError:  # not POSIX: each pytest worker runs its own
        return _run_workers()
    workerinput = getattr(request.config, "workerinput", None)
    if workerinput is None:  # not an xdist worker: nothing to share
        return _run_workers()
    shared = tmp_path_factory.getbasetemp().parent
    name = f"jax_rnn_distributed_{workerinput['testrunuid']}"
    path = shared / f"{name}.json"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            partial = shared / f"{name}.partial"
            partial.write_text(json.dumps(_run_workers()))
            os.replace(partial, path)  # whole or absent, also if this worker dies
        return json.loads(path.read_text())


@pytest.fixture(scope="module")
def spmd(reports: dict) -> dict:
    assert reports["spmd"]["devices"] == DEVICES
    return reports["spmd"]


# --------------------------------------------------------------------------------------
# unroll on a batch sharded over 4 devices


@pytest.mark.parametrize("model", MODELS)
def test_sharded_unroll_equals_unsharded(spmd, model):
    r = spmd[f"model/{model}"]
    assert r["value_diff"] < TOL and r["loss_diff"] < TOL and r["grad_diff"] < TOL
    assert r["grad_scale"] > 1e-3  # the gradients compared are not all zeros


@pytest.mark.parametrize("model", MODELS)
def test_sharded_unroll_outputs_stay_sharded(spmd, model):
    r = spmd[f"model/{model}"]
    for leaf in r["outputs"]:  # final states and step outputs
        assert leaf["devices"] == DEVICES and not leaf["replicated"], leaf
        assert leaf["batch"] == BATCH and leaf["shard_batches"] == [BATCH // DEVICES], leaf
        assert "'batch'" in leaf["spec"], leaf
    for leaf in r["grads"]:  # gradients of replicated params come back replicated
        assert leaf["devices"] == DEVICES and leaf["replicated"], leaf


def test_all_unroll_options_batch_major_sharded(spmd):
    """seq_lengths, reverse, time_major=False, resets, remat, truncate and dropout at once,
    on a stack with a bidirectional layer."""
    r = spmd["all_options"]
    assert r["value_diff"] < TOL and r["loss_diff"] < TOL and r["grad_diff"] < TOL
    for leaf in r["outputs"]:
        assert leaf["devices"] == DEVICES and leaf["spec"] == "P('batch',)", leaf
        assert leaf["shard_batches"] == [BATCH // DEVICES], leaf
    assert "all-gather" not in r["collectives"] and "all-to-all" not in r["collectives"]


_GATHER_CASES = [
    *(f"model/{m}" for m in MODELS), "training/jit", "all_options", "training/shard_map"
]


@pytest.mark.parametrize("case", _GATHER_CASES)
def test_compiled_program_never_gathers_the_batch(spmd, case):
    """The partitioned HLO: gradients are summed with an all-reduce (of parameter-sized
    arrays); nothing moves batch data between devices."""
    collectives = spmd[case]["collectives"]
    assert "all-reduce" in collectives
    assert not {"all-gather", "all-to-all", "collective-permute"} & set(collectives), collectives


# --------------------------------------------------------------------------------------
# Data-parallel training


@pytest.mark.parametrize("method", ["jit", "shard_map"])
def test_data_parallel_training_equals_single_device(spmd, method):
    r = spmd[f"training/{method}"]
    assert r["param_change"] > 1e-3  # the steps moved the params
    assert r["param_diff"] < TOL and r["loss_diff"] < TOL
    assert r["losses"][-1] < r["losses"][0]
    for leaf in r["params"]:
        assert leaf["devices"] == DEVICES and leaf["replicated"], leaf


def test_step_places_a_numpy_batch(spmd):
    assert spmd["training/numpy_batch"]["param_diff"] < TOL


def test_indivisible_batch_raises_a_clear_error(spmd):
    errors = spmd["indivisible_errors"]
    assert set(errors) == {"shard_batch", "step"}
    names = {"shard_batch": "`jax_rnn.distributed.shard_batch`",
             "step": "`jax_rnn.distributed.data_parallel_step(...)'s step`"}
    for where, message in errors.items():
        assert message.startswith(names[where]), message
        assert "6 sequences" in message and "4 devices" in message
        assert "pad_batch(xs, seq_lengths, 4)" in message


def test_padded_rows_do_not_change_training(spmd):
    """6 sequences padded to 8 for 4 devices train as the 6 do on one device (masked mean)."""
    r = spmd["padding"]
    assert r["padded_batch"] == 8 and r["padded_lengths"][6:] == [0, 0]
    assert r["padded_rows_zero"]
    assert r["param_diff"] < TOL and r["loss_diff"] < TOL


def test_process_local_data_on_one_process(spmd):
    r = spmd["process_local_single_process"]
    assert r["value_diff"] == 0.0 and r["same_shardings"]


# --------------------------------------------------------------------------------------
# Two processes (hosts) with two devices each


@pytest.fixture(scope="module")
def hosts(reports: dict) -> list[dict]:
    return [reports["host0"], reports["host1"]]


def test_multihost_training_equals_single_device(hosts):
    for pid, r in enumerate(hosts):
        assert (r["process_index"], r["process_count"]) == (pid, 2)
        assert (r["devices"], r["local_devices"]) == (4, 2)
        assert r["batch_shape"] == [6, BATCH, 3]  # global, from 4 local rows per process
        assert r["addressable_shards"] == 2
        assert r["param_diff"] < TOL and r["loss_diff"] < TOL


def test_multihost_eager_unroll_defaults(hosts):
    for r in hosts:
        assert r["eager_unroll"]["defaults"].startswith("ok"), r["eager_unroll"]


def test_multihost_eager_unroll_with_global_seq_lengths(hosts):
    for r in hosts:
        assert r["eager_unroll"]["seq_lengths"].startswith("ok"), r["eager_unroll"]


# --------------------------------------------------------------------------------------
# In this process (one device): helpers and errors


@given(
    batch=st.integers(1, 9),
    multiple=st.integers(1, 5),
    length=st.integers(0, 3),
    time_major=st.booleans(),
)
def test_pad_batch_rounds_up_with_zero_rows(batch, multiple, length, time_major):
    rng = np.random.default_rng(batch * 31 + multiple)
    xs = rng.normal(size=(length, batch, 2) if time_major else (batch, length, 2))
    targets = rng.normal(size=(batch,))
    lengths = rng.integers(0, length + 1, size=batch)
    (px, pt), pl = distributed.pad_batch((xs, targets), lengths, multiple, time_major=time_major)
    padded = -(-batch // multiple) * multiple
    axis = 1 if time_major else 0
    assert isinstance(px, np.ndarray) and px.shape[axis] == padded and pt.shape == (padded,)
    np.testing.assert_array_equal(np.take(px, range(batch), axis), xs)
    assert not np.take(px, range(batch, padded), axis).any()
    np.testing.assert_array_equal(pl, np.r_[lengths, np.zeros(padded - batch, int)])
    np.testing.assert_array_equal(pt[:batch], targets)


def test_pad_batch_without_lengths_gives_full_lengths():
    xs, lengths = distributed.pad_batch(jnp.ones((5, 3, 2)), None, 2)
    assert isinstance(xs, jax.Array) and xs.shape == (5, 4, 2)
    np.testing.assert_array_equal(lengths, [5, 5, 5, 0])
    xs, lengths = distributed.pad_batch(np.ones((3, 5, 2)), None, 3, time_major=False)
    assert xs.shape == (3, 5, 2)
    np.testing.assert_array_equal(lengths, [5, 5, 5])


def test_shard_batch_layout_on_one_device():
    mesh = distributed.make_mesh()
    tree = {"xs": np.ones((5, 4, 3)), "lengths": np.arange(4), "targets": np.ones((5, 4))}
    out = distributed.shard_batch(tree, mesh)
    assert out["xs"].sharding.spec == jax.sharding.PartitionSpec(None, "batch")
    assert out["targets"].sharding.spec == jax.sharding.PartitionSpec(None, "batch")
    assert out["lengths"].sharding.spec == jax.sharding.PartitionSpec("batch")
    out = distributed.shard_batch(np.ones((4, 5, 3)), mesh, time_major=False)
    assert out.sharding.spec == jax.sharding.PartitionSpec("batch")


def test_shard_batch_errors_name_the_problem():
    mesh = distributed.make_mesh()
    with pytest.raises(ValueError, match=r"shard_batch.*scalar.*replicate"):
        distributed.shard_batch({"xs": np.ones((5, 4, 3)), "lr": np.float64(0.1)}, mesh)
    disagree = r"disagree on the batch size: 3 from \['lengths'\].*4 from \['xs'\]"
    with pytest.raises(ValueError, match=disagree):
        distributed.shard_batch({"xs": np.ones((5, 4, 3)), "lengths": np.arange(3)}, mesh)
    with pytest.raises(TypeError, match=r"shard_batch.*Mesh.*make_mesh"):
        distributed.shard_batch(np.ones((5, 4, 3)), jax.devices())  # pyright: ignore
    with pytest.raises(ValueError, match=r"pad_batch.*`multiple` must be a positive int"):
        distributed.pad_batch(np.ones((5, 4, 3)), None, 0)
    with pytest.raises(ValueError, match=r"pad_batch.*`seq_lengths` has shape \(3,\)"):
        distributed.pad_batch(np.ones((5, 4, 3)), np.arange(3), 2)


def test_make_mesh_and_step_argument_errors():
    mesh = distributed.make_mesh(devices=jax.devices()[:1])
    assert mesh.axis_names == ("batch",) and mesh.size == 1
    assert distributed.make_mesh("data").axis_names == ("data",)
    with pytest.raises(TypeError, match="axis_name"):
        distributed.make_mesh(0)  # pyright: ignore
    with pytest.raises(ValueError, match="devices"):
        distributed.make_mesh(devices=[])
    with pytest.raises(ValueError, match="method"):
        distributed.data_parallel_step(jax_rnn.elman, lambda *a: 0.0, None, method="pmap")
    with pytest.raises(TypeError, match="optax GradientTransformation"):
        distributed.data_parallel_step(jax_rnn.elman, lambda *a: 0.0, object())


def test_replicate_copies_every_leaf():
    mesh = distributed.make_mesh()
    params = distributed.replicate(jax_rnn.gru.init(jax.random.key(0), 2, 3), mesh)
    assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(params))


def test_step_on_one_device_with_key_and_donation():
    """The step on this process's single device: optax's own loop gives the same params,
    the key reaches the loss, and donated params are replaced, not reused."""
    import optax
    model, optimizer = jax_rnn.elman, optax.sgd(0.1)
    params = model.init(jax.random.key(0), 2, 3, 1)
    rng = np.random.default_rng(1)
    batch = {"xs": rng.normal(size=(4, 2, 2)), "ys": rng.normal(size=(4, 2, 1))}

    def loss_fn(model, params, batch, key):
        _, out = jax_rnn.unroll(model, params, batch["xs"])
        noise = jax.random.normal(key, ())  # the key arrives, as dropout would use it
        return jnp.mean((out.output - batch["ys"]) ** 2) + 0.01 * noise

    step = distributed.data_parallel_step(model, loss_fn, optimizer, donate=True)
    key = jax.random.key(7)
    # On one device `replicate` may hand back the very buffers it got: donate copies.
    donated = distributed.replicate(jax.tree.map(jnp.copy, params), distributed.make_mesh())
    got, _, loss = step(donated, optimizer.init(donated), batch, key)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(donated))
    want_loss, grads = jax.value_and_grad(lambda p: loss_fn(model, p, batch, key))(params)
    want = optax.apply_updates(params, optimizer.update(grads, optimizer.init(params))[0])
    np.testing.assert_allclose(loss, want_loss, rtol=0, atol=TOL)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=TOL)
