"""Data-parallel training over devices and hosts with JAX's own SPMD.

The batch axis is split over a one-dimensional :class:`jax.sharding.Mesh` of every device
with :class:`jax.sharding.NamedSharding`; parameters and optimizer state are replicated.
:func:`jax_rnn.unroll` then runs under :func:`jax.jit` on each device's slice of the
batch, returns outputs sharded the same way, and the gradient of a loss averaged over
the *global* batch is the data-parallel gradient: XLA sums the per-device partial
gradients with one all-reduce. The same code runs on one CPU, several GPUs, a TPU slice
or several hosts after :func:`jax.distributed.initialize`.

The layout convention: a leaf shaped ``(T, B, ...)`` (time-major, the default) is split
on axis 1, a leaf shaped ``(B, T, ...)`` (``time_major=False``) on axis 0, and a
one-dimensional leaf such as ``seq_lengths`` ``(B,)`` on axis 0.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ._unroll import _check_seq_lengths

__all__ = [
    "data_parallel_step",
    "make_mesh",
    "pad_batch",
    "replicate",
    "shard_batch",
]

_METHODS = ("jit", "shard_map")


# --------------------------------------------------------------------------------------
# Meshes and placement


def make_mesh(axis_name: str = "batch", devices: Sequence[Any] | None = None) -> Mesh:
    """A one-dimensional mesh over ``devices`` (all devices, of every host, by default).

    On several hosts, call :func:`jax.distributed.initialize` first: :func:`jax.devices`
    then lists every host's devices, each host's own ones next to each other, so that
    process-local data fills a contiguous block of the global batch.

    Args:
        axis_name: the name of the mesh axis the batch is split over.
        devices: the devices, in batch order; ``None`` means :func:`jax.devices`.

    Returns:
        a :class:`jax.sharding.Mesh` with the single axis ``axis_name``.

    Raises:
        TypeError: ``axis_name`` is not a string.
        ValueError: ``devices`` is empty.

    Example:
        >>> from jax_rnn import distributed
        >>> mesh = distributed.make_mesh()
        >>> mesh.axis_names, mesh.size == len(jax.devices())
        (('batch',), True)
    """
    where = "jax_rnn.distributed.make_mesh"
    if not isinstance(axis_name, str):
        raise TypeError(
            f"`{where}`: `axis_name` must be a string, got {type(axis_name).__name__}; "
            "pass e.g. axis_name='batch'."
        )
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError(f"`{where}`: `devices` is empty; pass at least one device or None.")
    return Mesh(np.asarray(devices, dtype=object), (axis_name,))


def _check_mesh(where: str, mesh: Any) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"`{where}`: `mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}; "
            "build one with `jax_rnn.distributed.make_mesh()`."
        )


def _batch_spec_entry(mesh: Mesh) -> Any:
    """The PartitionSpec entry that splits one axis over every axis of ``mesh``."""
    names = tuple(mesh.axis_names)
    return names[0] if len(names) == 1 else names


def _batch_axis(ndim: int, time_major: bool) -> int:
    return 0 if ndim == 1 or not time_major else 1


def _leaf_sharding(mesh: Mesh, ndim: int, time_major: bool) -> NamedSharding:
    axis = _batch_axis(ndim, time_major)
    return NamedSharding(mesh, P(*(None,) * axis, _batch_spec_entry(mesh)))


def _path_text(path: Any) -> str:
    return "".join(str(k) for k in path) or "(the array itself)"


def _check_batch(where: str, tree: Any, time_major: bool, devices: int) -> int:
    """Checks the batch axis of every leaf before tracing; returns the batch size.

    The batch must split evenly over ``devices``.
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not leaves:
        raise ValueError(f"`{where}`: the batch has no arrays; pass e.g. a dict of arrays.")
    sizes: dict[int, str] = {}
    for path, leaf in leaves:
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"`{where}`: the leaf {_path_text(path)} of the batch is a scalar, so it has "
                "no batch axis to split; pass it through `replicate` (or close over it in "
                "the loss) instead of putting it in the batch."
            )
        axis = _batch_axis(len(shape), time_major)
        sizes.setdefault(shape[axis], f"{_path_text(path)} (shape {shape}, axis {axis})")
    if len(sizes) > 1:
        listed = "; ".join(f"{size} from {origin}" for size, origin in sizes.items())
        raise ValueError(
            f"`{where}`: the leaves of the batch disagree on the batch size: {listed}. "
            "Time-major leaves (T, B, ...) carry the batch on axis 1, 1-D leaves and "
            "time_major=False leaves (B, ...) on axis 0; shard per-sequence targets of rank "
            "2 or more with a separate `shard_batch(..., time_major=False)` call."
        )
    (batch, origin), = sizes.items()
    n = devices
    if batch % n:
        multiple = -(-batch // n) * n
        raise ValueError(
            f"`{where}`: the batch has {batch} sequences ({origin}), which do not split "
            f"evenly over {n} devices; pad it to a multiple of {n} with "
            f"`jax_rnn.distributed.pad_batch(xs, seq_lengths, {n})` ({multiple - batch} "
            "rows with seq_lengths 0, which unroll masks; weigh them out of the loss with "
            f"a masked mean), or drop {batch % n} sequences."
        )
    return batch


def shard_batch(
    tree: Any, mesh: Mesh, *, time_major: bool = True, process_local: bool = False
) -> Any:
    """Places every leaf of ``tree`` on ``mesh`` with its batch axis split over the devices.

    A leaf shaped ``(T, B, ...)`` is split on axis 1 (``time_major=True``), one shaped
    ``(B, ...)`` on axis 0 (``time_major=False``), and a one-dimensional leaf (``(B,)``
    ``seq_lengths``) always on axis 0. Each device then holds ``B / n`` sequences.

    Args:
        tree: an array or a pytree of arrays (inputs, ``seq_lengths``, ``resets``,
            targets) that share one batch size.
        mesh: the mesh, e.g. from :func:`make_mesh`; a mesh of several axes splits the
            batch over all of them.
        time_major: the layout of the leaves of rank 2 or more.
        process_local: on several hosts, ``tree`` is this process's slice of the global
            batch (``B / process_count`` rows), assembled into global arrays with
            :func:`jax.make_array_from_process_local_data`. Otherwise every process passes
            the whole batch. With one process both mean the same.

    Returns:
        ``tree`` with every leaf a :class:`jax.Array` sharded with
        ``NamedSharding(mesh, P(None, "batch"))`` (or ``P("batch")``).

    Raises:
        ValueError: a scalar leaf, leaves with different batch sizes, or a batch size
            that does not divide by the number of devices (pad it with :func:`pad_batch`).

    Example:
        >>> from jax_rnn import distributed
        >>> mesh = distributed.make_mesh()
        >>> batch = distributed.shard_batch(
        ...     {"xs": jnp.ones((5, 4, 3)), "seq_lengths": jnp.array([5, 3, 2, 5])}, mesh)
        >>> batch["xs"].sharding.spec, batch["seq_lengths"].sharding.spec
        (P(None, 'batch'), P('batch',))
    """
    where = "jax_rnn.distributed.shard_batch"
    _check_mesh(where, mesh)
    if process_local:
        local = {d for d in mesh.devices.flat if d.process_index == jax.process_index()}
        _check_batch(where, tree, time_major, len(local))

        def place(leaf: Any) -> jax.Array:
            sharding = _leaf_sharding(mesh, np.ndim(leaf), time_major)
            return jax.make_array_from_process_local_data(sharding, np.asarray(leaf))

    else:
        _check_batch(where, tree, time_major, mesh.size)

        def place(leaf: Any) -> jax.Array:
            return jax.device_put(leaf, _leaf_sharding(mesh, np.ndim(leaf), time_major))

    return jax.tree.map(place, tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a full copy of every leaf of ``tree`` on every device of ``mesh``.

    For parameters and optimizer state. On several hosts every process must pass the same
    values (e.g. params drawn from the same key).

    Args:
        tree: a pytree of arrays.
        mesh: the mesh, e.g. from :func:`make_mesh`.

    Returns:
        ``tree`` with every leaf sharded as ``NamedSharding(mesh, P())``.

    Example:
        >>> from jax_rnn import distributed
        >>> mesh = distributed.make_mesh()
        >>> params = distributed.replicate(jax_rnn.gru.init(jax.random.key(0), 3, 4), mesh)
        >>> params.w_cell_state.sharding.is_fully_replicated
        True
    """
    _check_mesh("jax_rnn.distributed.replicate", mesh)
    return jax.device_put(tree, NamedSharding(mesh, P()))


def pad_batch(
    xs: Any, seq_lengths: Any, multiple: int, *, time_major: bool = True
) -> tuple[Any, Any]:
    """Pads the batch axis up to a multiple of ``multiple`` with zero rows of length 0.

    :func:`jax_rnn.unroll` masks every step of a sequence of length 0: its carry stays
    the initial state and its outputs are zeros, so padded rows reach neither a loss
    that weighs steps by the mask (a masked mean) nor the gradients. Pad a batch whose
    size does not divide by the number of devices with ``multiple=mesh.size``.

    Args:
        xs: inputs ``(T, B, ...)`` (``(B, T, ...)`` with ``time_major=False``), or a
            pytree of arrays with one batch size, laid out as :func:`shard_batch` reads
            them (e.g. ``(inputs, targets)``); numpy leaves stay numpy.
        seq_lengths: ints shaped ``(B,)``, or ``None`` for full-length sequences (the
            length is then read from the first leaf of ``xs``).
        multiple: the batch size is rounded up to a multiple of this (a positive int,
            e.g. ``mesh.size``).
        time_major: the layout of the leaves of rank 2 or more.

    Returns:
        ``(xs, seq_lengths)`` with ``B`` rounded up; the new rows are zeros with length 0.

    Raises:
        ValueError: a bad ``multiple``, or leaves and ``seq_lengths`` that disagree on
            the batch size.

    Example:
        >>> from jax_rnn import distributed
        >>> xs, lengths = distributed.pad_batch(jnp.ones((5, 3, 2)), jnp.array([5, 2, 4]), 4)
        >>> print(xs.shape, lengths)
        (5, 4, 2) [5 2 4 0]
    """
    where = "jax_rnn.distributed.pad_batch"
    if isinstance(multiple, bool) or not isinstance(multiple, int | np.integer) or multiple < 1:
        raise ValueError(
            f"`{where}`: `multiple` must be a positive int (e.g. `mesh.size`), got "
            f"{multiple!r}."
        )
    leaves = jax.tree.leaves(xs)
    if not leaves:
        raise ValueError(f"`{where}`: `xs` has no arrays.")
    first = leaves[0]
    if np.ndim(first) < 2:
        raise ValueError(
            f"`{where}`: the first leaf of `xs` has shape {np.shape(first)}; it must be the "
            "inputs, shaped (T, B, ...) (or (B, T, ...) with time_major=False)."
        )
    batch = np.shape(first)[_batch_axis(np.ndim(first), time_major)]
    length = np.shape(first)[0 if time_major else 1]
    if seq_lengths is None:
        seq_lengths = np.full((batch,), length, np.int32)
    _check_seq_lengths(where, seq_lengths, (batch,), length)
    _check_batch(where, (xs, seq_lengths), time_major, 1)
    extra = -batch % int(multiple)

    def pad(leaf: Any) -> Any:
        xp = np if isinstance(leaf, np.ndarray | np.generic | list | tuple) else jnp
        leaf = xp.asarray(leaf)
        if not extra:
            return leaf
        axis = _batch_axis(leaf.ndim, time_major)
        widths = [(0, 0)] * leaf.ndim
        widths[axis] = (0, extra)
        return xp.pad(leaf, widths)

    return jax.tree.map(pad, xs), pad(seq_lengths)


# --------------------------------------------------------------------------------------
# The training step


def _apply_updates(params: Any, updates: Any) -> Any:
    """``params + updates`` leaf by leaf in the params' dtypes (``optax.apply_updates``)."""
    return jax.tree.map(lambda p, u: jnp.asarray(p + u).astype(jnp.asarray(p).dtype),
                        params, updates)


def data_parallel_step(
    model: Any,
    loss_fn: Callable[..., Any],
    optimizer: Any,
    *,
    mesh: Mesh | None = None,
    time_major: bool = True,
    method: str = "jit",
    donate: bool = False,
) -> Callable[..., tuple[Any, Any, Any]]:
    """A jitted data-parallel training step ``step(params, opt_state, batch)``.

    Each device computes the loss and gradients on its slice of the batch; the gradients
    are averaged over all devices and every device applies the same optimizer update to
    its replica of the params.

    With ``method="jit"`` (the default) this is plain :func:`jax.jit` with the batch
    sharded and the params replicated: ``loss_fn`` is the loss of the *global* batch
    (e.g. a mean over every sequence), so its gradient is already the average over
    devices; XLA computes each device's partial gradient and sums them with an
    all-reduce. The result equals single-device training on the whole batch, up to the
    order of floating-point sums, for any loss (masked means included).

    With ``method="shard_map"`` the step is written per device with
    :func:`jax.shard_map`: ``loss_fn`` sees the device's local batch and the gradients
    and losses are averaged with an explicit :func:`jax.lax.pmean`. This is the global
    loss only when ``loss_fn`` is a plain mean over sequences (equal weight per shard);
    a masked mean of shards holding different numbers of valid steps is weighted
    differently. With a ``key``, each device folds in its index for its own randomness.

    Args:
        model: a cell, :func:`jax_rnn.stack` or :func:`jax_rnn.bidirectional` model,
            passed on to ``loss_fn``.
        loss_fn: ``loss_fn(model, params, batch) -> scalar`` (``loss_fn(model, params,
            batch, key)`` when the step is given a ``key``), typically calling
            :func:`jax_rnn.unroll` on ``batch``.
        optimizer: an optax ``GradientTransformation`` (anything with
            ``update(grads, state, params) -> (updates, state)``); make the state with
            ``optimizer.init(params)``.
        mesh: the mesh; ``None`` means :func:`make_mesh` over every device.
        time_major: the layout of the batch's leaves of rank 2 or more, as in
            :func:`shard_batch`.
        method: ``"jit"`` or ``"shard_map"`` (see above).
        donate: donate ``params`` and ``opt_state`` to the step, so that their buffers
            are reused for the new ones. The arrays passed in are deleted: do not use
            them afterwards (on one device :func:`replicate` may return the very arrays
            it was given, so donate a copy of params you keep).

    Returns:
        ``step(params, opt_state, batch, key=None) -> (params, opt_state, loss)``, with
        the new params, state and loss replicated over the mesh. Batch leaves that are
        not yet sharded as :func:`shard_batch` shards them are placed so first (on
        several hosts, shard them yourself with ``shard_batch(..., process_local=True)``).
        ``step.lower(params, opt_state, batch, key=None)`` lowers the jitted step, e.g.
        to read the compiled HLO.

    Raises:
        ValueError: (from ``step``, before tracing) a batch size that does not divide by
            the number of devices, a scalar leaf or disagreeing batch sizes.

    Example:
        >>> import optax
        >>> from jax_rnn import distributed
        >>> def loss_fn(model, params, batch):
        ...     _, ys = jax_rnn.unroll(model, params, batch["xs"],
        ...                            seq_lengths=batch["seq_lengths"])
        ...     mask = jnp.arange(ys.output.shape[0])[:, None] < batch["seq_lengths"]
        ...     err = ((ys.output[..., 0] - batch["ys"]) ** 2) * mask
        ...     return err.sum() / mask.sum()        # masked mean over the global batch
        >>> mesh = distributed.make_mesh()
        >>> optimizer = optax.adam(1e-2)
        >>> step = distributed.data_parallel_step(jax_rnn.gru, loss_fn, optimizer, mesh=mesh)
        >>> params = distributed.replicate(jax_rnn.gru.init(jax.random.key(0), 1, 8, 1), mesh)
        >>> opt_state = optimizer.init(params)
        >>> xs = jnp.sin(jnp.linspace(0, 6, 20))[:, None, None] * jnp.ones((1, 4, 1))
        >>> batch = distributed.shard_batch(
        ...     {"xs": xs, "ys": jnp.roll(xs[..., 0], -1, axis=0),
        ...      "seq_lengths": jnp.array([20, 15, 10, 19])}, mesh)
        >>> losses = []
        >>> for _ in range(50):
        ...     params, opt_state, loss = step(params, opt_state, batch)
        ...     losses.append(float(loss))
        >>> losses[-1] < losses[0] / 4
        True
    """
    where = "jax_rnn.distributed.data_parallel_step"
    if method not in _METHODS:
        raise ValueError(f"`{where}`: `method` must be one of {_METHODS}, got {method!r}.")
    if not callable(loss_fn):
        raise TypeError(f"`{where}`: `loss_fn` must be callable, got {type(loss_fn).__name__}.")
    if not callable(getattr(optimizer, "update", None)):
        raise TypeError(
            f"`{where}`: `optimizer` must be an optax GradientTransformation (with "
            f"`init` and `update`), got {type(optimizer).__name__}; e.g. `optax.adam(1e-3)`."
        )
    mesh = make_mesh() if mesh is None else mesh
    _check_mesh(where, mesh)
    replicated = NamedSharding(mesh, P())
    axes = tuple(mesh.axis_names)
    where_step = f"{where}(...)'s step"

    def global_grads(params: Any, batch: Any, key: Any) -> tuple[Any, Any]:
        extra = () if key is None else (key,)
        return jax.value_and_grad(lambda p: loss_fn(model, p, batch, *extra))(params)

    def local_grads(params: Any, batch: Any, key: Any) -> tuple[Any, Any]:
        # Runs per device on its slice of the batch. shard_map is called with
        # check_vma=False: jax_rnn.unroll starts its scans from carries built by
        # `initial_state` (zeros, identical on every device), which the step makes
        # device-varying, and lax.scan's type check rejects that mismatch. Without the
        # check, the gradients here are the local ones and pmean averages them.
        if key is not None:
            for name in axes:
                key = jax.random.fold_in(key, jax.lax.axis_index(name))
        loss, grads = global_grads(params, batch, key)
        return jax.lax.pmean(loss, axes), jax.lax.pmean(grads, axes)

    def update(params: Any, opt_state: Any, loss: Any, grads: Any) -> tuple[Any, Any, Any]:
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return _apply_updates(params, updates), opt_state, loss

    def batch_shardings(batch: Any) -> Any:
        return jax.tree.map(lambda a: _leaf_sharding(mesh, np.ndim(a), time_major), batch)

    @functools.cache
    def compiled(treedef: Any, ndims: tuple[int, ...], has_key: bool) -> Any:
        specs = jax.tree.unflatten(
            treedef, [_leaf_sharding(mesh, n, time_major).spec for n in ndims]
        )
        if method == "jit":
            def core(params: Any, opt_state: Any, batch: Any, key: Any) -> Any:
                return update(params, opt_state, *global_grads(params, batch, key))
        else:
            grads_fn = jax.shard_map(
                local_grads,
                mesh=mesh,
                in_specs=(P(), specs, P()),
                out_specs=(P(), P()),
                check_vma=False,
            )

            def core(params: Any, opt_state: Any, batch: Any, key: Any) -> Any:
                return update(params, opt_state, *grads_fn(params, batch, key))

        return jax.jit(
            core,
            in_shardings=(replicated, replicated, None, replicated if has_key else None),
            out_shardings=(replicated, replicated, replicated),
            donate_argnums=(0, 1) if donate else (),
        )

    def prepare(params: Any, opt_state: Any, batch: Any, key: Any) -> tuple[Any, tuple]:
        _check_batch(where_step, batch, time_major, mesh.size)
        shardings = batch_shardings(batch)

        def place(leaf: Any, sharding: NamedSharding) -> Any:
            if isinstance(leaf, jax.Array) and leaf.sharding.is_equivalent_to(
                sharding, leaf.ndim
            ):
                return leaf
            if jax.process_count() > 1:
                raise ValueError(
                    f"`{where_step}`: on several processes every batch leaf must already "
                    "be a global array sharded over the batch; build the batch with "
                    "`jax_rnn.distributed.shard_batch(local_batch, mesh, "
                    "process_local=True)`."
                )
            return jax.device_put(leaf, sharding)

        batch = jax.tree.map(place, batch, shardings)
        leaves, treedef = jax.tree.flatten(batch)
        fn = compiled(treedef, tuple(np.ndim(a) for a in leaves), key is not None)
        return fn, (params, opt_state, batch, key)

    def step(params: Any, opt_state: Any, batch: Any, key: Any = None) -> tuple[Any, Any, Any]:
        fn, args = prepare(params, opt_state, batch, key)
        return fn(*args)

    def lower(params: Any, opt_state: Any, batch: Any, key: Any = None) -> Any:
        fn, args = prepare(params, opt_state, batch, key)
        return fn.lower(*args)

    step.lower = lower  # type: ignore[attr-defined]
    step.__doc__ = (
        "step(params, opt_state, batch, key=None) -> (params, opt_state, loss); "
        "see `jax_rnn.distributed.data_parallel_step`."
    )
    return step
