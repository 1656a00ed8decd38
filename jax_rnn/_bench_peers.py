"""The implementations that ``jax-rnn bench`` times, each built from the same weights.

Every builder takes jax_rnn parameters (numpy arrays, PyTorch's gate order: ``r, z, n``
for the GRU and ``i, f, g, o`` for the LSTM), maps them into its library's own layout
and returns a :class:`Runner` whose ``forward`` and ``fwd_bwd`` run one call and wait
for the result. ``forward`` returns the outputs ``(T, B, H)`` so that the benchmark can
compare them with jax_rnn's; ``fwd_bwd`` returns ``(loss, grads)`` for
``loss = sum(outputs)`` and the gradient with respect to every parameter.

Flax, Haiku, Equinox and PyTorch are imported inside the builders only, so this module
imports without them (``jax-rnn bench`` reports the peers it could not import).

Where a peer's equations differ from jax_rnn's the builder maps what can be mapped and
says so in ``Runner.note`` with ``equivalent=False``:

* Haiku's ``GRU`` applies the reset gate to ``h`` before the recurrent matmul,
  ``tanh(x W_xa + (r * h) W_ha + b_a)``, where PyTorch (and jax_rnn, Flax, Equinox)
  apply it after, ``tanh(x W_in + b_in + r * (h W_hn + b_hn))``. Its update gate is
  the complement of PyTorch's (mapped by negating its weights).
* Haiku has no tanh ``VanillaRNN`` (its ``VanillaRNN`` is ReLU) and Equinox has no
  plain RNN cell at all, so these rows are absent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

CELLS = ("elman", "elman_relu", "gru", "lstm")
GATES = {"elman": 1, "elman_relu": 1, "gru": 3, "lstm": 4}


@dataclasses.dataclass
class Runner:
    """One implementation of one cell at one size.

    Attributes:
        impl: short key (``"jax_rnn"``, ``"numpy"``, ``"flax"``, ...).
        label: what the row says.
        library: ``"jax"``, ``"numpy"`` or ``"torch"``: which timing and memory rules apply.
        equivalent: whether it computes exactly jax_rnn's equations with the mapped weights.
        note: what was mapped and how, or why it is not equivalent.
        forward: runs the forward pass once; returns the outputs ``(T, B, H)``.
        fwd_bwd: runs forward and backward once; returns ``(loss, grads)``.
        memory: ``memory(mode)`` after ``mode`` ran: ``(bytes, kind)`` or ``(None, why)``.
        jit: whether the first call compiles (JAX) and ``compile_s`` applies.
        unravel: maps ``fwd_bwd``'s gradients to the cell's parameters (a raveled row's
            one flat gradient); the identity for every other row.
    """

    impl: str
    label: str
    library: str
    equivalent: bool
    note: str
    forward: Callable[[], Any]
    fwd_bwd: Callable[[], Any]
    memory: Callable[[str], tuple[int | None, str]]
    jit: bool
    unravel: Callable[[Any], Any] = lambda grads: grads


# ----------------------------------------------------------------------------- JAX


class _Compiled:
    """A jitted function compiled ahead of time on its first call (so that the first
    call's time includes lowering and compiling) and its XLA memory analysis."""

    def __init__(self, fn: Callable[..., Any], args: tuple) -> None:
        self.fn, self.args, self.compiled = fn, args, None

    def __call__(self) -> Any:
        import jax

        if self.compiled is None:
            self.compiled = jax.jit(self.fn).lower(*self.args).compile()
        return jax.block_until_ready(self.compiled(*self.args))

    def memory(self) -> tuple[int | None, str]:
        if self.compiled is None:
            return None, "not compiled"
        try:
            analysis = self.compiled.memory_analysis()
        except Exception as err:  # noqa: BLE001 - backends without the analysis
            return None, f"memory_analysis unavailable: {type(err).__name__}"
        if analysis is None:
            return None, "memory_analysis unavailable"
        return int(analysis.temp_size_in_bytes), "xla_temp"


def _jax_runner(
    impl: str,
    label: str,
    note: str,
    equivalent: bool,
    forward_fn: Callable[[Any, Any], Any],
    params: Any,
    xs: Any,
) -> Runner:
    import jax
    import jax.numpy as jnp

    def loss(p: Any, x: Any) -> Any:
        return jnp.sum(forward_fn(p, x))

    fwd = _Compiled(forward_fn, (params, xs))
    fb = _Compiled(jax.value_and_grad(loss), (params, xs))
    modes = {"forward": fwd, "fwd_bwd": fb}
    return Runner(impl, label, "jax", equivalent, note, fwd, fb,
                  lambda mode: modes[mode].memory(), jit=True)


def jax_rnn_runner(cell_name: str, params: Any, xs: Any, impl: str | None,
                   has_impl: bool) -> Runner:
    """jax_rnn's ``unroll``: its default path (``impl=None``) or ``impl="scan"``.

    Without an ``impl`` keyword in :func:`jax_rnn.unroll` the ``"scan"`` row runs the
    default path and says so in its label.
    """
    import jax
    import jax.numpy as jnp

    import jax_rnn

    cell = _cell(cell_name)
    kwargs: dict[str, Any] = {}
    if impl is None:
        key, label = "jax_rnn", "jax_rnn.unroll (default)"
        note = "the library's default path"
    elif has_impl:
        key, label = "jax_rnn.scan", f"jax_rnn.unroll(impl={impl!r})"
        note = "plain autodiff through lax.scan"
        kwargs["impl"] = impl
    else:
        key, label = "jax_rnn.scan", "jax_rnn.unroll (no impl keyword: default path)"
        note = "jax_rnn.unroll has no `impl` keyword in this version; this row is the default"

    def forward(p: Any, x: Any) -> Any:
        return jax_rnn.unroll(cell, p, x, **kwargs)[1].output

    p = jax.tree.map(jnp.asarray, params)
    return _jax_runner(key, label, note, True, forward, p, jnp.asarray(xs))


def jax_rnn_sharded_runner(cell_name: str, params: Any, xs: Any) -> Runner:
    """jax_rnn's default path with the batch split over every device (``jax.devices()``)
    by :mod:`jax_rnn.distributed`: each device unrolls its rows, the parameters are
    replicated. On a CPU the devices come from ``jax-rnn bench --cpu-devices N`` (JAX's
    ``jax_num_cpu_devices``), and each runs its own loop on its own thread, so the
    recurrence uses N cores where one device's small per-step products use one."""
    import jax
    import jax.numpy as jnp

    import jax_rnn
    from jax_rnn import distributed

    cell = _cell(cell_name)
    mesh = distributed.make_mesh()

    def forward(p: Any, x: Any) -> Any:
        return jax_rnn.unroll(cell, p, x)[1].output

    p = distributed.replicate(jax.tree.map(jnp.asarray, params), mesh)
    label = f"jax_rnn.unroll, batch over {mesh.size} {jax.devices()[0].platform} devices"
    note = ("the default path with the batch split over the devices by jax_rnn.distributed "
            "(shard_batch, replicate); not one of the issue's like-for-like rows")
    return _jax_runner("jax_rnn.sharded", label, note, True, forward, p,
                       distributed.shard_batch(xs, mesh))


def jax_rnn_raveled_runner(cell_name: str, params: Any, xs: Any) -> Runner:
    """jax_rnn's default path on the parameters raveled into one flat array by
    :func:`jax.flatten_util.ravel_pytree`, unravelled inside the jitted function.

    A jitted call pays JAX's dispatch per array argument (0.38-0.64 us each on this
    project's 2-core CPU machine, docs/performance.md). Where a call takes about 10 us
    (the notebook's size) that decides the race: jax_rnn's LSTM, in PyTorch's layout, is
    four arrays where Haiku's is two. This row shows the same computation with one array
    of parameters; it is reported beside the bars, not counted in them.
    """
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    import jax_rnn

    cell = _cell(cell_name)
    flat, unravel = ravel_pytree(jax.tree.map(jnp.asarray, params))

    def forward(f: Any, x: Any) -> Any:
        return jax_rnn.unroll(cell, unravel(f), x)[1].output

    note = ("the default path with the parameters in one flat array (jax.flatten_util."
            "ravel_pytree), unravelled inside jit: one array argument per call; not one of "
            "the issue's like-for-like rows")
    runner = _jax_runner("jax_rnn.raveled", "jax_rnn.unroll, parameters raveled into one "
                         "array", note, True, forward, flat, jnp.asarray(xs))
    runner.unravel = unravel
    return runner


def _cell(cell_name: str) -> Any:
    import jax_rnn

    return {"elman": jax_rnn.elman, "elman_relu": jax_rnn.elman_relu,
            "gru": jax_rnn.gru, "lstm": jax_rnn.lstm}[cell_name]


def init_params(cell_name: str, seed: int, input_size: int, hidden_size: int,
                dtype: Any) -> Any:
    """jax_rnn parameters without a readout (the output is the state), as numpy arrays."""
    import jax

    params = _cell(cell_name).init(jax.random.key(seed), input_size, hidden_size, None,
                                   dtype=dtype)
    return jax.tree.map(np.asarray, params)


def _thirds(a: np.ndarray, n: int) -> list[np.ndarray]:
    return list(np.split(a, n, axis=-1))


# --------------------------------------------------------------------------- numpy


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # 1 / (1 + exp(-x)) without overflow warnings for large |x|.
    return 0.5 * (np.tanh(0.5 * x) + 1.0)


def numpy_forward(cell_name: str, p: Any, xs: np.ndarray, keep: bool = False) -> Any:
    """The seed notebook's loop, batched: one Python iteration per time step.

    With ``keep`` it also returns what the backward pass needs.
    """
    steps, batch, _ = xs.shape
    hidden = p.w_cell_state.shape[0]
    out = np.empty((steps, batch, hidden), xs.dtype)
    h = np.zeros((batch, hidden), xs.dtype)
    tape: list = []
    if cell_name in ("elman", "elman_relu"):
        for t in range(steps):
            pre = h @ p.w_cell_state + xs[t] @ p.w_cell_input + p.b_cell
            h = np.tanh(pre) if cell_name == "elman" else np.maximum(pre, 0)
            out[t] = h
    elif cell_name == "gru":
        for t in range(steps):
            gi = xs[t] @ p.w_cell_input + p.b_cell_input
            gh = h @ p.w_cell_state + p.b_cell_state
            gi_r, gi_z, gi_n = _thirds(gi, 3)
            gh_r, gh_z, gh_n = _thirds(gh, 3)
            r = _sigmoid(gi_r + gh_r)
            z = _sigmoid(gi_z + gh_z)
            n = np.tanh(gi_n + r * gh_n)
            if keep:
                tape.append((h, r, z, n, gh_n))
            h = (1 - z) * n + z * h
            out[t] = h
    else:
        c = np.zeros_like(h)
        b = p.b_cell_input + p.b_cell_state
        for t in range(steps):
            g = xs[t] @ p.w_cell_input + h @ p.w_cell_state + b
            gi, gf, gg, go = _thirds(g, 4)
            i, f, gg, o = _sigmoid(gi), _sigmoid(gf), np.tanh(gg), _sigmoid(go)
            c_prev = c
            c = f * c + i * gg
            tc = np.tanh(c)
            if keep:
                tape.append((h, c_prev, i, f, gg, o, tc))
            h = o * tc
            out[t] = h
    return (out, tape) if keep else out


def numpy_fwd_bwd(cell_name: str, p: Any, xs: np.ndarray) -> tuple[float, dict]:
    """``sum(outputs)`` and its gradient, by a hand-written backpropagation through time.

    The per-step gradients of the pre-activations are kept and the weight gradients are
    summed over time with one matmul each at the end.
    """
    out, tape = numpy_forward(cell_name, p, xs, keep=True)
    steps, batch, _ = xs.shape
    hidden = p.w_cell_state.shape[0]
    dh = np.zeros((batch, hidden), xs.dtype)
    h_prev = np.concatenate([np.zeros((1, batch, hidden), xs.dtype), out[:-1]])
    grads: dict[str, np.ndarray] = {}
    if cell_name in ("elman", "elman_relu"):
        dpre = np.empty_like(out)
        w_t = p.w_cell_state.T
        for t in range(steps - 1, -1, -1):
            dh = dh + 1.0
            h = out[t]
            dpre[t] = dh * (1 - h * h) if cell_name == "elman" else dh * (h > 0)
            dh = dpre[t] @ w_t
        grads = {"w_cell_state": _sum_outer(h_prev, dpre), "w_cell_input": _sum_outer(xs, dpre),
                 "b_cell": dpre.sum((0, 1))}
    elif cell_name == "gru":
        dgi = np.empty((steps, batch, 3 * hidden), xs.dtype)
        dgh = np.empty_like(dgi)
        w_t = p.w_cell_state.T
        for t in range(steps - 1, -1, -1):
            h, r, z, n, gh_n = tape[t]
            dh = dh + 1.0
            dn = dh * (1 - z)
            da = dn * (1 - n * n)
            dz = dh * (h - n) * z * (1 - z)
            dr = da * gh_n * r * (1 - r)
            dgi[t] = np.concatenate([dr, dz, da], -1)
            dgh[t] = np.concatenate([dr, dz, da * r], -1)
            dh = dh * z + dgh[t] @ w_t
        grads = {"w_cell_input": _sum_outer(xs, dgi), "w_cell_state": _sum_outer(h_prev, dgh),
                 "b_cell_input": dgi.sum((0, 1)), "b_cell_state": dgh.sum((0, 1))}
    else:
        dg = np.empty((steps, batch, 4 * hidden), xs.dtype)
        dc = np.zeros_like(dh)
        w_t = p.w_cell_state.T
        for t in range(steps - 1, -1, -1):
            h, c_prev, i, f, gg, o, tc = tape[t]
            dh = dh + 1.0
            dc = dc + dh * o * (1 - tc * tc)
            dg[t] = np.concatenate([dc * gg * i * (1 - i), dc * c_prev * f * (1 - f),
                                    dc * i * (1 - gg * gg), dh * tc * o * (1 - o)], -1)
            dc = dc * f
            dh = dg[t] @ w_t
        db = dg.sum((0, 1))
        grads = {"w_cell_input": _sum_outer(xs, dg), "w_cell_state": _sum_outer(h_prev, dg),
                 "b_cell_input": db, "b_cell_state": db}
    return float(out.sum(dtype=np.float64)), grads


def _sum_outer(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``sum_t a[t].T @ b[t]`` as one matmul."""
    return a.reshape(-1, a.shape[-1]).T @ b.reshape(-1, b.shape[-1])


def _tracemalloc_peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    import tracemalloc

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


def numpy_runner(cell_name: str, params: Any, xs: np.ndarray) -> Runner:
    """The seed-style numpy loop; the first call of each mode also measures memory."""
    peaks: dict[str, int] = {}

    def probe(mode: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            if mode in peaks:
                return fn()
            result, peaks[mode] = _tracemalloc_peak(fn)
            return result

        return call

    def memory(mode: str) -> tuple[int | None, str]:
        return peaks.get(mode), "tracemalloc_peak"

    return Runner(
        "numpy", "numpy loop (seed style)", "numpy", True,
        "one Python iteration per step, batched over B; fwd+bwd is a hand-written BPTT",
        probe("forward", lambda: numpy_forward(cell_name, params, xs)),
        probe("fwd_bwd", lambda: numpy_fwd_bwd(cell_name, params, xs)),
        memory, jit=False,
    )


# ---------------------------------------------------------------------------- Flax


def flax_runners(cell_name: str, params: Any, xs: np.ndarray) -> list[Runner]:
    """``flax.linen.RNN`` over ``SimpleCell`` / ``GRUCell`` / ``LSTMCell``
    (and ``OptimizedLSTMCell``, which takes the same parameters)."""
    import flax.linen as nn
    import jax.numpy as jnp

    hidden = params.w_cell_state.shape[0]
    dtype = xs.dtype
    p = params
    if cell_name in ("elman", "elman_relu"):
        act = jnp.tanh if cell_name == "elman" else (lambda a: jnp.maximum(a, 0))
        cells = [("flax", "flax nn.RNN(SimpleCell)",
                  nn.SimpleCell(hidden, activation_fn=act, param_dtype=dtype))]
        tree = {"i": {"kernel": p.w_cell_input, "bias": p.b_cell},
                "h": {"kernel": p.w_cell_state}}
        note = "i.kernel = w_cell_input, i.bias = b_cell, h.kernel = w_cell_state"
        if cell_name == "elman_relu":
            note += "; activation_fn = relu"
    elif cell_name == "gru":
        cells = [("flax", "flax nn.RNN(GRUCell)", nn.GRUCell(hidden, param_dtype=dtype))]
        wi, wh = _thirds(p.w_cell_input, 3), _thirds(p.w_cell_state, 3)
        bi, bh = _thirds(p.b_cell_input, 3), _thirds(p.b_cell_state, 3)
        tree = {"ir": {"kernel": wi[0], "bias": bi[0] + bh[0]},
                "iz": {"kernel": wi[1], "bias": bi[1] + bh[1]},
                "in": {"kernel": wi[2], "bias": bi[2]},
                "hr": {"kernel": wh[0]}, "hz": {"kernel": wh[1]},
                "hn": {"kernel": wh[2], "bias": bh[2]}}
        note = ("gates split into ir/iz/in, hr/hz/hn kernels; r and z biases summed into "
                "ir/iz, the candidate's recurrent bias in hn.bias (inside the reset product)")
    else:
        cells = [("flax", "flax nn.RNN(LSTMCell)", nn.LSTMCell(hidden, param_dtype=dtype)),
                 ("flax.optimized", "flax nn.RNN(OptimizedLSTMCell)",
                  nn.OptimizedLSTMCell(hidden, param_dtype=dtype))]
        wi, wh = _thirds(p.w_cell_input, 4), _thirds(p.w_cell_state, 4)
        b = _thirds(p.b_cell_input + p.b_cell_state, 4)
        tree = {}
        for k, gate in enumerate("ifgo"):
            tree[f"i{gate}"] = {"kernel": wi[k]}
            tree[f"h{gate}"] = {"kernel": wh[k], "bias": b[k]}
        note = ("gates i,f,g,o split into ii/if/ig/io (no bias) and hi/hf/hg/ho kernels, "
                "the two biases summed into the h* biases; carry (c, h)")
    runners = []
    for key, label, cell in cells:
        model = nn.RNN(cell, time_major=True)
        variables = model.init(_jax_key(), jnp.asarray(xs[:1]))
        variables = _fill("flax", variables, {"params": {"cell": tree}})

        def forward(v: Any, x: Any, model: Any = model) -> Any:
            return model.apply(v, x)

        runners.append(_jax_runner(key, label, note, True, forward, variables, jnp.asarray(xs)))
    return runners


def _jax_key() -> Any:
    import jax

    return jax.random.key(0)


def _fill(where: str, template: Any, values: Any) -> Any:
    """``values`` in the structure of ``template``, checking every shape matches."""
    import jax
    import jax.numpy as jnp

    flat_t, treedef = jax.tree.flatten(template)
    flat_v, treedef_v = jax.tree.flatten(values)
    if treedef != treedef_v:
        raise ValueError(f"{where}: parameter tree {treedef_v} does not match {treedef}")
    out = []
    for t, v in zip(flat_t, flat_v, strict=True):
        if tuple(t.shape) != tuple(np.shape(v)):
            raise ValueError(f"{where}: shape {np.shape(v)} where {t.shape} is expected")
        out.append(jnp.asarray(v, t.dtype))
    return jax.tree.unflatten(treedef, out)


# --------------------------------------------------------------------------- Haiku


def haiku_runners(cell_name: str, params: Any, xs: np.ndarray) -> list[Runner]:
    """``haiku.dynamic_unroll`` over ``VanillaRNN`` (ReLU), ``GRU`` or ``LSTM``."""
    import haiku as hk
    import jax.numpy as jnp

    if cell_name == "elman":
        return []
    hidden = params.w_cell_state.shape[0]
    batch = xs.shape[1]
    p = params
    equivalent = True
    if cell_name == "elman_relu":
        name, make, label = "vanilla_rnn", lambda: hk.VanillaRNN(hidden), "haiku VanillaRNN"
        tree = {"vanilla_rnn/linear": {"w": p.w_cell_input, "b": p.b_cell},
                "vanilla_rnn/linear_1": {"w": p.w_cell_state, "b": np.zeros_like(p.b_cell)}}
        note = "VanillaRNN is ReLU; input linear = (w_cell_input, b_cell), hidden bias zero"
    elif cell_name == "gru":
        name, make, label = "gru", lambda: hk.GRU(hidden), "haiku GRU"
        wi, wh = _thirds(p.w_cell_input, 3), _thirds(p.w_cell_state, 3)
        bi, bh = _thirds(p.b_cell_input, 3), _thirds(p.b_cell_state, 3)
        # Haiku's columns are (z, r, a) and h = (1 - z) h + z a: its z is 1 - PyTorch's z.
        tree = {"gru": {"w_i": np.concatenate([-wi[1], wi[0], wi[2]], -1),
                        "w_h": np.concatenate([-wh[1], wh[0], wh[2]], -1),
                        "b": np.concatenate([-(bi[1] + bh[1]), bi[0] + bh[0], bi[2] + bh[2]])}}
        equivalent = False
        note = ("not equivalent: Haiku's GRU resets h before the recurrent matmul, "
                "tanh(x W_a + (r*h) W_ha + b_a), where PyTorch/jax_rnn compute "
                "tanh(x W_n + b_in + r*(h W_hn + b_hn)); z mapped as 1 - z, r and the weights "
                "as they are, b_a = b_in + b_hn")
    else:
        name, make, label = "lstm", lambda: hk.LSTM(hidden), "haiku LSTM"
        wi, wh = _thirds(p.w_cell_input, 4), _thirds(p.w_cell_state, 4)
        b = _thirds(p.b_cell_input + p.b_cell_state, 4)
        order = (0, 2, 1, 3)  # Haiku splits its gates as i, g, f, o
        w = np.concatenate([np.concatenate([wi[k], wh[k]], 0) for k in order], -1)
        bias = [b[k] - (1.0 if k == 1 else 0.0) for k in order]  # Haiku adds 1 to f
        tree = {"lstm/linear": {"w": w, "b": np.concatenate(bias).astype(w.dtype)}}
        note = ("one linear on concat([x, h]); gate columns reordered i,f,g,o -> i,g,f,o; "
                "both biases summed, minus 1 on f for Haiku's built-in forget bias")

    def unrolled(x: Any) -> Any:
        core = make()
        return hk.dynamic_unroll(core, x, core.initial_state(batch), time_major=True)[0]

    fn = hk.without_apply_rng(hk.transform(unrolled))
    template = fn.init(_jax_key(), jnp.asarray(xs[:1]))
    variables = _fill(f"haiku {name}", template, tree)
    return [_jax_runner("haiku", f"{label} + dynamic_unroll", note, equivalent, fn.apply,
                        variables, jnp.asarray(xs))]


# ------------------------------------------------------------------------- Equinox


def equinox_runners(cell_name: str, params: Any, xs: np.ndarray) -> list[Runner]:
    """Equinox ``GRUCell`` / ``LSTMCell`` vmapped over the batch under ``lax.scan``."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    if cell_name in ("elman", "elman_relu"):
        return []
    hidden, inputs = params.w_cell_state.shape[0], params.w_cell_input.shape[0]
    p = params
    dtype = xs.dtype
    if cell_name == "gru":
        cell = eqx.nn.GRUCell(inputs, hidden, key=_jax_key(), dtype=dtype)
        bh = _thirds(p.b_cell_state, 3)
        bias = p.b_cell_input + np.concatenate([bh[0], bh[1], np.zeros_like(bh[2])])
        values = (p.w_cell_input.T, p.w_cell_state.T, bias, bh[2])
        cell = eqx.tree_at(lambda c: (c.weight_ih, c.weight_hh, c.bias, c.bias_n), cell,
                           tuple(jnp.asarray(v, dtype) for v in values))
        note = ("weight_ih/hh = w_cell_input/state.T; bias = b_ih + (b_hh_r, b_hh_z, 0), "
                "bias_n = b_hh_n")
        label = "equinox GRUCell + lax.scan"
    else:
        cell = eqx.nn.LSTMCell(inputs, hidden, key=_jax_key(), dtype=dtype)
        values = (p.w_cell_input.T, p.w_cell_state.T, p.b_cell_input + p.b_cell_state)
        cell = eqx.tree_at(lambda c: (c.weight_ih, c.weight_hh, c.bias), cell,
                           tuple(jnp.asarray(v, dtype) for v in values))
        note = "weight_ih/hh = w_cell_input/state.T, bias = b_ih + b_hh; carry (h, c)"
        label = "equinox LSTMCell + lax.scan"
    batch = xs.shape[1]

    def forward(c: Any, x: Any) -> Any:
        h = jnp.zeros((batch, hidden), x.dtype)
        carry0 = h if cell_name == "gru" else (h, h)

        def step(carry: Any, x_t: Any) -> tuple[Any, Any]:
            new = jax.vmap(c)(x_t, carry)
            return new, (new if cell_name == "gru" else new[0])

        return jax.lax.scan(step, carry0, x)[1]

    return [_jax_runner("equinox", label, note, True, forward, cell, jnp.asarray(xs))]


# ------------------------------------------------------------------------- PyTorch


class _RSSPeak:
    """Peak resident memory above the level before the call, sampled from /proc every
    half millisecond in a thread: approximate (short peaks can be missed, memory the
    allocator kept from earlier calls is not counted); ``None`` off Linux."""

    def __init__(self) -> None:
        import os

        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self.page
        except OSError:
            return None

    def run(self, fn: Callable[[], Any]) -> tuple[Any, int | None]:
        import threading

        base = self._rss()
        if base is None:
            return fn(), None
        peak = [base]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                rss = self._rss() or 0
                peak[0] = max(peak[0], rss)
                time.sleep(0.0005)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            result = fn()
        finally:
            done.set()
            thread.join()
        peak[0] = max(peak[0], self._rss() or 0)
        return result, peak[0] - base


def torch_device() -> str:
    """Where PyTorch runs beside JAX: ``"cuda"`` when JAX's default backend is a GPU and
    PyTorch sees CUDA, else ``"cpu"``. Needs torch."""
    import jax
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def full_float32(torch_too: bool) -> Iterator[None]:
    """JAX's ``"highest"`` matmul precision and, with ``torch_too`` and torch importable,
    PyTorch's TF32 off; both restored on exit."""
    import jax

    torch: Any = None
    if torch_too:
        with contextlib.suppress(ImportError):
            import torch
    flags = (torch.backends.cuda.matmul, torch.backends.cudnn) if torch is not None else ()
    saved = [f.allow_tf32 for f in flags]
    try:
        for f in flags:
            f.allow_tf32 = False
        with jax.default_matmul_precision("highest"):
            yield
    finally:
        for f, value in zip(flags, saved, strict=True):
            f.allow_tf32 = value


def torch_runners(cell_name: str, params: Any, xs: np.ndarray) -> list[Runner]:
    """PyTorch ``nn.RNN`` (tanh or relu), ``nn.GRU`` or ``nn.LSTM``, eager.

    It runs where JAX runs: on the GPU (cuDNN's fused RNN kernels, each call waits with
    ``torch.cuda.synchronize()``, peak memory from ``torch.cuda.max_memory_allocated``)
    when JAX's default backend is a GPU and PyTorch sees CUDA, else on the CPU. cuDNN's
    TF32 switch is left at PyTorch's default, as a user would find it. The forward pass
    runs under ``torch.inference_mode()`` (no autograd bookkeeping, as a jitted JAX
    forward has none); the forward+backward pass clears ``.grad`` first.
    """
    import torch

    cuda = torch_device() == "cuda"
    device = torch.device("cuda" if cuda else "cpu")

    hidden, inputs = params.w_cell_state.shape[0], params.w_cell_input.shape[0]
    dtype = {np.dtype("float32"): torch.float32, np.dtype("float64"): torch.float64}[xs.dtype]
    p = params
    if cell_name in ("elman", "elman_relu"):
        nonlinearity = "tanh" if cell_name == "elman" else "relu"
        module: Any = torch.nn.RNN(inputs, hidden, nonlinearity=nonlinearity)
        bias_ih, bias_hh = p.b_cell, np.zeros_like(p.b_cell)
        label = f"torch nn.RNN({nonlinearity})"
    elif cell_name == "gru":
        module = torch.nn.GRU(inputs, hidden)
        bias_ih, bias_hh = p.b_cell_input, p.b_cell_state
        label = "torch nn.GRU"
    else:
        module = torch.nn.LSTM(inputs, hidden)
        bias_ih, bias_hh = p.b_cell_input, p.b_cell_state
        label = "torch nn.LSTM"
    module = module.to(device=device, dtype=dtype)  # before loading: float64 stays float64
    state = {"weight_ih_l0": p.w_cell_input.T, "weight_hh_l0": p.w_cell_state.T,
             "bias_ih_l0": bias_ih, "bias_hh_l0": bias_hh}
    module.load_state_dict({k: torch.tensor(np.ascontiguousarray(v), dtype=dtype)
                            for k, v in state.items()})
    x = torch.tensor(xs, dtype=dtype, device=device)
    weights = list(module.parameters())
    peaks: dict[str, int | None] = {}
    wait = torch.cuda.synchronize if cuda else (lambda: None)

    def forward() -> Any:
        with torch.inference_mode():
            out = module(x)[0]
        wait()
        return out

    def fwd_bwd() -> Any:
        for w in weights:
            w.grad = None
        loss = module(x)[0].sum()
        loss.backward()
        wait()
        return loss, [w.grad for w in weights]

    def cuda_peak(fn: Callable[[], Any]) -> tuple[Any, int]:
        wait()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        return result, torch.cuda.max_memory_allocated() - base

    def probe(mode: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            if mode in peaks:
                return fn()
            result, peaks[mode] = cuda_peak(fn) if cuda else _RSSPeak().run(fn)
            return result

        return call

    def memory(mode: str) -> tuple[int | None, str]:
        return peaks.get(mode), "cuda_peak_growth" if cuda else "rss_peak_growth"

    note = "weight_ih = w_cell_input.T, weight_hh = w_cell_state.T, biases as they are"
    if cell_name in ("elman", "elman_relu"):
        note = "weight_ih = w_cell_input.T, weight_hh = w_cell_state.T, bias_ih = b_cell, " \
            "bias_hh = 0"
    where = "cuDNN" if cuda else "eager"
    return [Runner("torch", f"{label} ({where})", "torch", True, note,
                   probe("forward", forward), probe("fwd_bwd", fwd_bwd), memory, jit=False)]


def to_numpy(value: Any) -> np.ndarray:
    """Outputs of any runner as a numpy array."""
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def grads_as_dict(grads: Any) -> dict[str, np.ndarray]:
    """jax_rnn params (or a numpy BPTT's dict) as ``{field: array}``, dropping ``None``."""
    if isinstance(grads, dict):
        return {k: np.asarray(v) for k, v in grads.items()}
    return {k: np.asarray(v) for k, v in grads._asdict().items() if v is not None}


BUILDERS: dict[str, Callable[[str, Any, np.ndarray], list[Runner]]] = {
    "numpy": lambda cell, p, xs: [numpy_runner(cell, p, xs)],
    "flax": flax_runners,
    "haiku": haiku_runners,
    "equinox": equinox_runners,
    "torch": torch_runners,
}

# What each peer library does not have, reported instead of a row.
ABSENT = {
    ("haiku", "elman"): "Haiku's VanillaRNN is ReLU only: no tanh Elman cell",
    ("equinox", "elman"): "Equinox has no plain (Elman) RNN cell",
    ("equinox", "elman_relu"): "Equinox has no plain (Elman) RNN cell",
}

IMPORTS = {"flax": "flax.linen", "haiku": "haiku", "equinox": "equinox", "torch": "torch"}
