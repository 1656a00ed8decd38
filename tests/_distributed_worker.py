"""Runs the data-parallel checks in a process of its own, with several simulated devices.

``tests/test_distributed.py`` starts this script with subprocess: the test process has
already initialised JAX with one CPU device, and the device count is fixed at start-up by
``XLA_FLAGS=--xla_force_host_platform_device_count=N``. The script prints one JSON report
on its last line of stdout; the tests assert on it.

    python tests/_distributed_worker.py spmd                       # 4 devices, 1 process
    python tests/_distributed_worker.py multihost PID NPROC PORT   # 2 devices per process
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import time
import traceback


def _simulate_devices(mode: str) -> None:
    """Simulated CPU devices, set before JAX starts, and the suite's compile-time flags
    (conftest.py: LLVM optimisation off, XLA's cheaper elementwise emitters), which cut
    the compile time of these small programs and change nothing the checks look at (the
    SPMD partitioning and the collectives are decided before the backend runs)."""
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={4 if mode == 'spmd' else 2} "
        + os.environ.get("JAX_RNN_TEST_XLA_FLAGS", "--xla_backend_optimization_level=0")
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


# Only as a script: pytest's --doctest-modules imports this file in the test process too,
# whose environment (inherited by other tests' subprocesses) must stay untouched.
if __name__ == "__main__":
    _simulate_devices(sys.argv[1] if len(sys.argv) > 1 else "spmd")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax_rnn  # noqa: E402
from jax_rnn import distributed  # noqa: E402

LENGTH, BATCH, FEATURES, HIDDEN, OUTPUTS = 6, 8, 3, 4, 2
COLLECTIVES = re.compile(r"\b(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)")

MODELS = {
    "elman": jax_rnn.elman,
    "gru": jax_rnn.gru,
    "lstm": jax_rnn.lstm,
    "stack_bidirectional": jax_rnn.stack([jax_rnn.bidirectional(jax_rnn.gru), jax_rnn.lstm]),
}


def data(batch: int = BATCH, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    lengths = np.array([LENGTH, 3, 0, 1, LENGTH, 5, 2, 4] * (batch // 8 + 1))[:batch]
    return {
        "xs": rng.normal(size=(LENGTH, batch, FEATURES)),
        "ys": rng.normal(size=(LENGTH, batch, OUTPUTS)),
        "seq_lengths": lengths.astype(np.int32),
        "resets": rng.random((LENGTH, batch)) < 0.2,
    }


def masked_mean(out: jax.Array, target: jax.Array, lengths: jax.Array) -> jax.Array:
    """Mean squared error over the valid steps of every sequence (time-major)."""
    mask = (jnp.arange(out.shape[0])[:, None] < lengths)[..., None]
    err = jnp.where(mask, (out - target) ** 2, 0.0)
    return err.sum() / (mask.sum() * out.shape[-1])


def max_diff(a, b) -> float:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    diffs = [float(np.max(np.abs(np.asarray(x) - np.asarray(y)), initial=0.0))
             for x, y in zip(leaves_a, leaves_b, strict=True)]
    return max(diffs, default=0.0)


def layout(tree, batch_axis_of) -> list[dict]:
    """For every leaf: its spec, devices, and full vs per-device batch size."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        axis = batch_axis_of(leaf)
        out.append({
            "path": jax.tree_util.keystr(path),
            "spec": str(leaf.sharding.spec),
            "devices": len(leaf.sharding.device_set),
            "replicated": bool(leaf.sharding.is_fully_replicated),
            "batch": None if axis is None else leaf.shape[axis],
            "shard_batches": None if axis is None else sorted(
                {s.data.shape[axis] for s in leaf.addressable_shards}
            ),
        })
    return out


def collectives(compiled_text: str) -> list[str]:
    return sorted(set(COLLECTIVES.findall(compiled_text)))


def run_models(report: dict) -> None:
    """Values, gradients, layouts and collectives of sharded vs unsharded unrolls."""
    mesh = distributed.make_mesh()
    d = data()
    for name, model in MODELS.items():
        params = model.init(jax.random.key(1), FEATURES, HIDDEN, OUTPUTS)

        @jax.jit
        def run(params, xs, ys, lengths, model=model):
            def loss(params):
                final, ys_ = jax_rnn.unroll(model, params, xs, seq_lengths=lengths)
                return masked_mean(ys_.output, ys, lengths), (final, ys_)

            (value, outs), grads = jax.value_and_grad(loss, has_aux=True)(params)
            return value, outs, grads

        expected = run(params, d["xs"], d["ys"], d["seq_lengths"])
        placed = (distributed.replicate(params, mesh),
                  *distributed.shard_batch((d["xs"], d["ys"], d["seq_lengths"]), mesh))
        compiled = run.lower(*placed).compile()
        value, outs, grads = compiled(*placed)
        report[f"model/{name}"] = {
            "loss_diff": max_diff(value, expected[0]),
            "value_diff": max_diff(outs, expected[1]),
            "grad_diff": max_diff(grads, expected[2]),
            "grad_scale": max_diff(grads, jax.tree.map(jnp.zeros_like, grads)),
            # finals are (B, ...) (axis 0); step outputs (T, B, ...) (axis 1)
            "outputs": layout(outs, lambda a: 0 if a.ndim == 2 else 1),
            "grads": layout(grads, lambda a: None),
            "collectives": collectives(compiled.as_text() or ""),
        }


def run_all_options(report: dict) -> None:
    """Every unroll option at once, batch-major, with dropout, on the deepest model."""
    mesh = distributed.make_mesh()
    model = jax_rnn.stack([jax_rnn.bidirectional(jax_rnn.elman), jax_rnn.elman], dropout=0.25)
    params = model.init(jax.random.key(2), FEATURES, HIDDEN, OUTPUTS)
    d = data(seed=1)
    xs, resets = np.moveaxis(d["xs"], 1, 0), np.moveaxis(d["resets"], 1, 0)  # (B, T, ...)

    @jax.jit
    def run(params, xs, lengths, resets, key):
        def loss(params):
            final, ys = jax_rnn.unroll(
                model, params, xs, seq_lengths=lengths, reverse=True, time_major=False,
                resets=resets, remat=2, truncate=4, dropout_key=key,
            )
            return jnp.sum(ys.output ** 2), (final, ys)

        (value, outs), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return value, outs, grads

    key = jax.random.key(3)
    expected = run(params, xs, d["seq_lengths"], resets, key)
    placed = (distributed.replicate(params, mesh),
              *distributed.shard_batch((xs, d["seq_lengths"], resets), mesh, time_major=False),
              distributed.replicate(key, mesh))
    compiled = run.lower(*placed).compile()
    value, outs, grads = compiled(*placed)
    report["all_options"] = {
        "value_diff": max_diff(outs, expected[1]),
        "loss_diff": max_diff(value, expected[0]),
        "grad_diff": max_diff(grads, expected[2]),
        "outputs": layout(outs, lambda a: 0),
        "collectives": collectives(compiled.as_text() or ""),
    }


@functools.cache
def _reference_step(model, loss_fn, optimizer):
    import optax

    @jax.jit
    def one(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(model, p, batch))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return one


def reference_training(model, loss_fn, optimizer, params, batch, steps):
    """Single-device training on the whole batch, written without jax_rnn.distributed."""
    one = _reference_step(model, loss_fn, optimizer)
    opt_state = optimizer.init(params)
    losses = []
    for _ in range(steps):
        params, opt_state, loss = one(params, opt_state, batch)
        losses.append(float(loss))
    return params, losses


def masked_loss(model, params, batch):
    _, ys = jax_rnn.unroll(model, params, batch["xs"], seq_lengths=batch["seq_lengths"])
    return masked_mean(ys.output, batch["ys"], batch["seq_lengths"])


def plain_loss(model, params, batch):
    _, ys = jax_rnn.unroll(model, params, batch["xs"])
    return jnp.mean((ys.output - batch["ys"]) ** 2)


def distributed_training(step, optimizer, params, batch, steps, mesh):
    params = distributed.replicate(params, mesh)
    opt_state = optimizer.init(params)
    losses = []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
    return params, opt_state, losses


def run_training(report: dict) -> None:
    import optax

    mesh = distributed.make_mesh()
    model, optimizer, steps = jax_rnn.gru, optax.adam(0.05), 3
    params = model.init(jax.random.key(4), FEATURES, HIDDEN, OUTPUTS)
    full = {k: v for k, v in data(seed=2).items() if k != "resets"}
    batch = distributed.shard_batch(full, mesh)
    step_fns = {}
    for method, loss_fn in (("jit", masked_loss), ("shard_map", plain_loss)):
        want, want_losses = reference_training(model, loss_fn, optimizer, params, full, steps)
        step = step_fns[method] = distributed.data_parallel_step(
            model, loss_fn, optimizer, mesh=mesh, method=method
        )
        got, opt_state, losses = distributed_training(
            step, optimizer, params, batch, steps, mesh
        )
        report[f"training/{method}"] = {
            "param_diff": max_diff(got, want),
            "param_change": max_diff(want, params),
            "loss_diff": max(abs(a - b) for a, b in zip(losses, want_losses, strict=True)),
            "losses": losses,
            "params": layout(got, lambda a: None),
            "collectives": collectives(
                step.lower(got, opt_state, batch).compile().as_text() or ""
            ),
        }

    # A numpy batch goes through the step too: it is placed on the mesh, not gathered.
    step = step_fns["jit"]
    got, _, _ = distributed_training(step, optimizer, params, full, 1, mesh)
    want, _ = reference_training(model, masked_loss, optimizer, params, full, 1)
    report["training/numpy_batch"] = {"param_diff": max_diff(got, want)}

    # Padding: 6 sequences do not split over 4 devices; padded to 8 they train the same.
    small = {k: v[:, :6] if v.ndim > 1 else v[:6] for k, v in full.items()}
    errors = {}
    try:
        distributed.shard_batch(small, mesh)
    except ValueError as error:
        errors["shard_batch"] = str(error)
    try:
        step(distributed.replicate(params, mesh), optimizer.init(params), small)
    except ValueError as error:
        errors["step"] = str(error)
    report["indivisible_errors"] = errors
    (xs, ys), lengths = distributed.pad_batch(
        (small["xs"], small["ys"]), small["seq_lengths"], mesh.size
    )
    padded = distributed.shard_batch({"xs": xs, "ys": ys, "seq_lengths": lengths}, mesh)
    want, want_losses = reference_training(model, masked_loss, optimizer, params, small, 2)
    got, _, losses = distributed_training(step, optimizer, params, padded, 2, mesh)
    report["padding"] = {
        "padded_batch": int(lengths.shape[0]),
        "padded_lengths": np.asarray(lengths).tolist(),
        "padded_rows_zero": bool((np.asarray(xs)[:, 6:] == 0).all()),
        "param_diff": max_diff(got, want),
        "loss_diff": max(abs(a - b) for a, b in zip(losses, want_losses, strict=True)),
    }

    # process_local=True on one process is the same as placing the whole batch.
    local = distributed.shard_batch(full, mesh, process_local=True)
    report["process_local_single_process"] = {
        "value_diff": max_diff(local, batch),
        "same_shardings": all(
            a.sharding == b.sharding
            for a, b in zip(jax.tree.leaves(local), jax.tree.leaves(batch), strict=True)
        ),
    }


def spmd() -> dict:
    report: dict = {"devices": jax.device_count()}
    for check in (run_models, run_all_options, run_training):
        start = time.perf_counter()
        try:
            check(report)
        except Exception:  # reported, so that the other checks still run
            report[f"crash/{check.__name__}"] = traceback.format_exc()
        report[f"seconds/{check.__name__}"] = round(time.perf_counter() - start, 2)
    return report


def multihost(pid: int, nproc: int, port: int) -> dict:
    """One of ``nproc`` processes, each with its own slice of the batch (the recipe of
    docs/distributed.md), trained against single-process training on the whole batch."""
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:  # a JAX whose CPU collectives need no switch
        pass
    import optax

    jax.distributed.initialize(f"localhost:{port}", num_processes=nproc, process_id=pid)
    report: dict = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
    }
    model, optimizer = jax_rnn.gru, optax.adam(0.05)
    # the same key on every process: the same params
    params = model.init(jax.random.key(4), FEATURES, HIDDEN, OUTPUTS)
    full = {k: v for k, v in data(seed=2).items() if k != "resets"}
    want, want_losses = reference_training(model, masked_loss, optimizer, params, full, 2)

    mesh = distributed.make_mesh()
    rows = BATCH // nproc
    local = {k: v[:, pid * rows:(pid + 1) * rows] if v.ndim > 1 else v[pid * rows:(pid + 1) * rows]
             for k, v in full.items()}
    batch = distributed.shard_batch(local, mesh, process_local=True)
    report["batch_shape"] = list(batch["xs"].shape)
    report["addressable_shards"] = len(batch["xs"].addressable_shards)
    step = distributed.data_parallel_step(model, masked_loss, optimizer, mesh=mesh)
    got, _, losses = distributed_training(step, optimizer, params, batch, 2, mesh)
    report["param_diff"] = max_diff(jax.device_get(got), want)
    report["loss_diff"] = max(abs(a - b) for a, b in zip(losses, want_losses, strict=True))

    # Known issue: unroll's eager (un-jitted) check of seq_lengths reads their values on
    # the host, which a global array spanning other processes cannot give.
    sharded_params = distributed.replicate(params, mesh)
    eager: dict = {}
    for name, kwargs in (("defaults", {}), ("seq_lengths", {"seq_lengths": batch["seq_lengths"]})):
        try:
            _, ys = jax_rnn.unroll(model, sharded_params, batch["xs"], **kwargs)
            eager[name] = "ok: " + str(ys.output.sharding.spec)
        except Exception as error:  # reported for the test to assert on
            eager[name] = f"{type(error).__name__}: {error}"
    report["eager_unroll"] = eager
    return report


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "spmd"
    if mode == "spmd":
        report = spmd()
    elif mode == "multihost":
        pid, nproc, port = (int(a) for a in sys.argv[2:5])
        report = multihost(pid, nproc, port)
    else:
        raise SystemExit(f"unknown mode {mode!r}; use spmd or multihost")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
