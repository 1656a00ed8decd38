"""Runs ``jax-rnn bench`` from a checkout: ``python benchmarks/rnn_bench.py [flags]``.

The benchmark itself lives in ``jax_rnn/_bench.py`` (and the peers it times in
``jax_rnn/_bench_peers.py``) so that ``jax-rnn bench`` works from an installed package;
``--help`` lists the flags. See docs/performance.md for a recorded run.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jax_rnn._cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
