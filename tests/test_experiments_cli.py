"""The `jax-rnn grad` and `jax-rnn train` commands, end to end on tiny settings, in process.

Each command writes PNG plots and a JSON file; the tests decode the plots and check the
JSON numbers against independent computations (numpy matrix powers, the numpy reference
loop and its hand-written backpropagation through time).
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

import jax_rnn
from jax_rnn import gradients
from jax_rnn._cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png(path):
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert image[..., :3].std() > 0.01, f"{path} is blank"


@pytest.mark.parametrize("command", ["grad", "train"])
def test_help_lists_the_common_options(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--out", "--seed", "--steps" if command == "train" else "--radii"):
        assert option in text
    assert f"jax-rnn-out/{command}" in text


def test_grad_command_writes_plots_and_numbers(tmp_path, capsys):
    from jax_rnn import _experiments

    out = tmp_path / "grad"
    argv = ["grad", "--radii", "0.5,1.5", "--lengths", "5,9", "--hidden", "4", "--batch", "2",
            "--seed", "3", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for name in ("grad_norms.png", "decay_rates.png", "grad.json"):
        assert f"wrote {out / name}" in printed
    check_png(out / "grad_norms.png")
    check_png(out / "decay_rates.png")
    doc = json.loads((out / "grad.json").read_text())
    assert doc["command"] == "grad"
    assert doc["config"]["radii"] == [0.5, 1.5] and doc["config"]["lengths"] == [5, 9]
    assert len(doc["runs"]) == 2 * 2 * 2

    w_unit, w_in, xs = _experiments.sweep_problem(3, 4, 2, 9, 0.1)
    assert np.isclose(np.max(np.abs(np.linalg.eigvals(w_unit))), 1.0)
    ln10 = math.log(10.0)
    for run in doc["runs"]:
        length, radius = run["length"], run["radius"]
        w = radius * w_unit
        norms = np.asarray(run["log10_norms"])
        assert norms.shape == (length + 1,) and norms[0] == 0.0  # distance 0: the identity
        assert np.isclose(run["sigma_max"], np.linalg.norm(w, 2))
        slope = np.polyfit(np.arange(length + 1), norms, 1)[0]
        assert np.isclose(run["decay_rate"], 10**slope)
        if run["activation"] == "linear":
            # d h_T / d h_t = (W^T)^(T-t) for a linear RNN: numpy's matrix powers.
            exact = [math.log10(np.linalg.norm(np.linalg.matrix_power(w, k), 2))
                     for k in range(length + 1)]
            np.testing.assert_allclose(run["exact_log10_norms"], exact, rtol=1e-12)
            np.testing.assert_allclose(norms, exact, rtol=1e-9, atol=1e-12)
            assert run["max_abs_error_log10"] < 1e-9
        else:
            bound = np.arange(length + 1) * math.log10(run["bound_rate"])
            assert run["bound_holds"] and np.all(norms <= bound + 1e-9)
            assert 0 < run["max_tanh_derivative"] <= 1
            assert run["bound_rate"] <= run["sigma_max"]
    # the tanh numbers are jax_rnn.gradients.jacobian_norms', averaged in log space
    tanh = next(r for r in doc["runs"] if r["activation"] == "tanh" and r["length"] == 9
                and r["radius"] == 1.5)
    params = jax_rnn.ElmanParams(w_cell_state=jax.numpy.asarray(1.5 * w_unit),
                                 w_cell_input=jax.numpy.asarray(w_in), b_cell=None)
    logs = gradients.jacobian_norms(jax_rnn.elman, params, xs, log=True)
    np.testing.assert_allclose(tanh["log10_norms"], np.asarray(logs)[::-1].mean(1) / ln10,
                               rtol=1e-12, atol=1e-12)
    # the same function, called directly, gives the same document
    direct = _experiments.gradient_flow_sweep([0.5, 1.5], [5, 9], hidden_size=4, batch_size=2,
                                              seed=3)
    assert json.loads(json.dumps(direct)) == doc


def numpy_mse_and_gradient_norm(params, xs, targets):
    """The adding problem's loss at the last step and the global norm of its gradient,
    from the numpy reference loop and its hand-written BPTT."""
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    _, ys = jax_rnn.reference.numpy_unroll(p64, xs.astype(np.float64))
    error = ys.output[-1, :, 0] - targets
    jac = jax_rnn.reference.numpy_output_jacobian(p64, xs.astype(np.float64))
    squared = 0.0
    for value in jac.values():
        if value is not None:  # d mse / d W = mean_b 2 error_b d y_{T,b} / d W
            grad = np.tensordot(2 * error / len(error), value[-1, :, 0], axes=1)
            squared += np.sum(grad**2)
    return np.mean(error**2), np.sqrt(squared)


def test_train_command_writes_plot_and_numbers(tmp_path, monkeypatch, capsys):
    from jax_rnn import _training

    monkeypatch.chdir(tmp_path)  # the default --out is ./jax-rnn-out/train
    argv = ["train", "--cells", "elman", "--steps", "3", "--length", "6", "--batch", "5",
            "--hidden", "3", "--seed", "1"]
    assert main(argv) == 0
    out = tmp_path / "jax-rnn-out" / "train"
    printed = capsys.readouterr().out
    assert "elman" in printed and "wrote" in printed
    check_png(out / "train_loss.png")
    doc = json.loads((out / "train.json").read_text())
    assert doc["command"] == "train"
    assert doc["config"]["steps"] == 3 and doc["config"]["cells"] == ["elman"]
    assert np.isclose(doc["baseline_loss"], 1 / 6)
    runs = doc["runs"]
    assert [(r["cell"], r["clip"]) for r in runs] == [("elman", None), ("elman", 1.0)]
    for run in runs:
        assert len(run["losses"]) == len(run["grad_norms"]) == 3
        assert np.all(np.isfinite(run["losses"])) and np.all(np.asarray(run["grad_norms"]) > 0)
        assert run["final_loss"] == run["losses"][-1]  # the mean of the last tenth: 1 step
        assert np.isfinite(run["eval_loss"])
        assert run["max_grad_norm"] == max(run["grad_norms"])

    # Step 0 of both runs: the same initial params on the same first batch.
    xs, targets = _training.adding_problem(_training.data_streams(1)[0], 5, 6)
    values, markers = xs[..., 0], xs[..., 1]
    assert np.all(markers.sum(0) == 2)
    assert np.all(markers[:3].sum(0) == 1) and np.all(markers[3:].sum(0) == 1)
    np.testing.assert_allclose(targets, (values * markers).sum(0), rtol=1e-6)
    params = _training.init_params("elman", 1, 3)
    loss, norm = numpy_mse_and_gradient_norm(params, xs, targets)
    for run in runs:
        np.testing.assert_allclose(run["losses"][0], loss, rtol=1e-5)
        np.testing.assert_allclose(run["grad_norms"][0], norm, rtol=1e-4)
