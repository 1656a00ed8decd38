"""``python -m jax_rnn``: the ``jax-rnn`` command line."""

from ._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
