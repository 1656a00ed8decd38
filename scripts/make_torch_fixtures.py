"""Writes the PyTorch golden fixtures that ``tests/test_interop.py`` checks against.

For every combination of cell (``nn.RNN`` with tanh, ``nn.RNN`` with relu, ``nn.GRU``,
``nn.LSTM``), ``num_layers`` (1, 2) and direction (uni, bi) this builds a float64 module
from a fixed seed, runs it on a small batch (T=5, B=3, I=4, H=3) twice and saves, to
``tests/data/torch_<kind>_l<L>_<uni|bi>.npz``:

* ``sd/<name>``: the module's state dict, as numpy arrays;
* ``meta/mode``, ``meta/nonlinearity``, ``meta/num_layers``, ``meta/bidirectional``;
* ``xs``: the padded inputs, time-major ``(T, B, I)``; ``lengths``: ``(B,)``;
* for the run ``packed`` (``lengths = [5, 3, 1]``, zero initial state, through
  ``pack_padded_sequence(enforce_sorted=False)`` / ``pad_packed_sequence(total_length=T)``)
  and the run ``full`` (every sequence full length, no packing, random ``h0``/``c0``):
  ``<run>/output`` ``(T, B, D*H)`` (zeros past each length), ``<run>/h_n``
  ``(L*D, B, H)``, ``<run>/c_n`` (LSTM), the initial states ``<run>/h0``/``<run>/c0``
  (``full`` only), the fixed random loss weights ``<run>/w_output``, ``<run>/w_h_n``,
  ``<run>/w_c_n``, and the gradients of

      loss = sum(output * w_output) + sum(h_n * w_h_n) [+ sum(c_n * w_c_n)]

  with respect to every parameter (``<run>/grad/<name>``), the input
  (``<run>/grad_xs``) and the initial states (``<run>/grad_h0``, ``<run>/grad_c0``).

Run from the repository root (needs torch; jax_rnn itself never imports it)::

    python scripts/make_torch_fixtures.py

The output is deterministic: every module and array comes from a fixed seed.
"""

from __future__ import annotations

import itertools

import _fixtures  # beside this script
import numpy as np
import torch

T, B, IN, H = 5, 3, 4, 3  # time, batch, input and hidden sizes
LENGTHS = (5, 3, 1)
KINDS = {  # file tag -> (nn class name, nonlinearity)
    "rnn_tanh": ("RNN", "tanh"),
    "rnn_relu": ("RNN", "relu"),
    "gru": ("GRU", None),
    "lstm": ("LSTM", None),
}


def _module(mode: str, nonlinearity: str | None, num_layers: int, bidirectional: bool):
    kwargs = {"nonlinearity": nonlinearity} if mode == "RNN" else {}
    cls = getattr(torch.nn, mode)
    module = cls(IN, H, num_layers=num_layers, bidirectional=bidirectional, **kwargs)
    return module.double().eval()


def _run(module, xs: torch.Tensor, lengths, h0, c0, gen: torch.Generator) -> dict:
    """One forward/backward pass; returns the arrays to save under the run's prefix."""
    is_lstm = isinstance(module, torch.nn.LSTM)
    module.zero_grad()
    xs = xs.clone().requires_grad_(True)
    state = None
    if h0 is not None:
        h0 = h0.clone().requires_grad_(True)
        state = h0
        if is_lstm:
            c0 = c0.clone().requires_grad_(True)
            state = (h0, c0)
    if lengths is None:
        output, hidden = module(xs, state)
    else:
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            xs, torch.tensor(lengths), enforce_sorted=False
        )
        packed_out, hidden = module(packed, state)
        output, _ = torch.nn.utils.rnn.pad_packed_sequence(packed_out, total_length=xs.shape[0])
    h_n, c_n = hidden if is_lstm else (hidden, None)
    w_output = torch.randn(output.shape, generator=gen, dtype=torch.float64)
    w_h_n = torch.randn(h_n.shape, generator=gen, dtype=torch.float64)
    loss = (output * w_output).sum() + (h_n * w_h_n).sum()
    out = {"output": output, "h_n": h_n, "w_output": w_output, "w_h_n": w_h_n}
    if is_lstm:
        w_c_n = torch.randn(c_n.shape, generator=gen, dtype=torch.float64)
        loss = loss + (c_n * w_c_n).sum()
        out.update(c_n=c_n, w_c_n=w_c_n)
    loss.backward()
    out["grad_xs"] = xs.grad
    if h0 is not None:
        out["h0"], out["grad_h0"] = h0, h0.grad
        if is_lstm:
            out["c0"], out["grad_c0"] = c0, c0.grad
    for name, p in module.named_parameters():
        out[f"grad/{name}"] = p.grad
    return {k: v.detach().numpy().copy() for k, v in out.items()}


def make(tag: str, num_layers: int, bidirectional: bool, seed: int) -> dict[str, np.ndarray]:
    mode, nonlinearity = KINDS[tag]
    torch.manual_seed(seed)
    module = _module(mode, nonlinearity, num_layers, bidirectional)
    gen = torch.Generator().manual_seed(seed + 1)
    # xs is padded with noise, not zeros, past each length: only packing may hide it.
    xs = torch.randn(T, B, IN, generator=gen, dtype=torch.float64)
    d = 2 if bidirectional else 1
    h0 = torch.randn(num_layers * d, B, H, generator=gen, dtype=torch.float64)
    c0 = torch.randn(num_layers * d, B, H, generator=gen, dtype=torch.float64)
    arrays: dict[str, np.ndarray] = {
        "meta/mode": np.array(mode),
        "meta/nonlinearity": np.array(nonlinearity or ""),
        "meta/num_layers": np.array(num_layers),
        "meta/bidirectional": np.array(bidirectional),
        "xs": xs.numpy().copy(),
        "lengths": np.array(LENGTHS, dtype=np.int64),
    }
    for name, value in module.state_dict().items():
        arrays[f"sd/{name}"] = value.detach().numpy().copy()
    runs = {
        "packed": _run(module, xs, LENGTHS, None, None, gen),
        "full": _run(module, xs, None, h0, c0, gen),
    }
    for run, values in runs.items():
        for name, value in values.items():
            arrays[f"{run}/{name}"] = value
    return arrays


def main() -> None:
    out = _fixtures.output_folder(__doc__.splitlines()[0])
    torch.use_deterministic_algorithms(True)
    total = 0
    configs = itertools.product(KINDS, (1, 2), (False, True))
    for seed, (tag, num_layers, bidirectional) in enumerate(configs):
        arrays = make(tag, num_layers, bidirectional, seed=1000 + 17 * seed)
        name = f"torch_{tag}_l{num_layers}_{'bi' if bidirectional else 'uni'}.npz"
        size = _fixtures.save(out, name, arrays)
        total += size
        n_sd = sum(k.startswith("sd/") for k in arrays)
        print(
            f"{name:28s} {n_sd:2d} params  output {arrays['packed/output'].shape}  "
            f"h_n {arrays['packed/h_n'].shape}  "
            f"|out|max {np.abs(arrays['packed/output']).max():.3f}  {size / 1024:.1f} KiB"
        )
    print(f"torch {torch.__version__}; {total / 1024:.1f} KiB in {out}")


if __name__ == "__main__":
    main()
