"""The `jax-rnn` command line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from jax_rnn._cli import main

from .test_core import NOTEBOOK_PRINTED


def test_demo_prints_the_notebook_digits(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    for field, label in [("pre_activation", "pre-activation:"), ("state", "state:"),
                         ("output", "output:")]:
        lines = [line.split(label, 1)[1].strip() for line in out.splitlines()
                 if line.strip().startswith(label)]
        assert lines == NOTEBOOK_PRINTED[field]
    assert "gradient of the last output" in out
    assert "b_output      [1.]" in out


def test_demo_json_matches_numpy(capsys):
    assert main(["demo", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["steps"]) == 5
    # The notebook's loop in numpy, and the last output's gradient by central differences.
    w_s = np.array([[0.1, 0.2], [0.3, 0.4]])
    w_i, b, w_o = np.array([0.5, 0.6]), np.array([0.1, -0.1]), np.array([1.0, 2.0])

    def run(w_s=w_s, w_i=w_i, b=b, w_o=w_o, b_o=0.1):
        h = np.zeros(2)
        for x in range(1, 6):
            h = np.tanh(h @ w_s + x * w_i + b)
        return h @ w_o + b_o, h

    last, h = run()
    assert np.isclose(doc["steps"][-1]["output"][0], last, rtol=1e-15)
    np.testing.assert_allclose(doc["steps"][-1]["state"], h, rtol=1e-15)
    eps, fd = 1e-6, np.zeros((2, 2))
    for idx in np.ndindex(2, 2):
        d = np.zeros((2, 2))
        d[idx] = eps
        fd[idx] = (run(w_s=w_s + d)[0] - run(w_s=w_s - d)[0]) / (2 * eps)
    np.testing.assert_allclose(doc["grad_last_output"]["w_cell_state"], fd, rtol=1e-7)
    np.testing.assert_allclose(doc["grad_last_output"]["w_output"], h[:, None], rtol=1e-15)


def test_module_entry_point_defaults_to_demo():
    out = subprocess.run([sys.executable, "-m", "jax_rnn"], capture_output=True, text=True,
                         check=True).stdout
    assert "[0.53704957 0.46211716]" in out


def test_bench_and_grad_reject_non_positive_sizes(capsys):
    """`--matmul-size 0` used to mean the default 2048, `--budget -1` and `--input-scale -1`
    ran; all are refused by the parser, before anything runs."""
    for argv, expected in ((["bench", "--matmul-size", "0"], "a positive integer"),
                           (["bench", "--budget=-1"], "a positive number"),
                           (["bench", "--seed=-1"], "an integer >= 0"),
                           (["grad", "--input-scale=-1"], "a positive number"),
                           (["grad", "--input-scale", "nan"], "a positive number"),
                           (["train", "--lr", "inf"], "a positive number"),
                           (["train", "--clip", "inf"], "a positive number"),
                           (["train", "--seed=-1"], "an integer >= 0")):
        with pytest.raises(SystemExit) as err:
            main(argv)
        assert err.value.code == 2
        assert f"expected {expected}" in capsys.readouterr().err, argv


def test_a_bad_out_folder_fails_before_the_work(tmp_path):
    """`--out` under a file: refused at once with the path in the message (it used to fail
    after the whole sweep or training, with a traceback)."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    for command in (["grad", "--lengths", "2", "--radii", "1"],
                    ["train", "--cells", "elman", "--steps", "1", "--length", "2"]):
        with pytest.raises(SystemExit, match=rf"jax-rnn {command[0]}: cannot use --out "
                           rf"'{blocker}/x'"):
            main([*command, "--out", str(blocker / "x")])


def test_demo_json_into_a_closed_pipe():
    """`jax-rnn demo --json | head`: no BrokenPipeError traceback, exit status 0. The
    reader here (`true`) is gone before Python has imported JAX, so every write fails."""
    done = subprocess.run(["bash", "-c", "set -o pipefail; "
                           f"'{sys.executable}' -m jax_rnn demo --json | true"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
