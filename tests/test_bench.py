"""`jax-rnn bench`: a smoke run and the correctness of what it times (no timing asserted)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_rnn
from jax_rnn import _bench_peers as bp
from jax_rnn._cli import main

CELLS = {"elman": jax_rnn.elman, "elman_relu": jax_rnn.elman_relu, "gru": jax_rnn.gru,
         "lstm": jax_rnn.lstm}


def test_quick_bench_writes_json_markdown_and_plot(tmp_path, capsys):
    argv = ["bench", "--quick", "--out", str(tmp_path), "--peers", "numpy", "scan",
            "--cells", "elman", "lstm", "--repeats", "2", "--budget", "0.05",
            "--matmul-size", "64"]
    assert main(argv) == 0
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.png").stat().st_size > 1000
    md = (tmp_path / "bench.md").read_text()
    assert "| quick |" in md and "numpy loop" in md
    assert doc["machine"]["cores"] >= 1 and doc["matmul"]["flops_per_s"] > 0
    rows = doc["results"]
    assert {(r["cell"], r["impl"]) for r in rows} == {
        (cell, impl) for cell in ("elman", "lstm") for impl in ("jax_rnn", "jax_rnn.scan", "numpy")}
    for r in rows:
        assert "error" not in r, r
        for mode in ("forward", "fwd_bwd"):
            assert r[mode]["median_s"] > 0 and all(t > 0 for t in r[mode]["times_s"])
        # Values, not times: every implementation computed jax_rnn's outputs and gradients.
        assert r["check"]["max_abs_diff"] < 1e-5, r
        assert r["check"]["grad_max_abs_diff"] < 1e-4, r
        # ... and the float64 numpy reference's gradients, relative per parameter.
        assert 0 < r["check"]["grad_rel_err_float64"] < 1e-5, r
    for s in doc["summary"]:  # the gradient bar: jax_rnn against impl="scan"
        assert 0 < s["grads"]["rel_diff_vs_scan"] < 1e-5 and s["grads"]["tolerance"] == 1e-4
    numpy_rows = [r for r in rows if r["impl"] == "numpy"]
    assert all(r["check"]["agrees"] for r in numpy_rows)
    assert {s["cell"] for s in doc["summary"]} == {"elman", "lstm"}
    assert "ratio = peer time / jax_rnn time" in capsys.readouterr().out


def test_precision_highest_is_recorded_and_restored(tmp_path):
    """``--precision highest`` runs in full float32 and leaves JAX's setting as it was."""
    before = jax.config.jax_default_matmul_precision
    argv = ["bench", "--quick", "--out", str(tmp_path), "--peers", "scan", "--cells", "gru",
            "--repeats", "1", "--budget", "0.01", "--matmul-size", "32", "--no-plot",
            "--precision", "highest"]
    assert main(argv) == 0
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert doc["settings"]["precision"] == "highest"
    assert "--precision highest" in doc["command"]
    assert "matmul precision highest" in (tmp_path / "bench.md").read_text()
    assert all(r["check"]["max_abs_diff"] < 1e-5 for r in doc["results"])
    assert jax.config.jax_default_matmul_precision == before


@pytest.mark.parametrize("peers", [["all"], ["scan,torch"]])
def test_precision_highest_resolves_the_peer_list(monkeypatch, peers):
    """``--peers all`` and comma lists count torch in, so its TF32 is switched off."""
    from jax_rnn import _bench

    seen = []

    @contextlib.contextmanager
    def spy(torch_too):
        seen.append(torch_too)
        yield

    monkeypatch.setattr(bp, "full_float32", spy)
    monkeypatch.setattr(_bench, "_run", lambda args, precision: 0)
    args = argparse.Namespace(peers=peers, precision="highest")
    assert _bench.run(args) == 0
    assert seen == [True]


def _timed(config, cell, impl, fwd_ms, fb_ms, equivalent=True):
    return {"config": config, "cell": cell, "impl": impl, "equivalent": equivalent,
            "check": {"agrees": True},
            "forward": {"median_s": fwd_ms / 1e3}, "fwd_bwd": {"median_s": fb_ms / 1e3}}


def test_bars_compare_like_with_like_and_report_the_numpy_loop_beside():
    """The issue's bars count only like peers (tanh Elman: Flax and PyTorch; never the
    numpy loop, never a row marked not equivalent); the fastest of all rows is reported
    beside them. Ratios are checked against hand-computed values."""
    from jax_rnn import _bench

    config = _bench.CONFIGS["t1000_b32"]
    results = [
        _timed("t1000_b32", "elman", "jax_rnn", 25.0, 70.0),
        _timed("t1000_b32", "elman", "jax_rnn.scan", 24.0, 95.0),
        _timed("t1000_b32", "elman", "numpy", 24.5, 65.0),
        _timed("t1000_b32", "elman", "flax", 25.5, 98.0),
        _timed("t1000_b32", "elman", "torch", 40.0, 105.0),
        _timed("t1000_b32", "gru", "jax_rnn", 60.0, 200.0),
        _timed("t1000_b32", "gru", "haiku", 30.0, 100.0, equivalent=False),
        _timed("t1000_b32", "gru", "equinox", 66.0, 270.0),
    ]
    mm = {"flops_per_s": 1e11}
    summary = _bench._summarize(results, [config], ["elman", "gru"],
                                {("t1000_b32", "elman"): mm, ("t1000_b32", "gru"): mm})
    elman, gru = summary
    assert elman["fwd_bwd"]["fastest_peer"] == "flax"
    assert elman["fwd_bwd"]["ratio_vs_fastest_peer"] == pytest.approx(98.0 / 70.0)
    assert elman["fwd_bwd"]["fastest_row"] == "numpy"
    assert elman["fwd_bwd"]["ratio_vs_fastest_row"] == pytest.approx(65.0 / 70.0)
    assert elman["fwd_bwd"]["ratio_vs_scan"] == pytest.approx(95.0 / 70.0)
    assert elman["forward"]["fastest_peer"] == "flax"
    assert gru["fwd_bwd"]["fastest_peer"] == "equinox"  # Haiku's GRU is not equivalent
    flops = 6.0 * 1000 * 32 * (64 + 128) * 128 * 3
    assert gru["fwd_bwd_matmul_fraction"] == pytest.approx(flops / 0.2 / 1e11)
    bars = {(b["cell"], b["bar"]): b for b in _bench._bars(summary)}
    fb = bars[("elman", "fwd_bwd_vs_fastest_peer")]
    assert fb["threshold"] == 1.3 and fb["passes"] is True
    assert fb["value_vs_fastest_row"] == pytest.approx(65.0 / 70.0)
    assert bars[("gru", "fwd_bwd_vs_fastest_peer")]["passes"] is True  # 270 / 200
    assert bars[("elman", "forward_vs_fastest_peer")]["passes"] is True  # 25.5 / 25
    assert bars[("gru", "forward_vs_fastest_peer")]["passes"] is True  # 66 / 60


def test_gradient_bar_is_the_largest_relative_difference_per_parameter():
    """``grads_vs_scan``: each parameter's largest difference relative to its own largest
    reference gradient (so a small bias is not hidden by large weights), the worst over
    the parameters; it passes at or below the tolerance, and a missing parameter or a
    wrong shape never passes."""
    from jax_rnn import _bench

    ref = {"w": np.array([[100.0, -200.0]]), "b": np.array([0.5, 0.25])}
    off = {"w": np.array([[100.0, -200.002]]), "b": np.array([0.50002, 0.25])}
    assert _bench._rel_diff(off, ref) == pytest.approx(4e-5)  # b: 2e-5 / 0.5 > w: 1e-5
    assert _bench._rel_diff(ref, ref) == 0.0
    assert _bench._rel_diff({"w": ref["w"]}, ref) == float("inf")
    assert _bench._rel_diff({"w": ref["w"], "b": ref["b"][:1]}, ref) == float("inf")
    zero = {"b": np.zeros(2)}
    assert _bench._rel_diff(zero, zero) == 0.0
    assert _bench._rel_diff({"b": np.array([0.0, 1e-30])}, zero) == float("inf")
    results = [_timed("t1000_b32", "elman", "jax_rnn", 25.0, 70.0)]
    for value, passes in ((4e-5, True), (1e-4, True), (1.5e-4, False)):
        results[0]["check"].update(grad_rel_diff_vs_scan=value, grad_tolerance=1e-4)
        (entry,) = _bench._summarize(results, [_bench.CONFIGS["t1000_b32"]], ["elman"],
                                     {("t1000_b32", "elman"): {"flops_per_s": 1e11}})
        (bar,) = [b for b in _bench._bars([entry]) if b["bar"] == "grads_vs_scan"]
        assert (bar["value"], bar["threshold"], bar["passes"], bar["at_most"]) == (
            value, 1e-4, passes, True)
        doc = {"bars": [bar], "summary": [], "configs": [], "results": [], "notes": [],
               "skipped": {}, "machine": {}}
        lines = []
        _bench._print_ratios(doc, lines.append)
        assert (f"bar not met: t1000_b32 elman grads_vs_scan = {value:.3g} > 0.0001"
                in "\n".join(lines)) is not passes


@pytest.mark.parametrize("name", ["sharded", "raveled"])
def test_beside_rows_are_reported_beside_the_bars_not_in_them(name):
    """The batch over several devices (and the parameters in one array) gets its own
    ratio against the same like peer; the bars and the fastest peer stay jax_rnn's
    default row's, and the other beside-row's fields are empty."""
    from jax_rnn import _bench

    results = [
        _timed("t1000_b32", "elman", "jax_rnn", 25.0, 70.0),
        _timed("t1000_b32", "elman", f"jax_rnn.{name}", 12.5, 40.0),
        _timed("t1000_b32", "elman", "flax", 25.5, 98.0),
    ]
    (entry,) = _bench._summarize(results, [_bench.CONFIGS["t1000_b32"]], ["elman"],
                                 {("t1000_b32", "elman"): {"flops_per_s": 1e11}})
    fb = entry["fwd_bwd"]
    assert fb["fastest_peer"] == "flax" and fb["fastest_row"] == "flax"
    assert fb["ratio_vs_fastest_peer"] == pytest.approx(98.0 / 70.0)
    assert fb[f"{name}_s"] == pytest.approx(0.040)
    assert fb[f"{name}_ratio_vs_fastest_peer"] == pytest.approx(98.0 / 40.0)
    assert entry["forward"][f"{name}_ratio_vs_fastest_peer"] == pytest.approx(25.5 / 12.5)
    (other,) = set(_bench.BESIDE) - {name}
    assert fb[f"{other}_s"] is None and fb[f"{other}_ratio_vs_fastest_peer"] is None
    bars = {b["bar"]: b for b in _bench._bars([entry])}
    assert bars["fwd_bwd_vs_fastest_peer"]["value"] == pytest.approx(98.0 / 70.0)


def test_raveled_row_computes_jax_rnns_numbers_where_dispatch_dominates(tmp_path, capsys):
    """``--peers raveled``: the parameters in one flat array give jax_rnn's outputs and
    (unravelled) gradients in float64, with a section of their own; the row runs only at
    sizes of at most ``RAVELED_MAX_FLOPS`` (the quick size, not T=1000)."""
    from jax_rnn import _bench

    argv = ["bench", "--quick", "--peers", "raveled", "--cells", "gru", "lstm", "--repeats",
            "1", "--budget", "0.01", "--matmul-size", "32", "--no-plot", "--dtype", "float64",
            "--out", str(tmp_path)]
    assert main(argv) == 0  # (the suite runs with x64 on: conftest.py)
    doc = json.loads((tmp_path / "bench.json").read_text())
    rows = [r for r in doc["results"] if r["impl"] == "jax_rnn.raveled"]
    assert {r["cell"] for r in rows} == {"gru", "lstm"}
    for r in rows:
        assert r["check"]["max_abs_diff"] < 1e-12 and r["check"]["grad_max_abs_diff"] < 1e-12
    assert all(s["fwd_bwd"]["raveled_s"] > 0 for s in doc["summary"])
    assert "parameters in one array (row `jax_rnn.raveled`)" in (tmp_path / "bench.md").read_text()
    assert "parameters in one array: fwd" in capsys.readouterr().out
    big = _bench.CONFIGS["t1000_b1"]
    assert _bench._flops_fwd_bwd(big, "elman") > _bench.RAVELED_MAX_FLOPS
    params = bp.init_params("elman", 0, big.I, big.H, "float32")
    xs = np.zeros((big.T, big.B, big.I), np.float32)
    notes = []
    runners = _bench._runners_for(big, "elman", params, xs, ["raveled"], True, notes)
    assert [r.impl for r in runners] == ["jax_rnn"]
    assert notes == ["raveled: not run at t1000_b1, over RAVELED_MAX_FLOPS (1e+06 FLOPs "
                     "forward+backward)"]


def test_cpu_devices_needs_a_fresh_process(tmp_path):
    """This process started JAX with one CPU device: --cpu-devices 2 is refused with a
    message that says why and what to do; --cpu-devices 1 matches and runs."""
    assert len(jax.devices("cpu")) == 1  # JAX has started here (also if this test runs first)
    with pytest.raises(SystemExit, match="already started with 1 device.*fresh process"):
        main(["bench", "--quick", "--cpu-devices", "2", "--out", str(tmp_path)])
    argv = ["bench", "--quick", "--cpu-devices", "1", "--peers", "sharded", "--cells", "elman",
            "--repeats", "1", "--budget", "0.01", "--matmul-size", "32", "--no-plot",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    doc = json.loads((tmp_path / "bench.json").read_text())
    impls = {r["impl"] for r in doc["results"]}
    if jax.device_count() == 1:  # one device: nothing to split
        assert "--cpu-devices" in doc["skipped"]["sharded"] and impls == {"jax_rnn"}
    else:  # a machine with several accelerators: the row splits over them
        assert impls == {"jax_rnn", "jax_rnn.sharded"}


def test_sharded_row_on_two_cpu_devices(tmp_path):
    """The command line in a fresh process with --cpu-devices 2: the batch is split over
    two CPU devices, and the row's outputs and gradients are jax_rnn's (float64)."""
    import subprocess
    import sys

    # No XLA_FLAGS of the caller's; the suite's compile-time flags (conftest.py).
    env = dict(os.environ, XLA_FLAGS=os.environ.get("JAX_RNN_TEST_XLA_FLAGS", ""))
    env["JAX_PLATFORMS"] = "cpu"  # the CPU devices, also on a machine with a GPU
    cmd = [sys.executable, "-m", "jax_rnn", "bench", "--quick", "--cpu-devices", "2",
           "--peers", "sharded", "--cells", "gru", "--repeats", "1", "--budget", "0.01",
           "--matmul-size", "32", "--no-plot", "--dtype", "float64", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert doc["machine"]["jax_device_count"] == 2
    (row,) = [r for r in doc["results"] if r["impl"] == "jax_rnn.sharded"]
    assert "2 cpu devices" in row["label"]
    assert row["check"]["max_abs_diff"] < 1e-12 and row["check"]["grad_max_abs_diff"] < 1e-12
    assert "batch over 2 devices" in done.stdout


def test_warm_up_groups_fast_calls_despite_a_slow_first_or_stalled_call():
    """A fast call is sampled in groups although one warm call stalls (30 ms), and a
    call that compiles is sampled in groups although its first call took 0.6 s (the
    group size comes from the fastest warm call). A call that is slow every time, or
    that does not compile and took 0.6 s, is sampled one call at a time."""
    import time

    from jax_rnn._bench import _warm_up

    def slow_at(*which, seconds=0.03):
        count = []

        def call():
            count.append(None)
            if len(count) in which:
                time.sleep(seconds)
            return len(count)
        return call

    first, inner, result = _warm_up(slow_at(2))  # the first warm call stalls
    assert result == 1 and inner > 100, inner
    first, inner, _ = _warm_up(slow_at(1, seconds=0.6), compiles=True)  # compiling
    assert first >= 0.6 and inner > 100, inner
    first, inner, _ = _warm_up(slow_at(1, seconds=0.6))  # eager: taken as a slow call
    assert first >= 0.6 and inner == 1
    first, inner, _ = _warm_up(lambda: time.sleep(0.03), compiles=True)
    assert inner == 1 and first >= 0.03


@pytest.mark.parametrize("n", [1, 2, 3, 6, 7, 8])
def test_round_orders_balance_who_follows_whom(n):
    """Over a full cycle of rounds every call comes first equally often and directly
    follows every other call equally often (so none always follows PyTorch's)."""
    from collections import Counter

    from jax_rnn._bench import _round_orders

    orders = _round_orders(n)
    assert all(sorted(order) == list(range(n)) for order in orders)
    assert len(set(Counter(order[0] for order in orders).values())) == 1
    pairs = Counter((a, b) for order in orders for a, b in zip(order[:-1], order[1:], strict=True))
    if n > 1:
        assert set(pairs) == {(a, b) for a in range(n) for b in range(n) if a != b}
        assert len(set(pairs.values())) == 1


def test_interleaved_sampling_follows_the_round_orders():
    from jax_rnn._bench import _round_orders, _sample_interleaved

    order: list[int] = []
    calls = [((lambda k=k: order.append(k)), 2) for k in range(4)]
    times = _sample_interleaved(calls, repeats=5, budget=1e9)
    assert [len(t) for t in times] == [5, 5, 5, 5]
    expected = [k for r in range(5) for k in _round_orders(4)[r % 4] for _ in range(2)]
    assert order == expected


def test_interleaved_sampling_pauses_after_spinning_libraries(monkeypatch):
    """A sample of a call marked spinning is followed by a pause (COOL_DOWN_S of sleep)
    where its calls took at least COOL_DOWN_AFTER_S, and so is the start; other samples
    are not. The samples' durations are given, not measured, so that a busy machine
    cannot move a call across the threshold."""
    from jax_rnn import _bench

    events: list = []
    monkeypatch.setattr(_bench, "_pause", lambda: events.append("pause"))
    durations = {0: 2e-3, 1: 0.0, 2: 2e-3, 3: 0.0}  # 0 and 1 spinning; 0 and 2 slow
    monkeypatch.setattr(_bench, "_sample", lambda call, inner: call())

    def call(k):
        def run():
            events.append(k)
            return durations[k]
        return run

    calls = [(call(k), 1) for k in range(4)]
    times = _bench._sample_interleaved(calls, repeats=4, budget=1e9,
                                       spinning=[True, True, False, False])
    assert times == [[durations[k]] * 4 for k in range(4)]
    assert events[0] == "pause"  # before the first round
    samples = [e for e in events if e != "pause"]
    assert sorted(samples) == sorted(list(range(4)) * 4)
    for i, e in enumerate(events[1:], 1):  # a pause right after every sample of 0 only
        if e == "pause":
            assert events[i - 1] == 0, events
        elif e == 0:
            assert events[i + 1] == "pause", events
    assert events.count("pause") == 1 + 4
    assert _bench.COOL_DOWN_AFTER_S < 2e-3


def test_unknown_config_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="unknown config"):
        main(["bench", "--configs", "nope", "--out", str(tmp_path)])


def _problem(cell, dtype, steps=7, batch=3, inputs=2, hidden=5, seed=0):
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((steps, batch, inputs)).astype(dtype)
    return bp.init_params(cell, seed, inputs, hidden, dtype), xs


@pytest.mark.parametrize("cell", list(CELLS))
def test_numpy_loop_and_bptt_match_jax_in_float64(cell):
    params, xs = _problem(cell, np.float64)
    out, grads = bp.numpy_forward(cell, params, xs), bp.numpy_fwd_bwd(cell, params, xs)[1]

    def loss(p):
        return jnp.sum(jax_rnn.unroll(CELLS[cell], p, xs, impl="scan")[1].output)

    expected = jax_rnn.unroll(CELLS[cell], params, xs, impl="scan")[1].output
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    jax_grads = bp.grads_as_dict(jax.grad(loss)(params))
    assert set(grads) == set(jax_grads)
    for name, g in grads.items():
        np.testing.assert_allclose(g, jax_grads[name], rtol=1e-10, atol=1e-10, err_msg=name)


@pytest.mark.parametrize("peer", ["flax", "haiku", "equinox", "torch"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_peer_weight_mappings_reproduce_jax_rnn(peer, cell):
    pytest.importorskip(bp.IMPORTS[peer])
    params, xs = _problem(cell, np.float32)
    expected = np.asarray(jax_rnn.unroll(CELLS[cell], params, xs)[1].output)
    runners = [] if (peer, cell) in bp.ABSENT else bp.BUILDERS[peer](cell, params, xs)
    assert runners or (peer, cell) in bp.ABSENT
    for r in runners:
        got = bp.to_numpy(r.forward())
        if r.equivalent:
            np.testing.assert_allclose(got, expected, atol=2e-6, err_msg=r.label)
        else:  # Haiku's GRU: reset before the matmul, so it must differ
            assert np.abs(got - expected).max() > 1e-3, r.label
        if not r.jit:  # the jitted peers' fwd_bwd is jax.value_and_grad of the same forward
            loss, _ = r.fwd_bwd()
            np.testing.assert_allclose(bp.to_numpy(loss), got.sum(dtype=np.float64), rtol=1e-4)


def test_parallel_benchmark_script_agrees_with_sequential(tmp_path, monkeypatch):
    """benchmarks/parallel.py on a tiny grid: every method's states (and, at --grad-h,
    gradients) agree with the sequential unroll; the report names the crossover."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "parallel.py"
    spec = importlib.util.spec_from_file_location("parallel_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["parallel.py", "--out", str(tmp_path), "--ts", "1", "40",
                                      "--hs", "3", "--grad-h", "3", "--repeats", "1",
                                      "--dtype", "float64"])
    module.main()
    doc = json.loads((tmp_path / "parallel.json").read_text())
    records = doc["records"]
    timed = [r for r in records if "seconds" in r]
    methods = {r["method"] for r in timed}
    assert {"sequential", "deer", "quasi_deer"} <= methods
    assert {(r["T"], r["mode"]) for r in timed} == {(t, m) for t in (1, 40)
                                                    for m in ("forward", "fwd_bwd")}
    for r in timed:
        if r["method"] in ("deer", "quasi_deer"):
            assert not r["fell_back"], r
            # T=1: the default guess (the step evaluated at carry0) is already exact.
            assert (r["iterations"] == 0) if r["T"] == 1 else (r["iterations"] >= 1), r
            assert r["max_abs_diff_vs_sequential"] < 1e-9, r
            assert r["max_rel_diff_vs_sequential"] < 1e-9, r
        if r["method"] == "torch" and r["mode"] == "forward":
            assert r["max_abs_diff_vs_sequential"] < 1e-9, r
    md = (tmp_path / "parallel.md").read_text()
    assert "| 3 | 40 |" in md and "H = 3: DEER" in md


def test_profile_script_counts_every_step_of_the_loops(monkeypatch, capsys):
    """benchmarks/profile_ops.py totals XLA's per-operation trace events per call: a loop
    of T steps runs once and the operations of its body T times each, no operation takes
    longer than the call; the listing prints them."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "profile_ops.py"
    spec = importlib.util.spec_from_file_location("profile_ops", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    steps = 40  # long enough that XLA keeps both loops (it may unroll very short ones)
    params = jax_rnn.elman.init(jax.random.key(0), 3, 4, None)
    xs = jnp.ones((steps, 2, 3), jnp.float32)
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(jax_rnn.unroll(jax_rnn.elman, p, x)[1].output)))
    totals, wall = module.op_times(lambda: grad(params, xs), rounds=2)
    loops = [calls for name, (calls, _) in totals.items() if name.startswith("while")]
    assert loops and all(calls == 1 for calls in loops), totals
    per_step = [name for name, (calls, _) in totals.items() if calls == steps]
    assert len(per_step) >= 2, totals  # at least the loop's product and its tanh
    assert all(calls in (1, steps) for calls, _ in totals.values()), totals
    assert wall > max(total for _, total in totals.values()) > 0
    monkeypatch.setattr(sys, "argv", ["profile_ops.py", "--cell", "gru", "--sizes", "5", "2",
                                      "3", "4", "--top", "3"])
    module.main()
    out = capsys.readouterr().out
    assert "gru T=5 B=2 I=3 H=4 fwd_bwd" in out and len(out.splitlines()) == 6


def test_repeats_flag_overrides_a_sizes_sample_cap(tmp_path, monkeypatch):
    """A size's own cap on samples (3 at T=200 and T=10,000) applies without --repeats,
    and --repeats replaces it (it used to be capped as well)."""
    from jax_rnn import _bench

    monkeypatch.setitem(_bench.CONFIGS, "quick", _bench.Config("quick", 6, 2, 3, 4, repeats=1))
    counts = []
    for extra in ([], ["--repeats", "3"]):
        out = tmp_path / str(len(extra))
        argv = ["bench", "--quick", "--out", str(out), "--peers", "scan", "--cells", "gru",
                "--budget", "1000", "--matmul-size", "32", "--no-plot", *extra]
        assert main(argv) == 0
        rows = json.loads((out / "bench.json").read_text())["results"]
        counts.append({len(r[mode]["times_s"]) for r in rows for mode in ("forward", "fwd_bwd")})
    assert counts == [{1}, {3}]
