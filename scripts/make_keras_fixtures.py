"""Writes the Keras golden fixtures that ``tests/test_interop.py`` checks against.

For every layer (``SimpleRNN`` with tanh, ``SimpleRNN`` with relu, ``GRU`` with
``reset_after=True``, ``LSTM``) and ``use_bias`` (True, False) this builds Keras 3 layers
on the JAX backend with freshly drawn weights (the biases random too, so that no bias
mix-up can pass), runs them on a small batch (B=2, T=4, I=3, H=5) and saves, to
``tests/data/keras_<kind>_<bias|nobias>.npz``:

* ``weights/<i>``: the list ``layer.get_weights()`` returns, in its order:
  ``kernel (I, G*H)``, ``recurrent_kernel (H, G*H)`` and, with ``use_bias``, ``bias``
  (``(2, 3H)`` for the GRU, ``(G*H,)`` otherwise);
* ``meta/kind`` (``"SimpleRNN"``, ``"GRU"`` or ``"LSTM"``), ``meta/activation``,
  ``meta/use_bias``, ``meta/keras_version``, ``meta/backend``, ``meta/jax_version``,
  ``meta/dtype``;
* ``xs``: the inputs, batch-major ``(B, T, I)`` as Keras takes them; ``h0`` (and ``c0``
  for the LSTM): random initial states ``(B, H)``;
* for the four runs ``forward``, ``forward_state0``, ``go_backwards`` and
  ``go_backwards_state0`` (``go_backwards`` False or True; from Keras's zero initial
  state or from ``initial_state=[h0]`` / ``[h0, c0]``) of a layer built with
  ``return_sequences=True, return_state=True``: ``<run>/output`` ``(B, T, H)`` exactly
  as Keras returns it (with ``go_backwards=True`` in processing order, that is reversed
  in time: ``output[:, 0]`` is the step over ``xs[:, T - 1]``), and the final states
  ``<run>/h`` and, for the LSTM, ``<run>/c`` ``(B, H)``.

The layers compute in float32. Keras 3's JAX backend cannot run them in float64:
``keras.config.set_floatx("float64")`` builds float64 weights, but Keras's type
promotion (``keras.backend.result_type``) turns float64 into float32 on every backend
but TensorFlow, so the activations come back float32 and ``lax.scan`` rejects the
step's carry ("carry input and carry output must have equal types").

Run from the repository root (needs keras 3; jax_rnn itself never imports it)::

    pip install keras==3.15.1
    python scripts/make_keras_fixtures.py

The output is deterministic: the weights, inputs and states come from fixed seeds.
"""

from __future__ import annotations

import itertools
import os

os.environ["KERAS_BACKEND"] = "jax"  # read when keras is first imported

import _fixtures  # noqa: E402  (beside this script)
import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

B, T, IN, H = 2, 4, 3, 5  # batch, time, input and hidden sizes
DTYPE = "float32"
KINDS = {  # file tag -> (Keras layer, activation)
    "simple_rnn_tanh": ("SimpleRNN", "tanh"),
    "simple_rnn_relu": ("SimpleRNN", "relu"),
    "gru": ("GRU", "tanh"),
    "lstm": ("LSTM", "tanh"),
}
GATES = {"SimpleRNN": 1, "GRU": 3, "LSTM": 4}
RUNS = {  # run -> (go_backwards, from the random initial state)
    "forward": (False, False),
    "forward_state0": (False, True),
    "go_backwards": (True, False),
    "go_backwards_state0": (True, True),
}


def draw_weights(kind: str, use_bias: bool, rng: np.random.Generator) -> list[np.ndarray]:
    """Random weights shaped as a Keras layer's ``get_weights()`` returns them.

    Args:
        kind: ``"SimpleRNN"``, ``"GRU"`` or ``"LSTM"``.
        use_bias: whether to append the bias (non-zero, unlike Keras's initialiser).
        rng: the generator to draw from.

    Returns:
        ``[kernel, recurrent_kernel]`` and, with ``use_bias``, ``bias``, in float32.
    """
    width = GATES[kind] * H
    weights = [rng.normal(size=(IN, width)), rng.normal(size=(H, width)) / np.sqrt(H)]
    if use_bias:
        weights.append(rng.normal(scale=0.5, size=(2, width) if kind == "GRU" else (width,)))
    return [w.astype(DTYPE) for w in weights]


def build_layer(
    kind: str, activation: str, use_bias: bool, go_backwards: bool, weights: list[np.ndarray]
):
    """A built Keras layer returning its sequence and final states, holding ``weights``.

    Args:
        kind: ``"SimpleRNN"``, ``"GRU"`` or ``"LSTM"``.
        activation: the ``SimpleRNN``'s activation (the gated layers keep tanh).
        use_bias: the layer's ``use_bias``.
        go_backwards: the layer's ``go_backwards``.
        weights: what to ``set_weights`` it to.

    Returns:
        The layer, built for inputs ``(B, T, IN)``.
    """
    kwargs: dict = {"activation": activation} if kind == "SimpleRNN" else {}
    if kind == "GRU":
        kwargs["reset_after"] = True
    layer = getattr(keras.layers, kind)(
        H,
        use_bias=use_bias,
        go_backwards=go_backwards,
        return_sequences=True,
        return_state=True,
        dtype=DTYPE,
        **kwargs,
    )
    layer.build((B, T, IN))
    layer.set_weights(weights)
    return layer


def run_layer(layer, xs: np.ndarray, state0: list[np.ndarray] | None) -> dict[str, np.ndarray]:
    """The layer's output sequence and final states, as numpy arrays.

    Args:
        layer: a layer from :func:`build_layer`.
        xs: inputs ``(B, T, IN)``.
        state0: ``[h0]`` (``[h0, c0]`` for an LSTM), or ``None`` for Keras's zeros.

    Returns:
        ``{"output": (B, T, H), "h": (B, H)}``, and ``"c"`` for an LSTM.
    """
    outs = layer(xs) if state0 is None else layer(xs, initial_state=state0)
    output, *states = (keras.ops.convert_to_numpy(o) for o in outs)
    return {"output": output, **dict(zip(("h", "c"), states, strict=False))}


def make(tag: str, use_bias: bool, seed: int) -> dict[str, np.ndarray]:
    """Every array of one fixture file.

    Args:
        tag: a key of :data:`KINDS`.
        use_bias: the layers' ``use_bias``.
        seed: the seed of the weights, inputs and initial states.

    Returns:
        The arrays to save, by name (see the module docstring).
    """
    kind, activation = KINDS[tag]
    rng = np.random.default_rng(seed)
    drawn = draw_weights(kind, use_bias, rng)
    xs = rng.normal(size=(B, T, IN)).astype(DTYPE)
    state0 = [rng.normal(size=(B, H)).astype(DTYPE) for _ in range(2 if kind == "LSTM" else 1)]
    arrays: dict[str, np.ndarray] = {
        "meta/kind": np.array(kind),
        "meta/activation": np.array(activation),
        "meta/use_bias": np.array(use_bias),
        "meta/keras_version": np.array(keras.__version__),
        "meta/backend": np.array(keras.backend.backend()),
        "meta/jax_version": np.array(jax.__version__),
        "meta/dtype": np.array(DTYPE),
        "xs": xs,
        "h0": state0[0],
    }
    if kind == "LSTM":
        arrays["c0"] = state0[1]
    for run, (go_backwards, from_state0) in RUNS.items():
        layer = build_layer(kind, activation, use_bias, go_backwards, drawn)
        weights = [np.asarray(w) for w in layer.get_weights()]
        assert len(weights) == len(drawn)
        for i, (w, d) in enumerate(zip(weights, drawn, strict=True)):
            assert w.dtype == d.dtype and np.array_equal(w, d), (tag, i)
            arrays[f"weights/{i}"] = w
        for name, value in run_layer(layer, xs, state0 if from_state0 else None).items():
            assert value.dtype == np.dtype(DTYPE), (tag, run, name, value.dtype)
            arrays[f"{run}/{name}"] = value
    return arrays


def main() -> None:
    out = _fixtures.output_folder(__doc__.splitlines()[0])
    total = 0
    for seed, (tag, use_bias) in enumerate(itertools.product(KINDS, (True, False))):
        arrays = make(tag, use_bias, seed=2000 + 17 * seed)
        name = f"keras_{tag}_{'bias' if use_bias else 'nobias'}.npz"
        size = _fixtures.save(out, name, arrays)
        total += size
        n_weights = sum(k.startswith("weights/") for k in arrays)
        print(
            f"{name:32s} {n_weights} weights  output {arrays['forward/output'].shape}  "
            f"|out|max {np.abs(arrays['forward/output']).max():.3f}  {size / 1024:.1f} KiB"
        )
    print(
        f"keras {keras.__version__} ({keras.backend.backend()} backend, jax {jax.__version__}, "
        f"{DTYPE}); {total / 1024:.1f} KiB in {out}"
    )


if __name__ == "__main__":
    main()
