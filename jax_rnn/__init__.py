"""jax_rnn: functional recurrent neural networks in JAX.

Pure cell steps ``step(params, carry, x) -> (carry, y)``, unrolled with
:func:`jax.lax.scan` under ``jit``, with the gradients of the outputs exposed.
"""

from . import reference as reference
from ._elman import ElmanParams as ElmanParams
from ._elman import elman as elman
from ._elman import elman_relu as elman_relu
from ._elman import elman_step as elman_step
from ._elman import make_elman as make_elman
from ._jacobian import output_jacobian as output_jacobian
from ._seed import seed_example as seed_example
from ._types import Cell as Cell
from ._types import StepOutput as StepOutput
from ._unroll import unroll as unroll

__version__ = "0.1.0"

__all__ = [
    "Cell",
    "ElmanParams",
    "StepOutput",
    "elman",
    "elman_relu",
    "elman_step",
    "make_elman",
    "output_jacobian",
    "reference",
    "seed_example",
    "unroll",
]
