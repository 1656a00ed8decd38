"""jax_rnn: functional recurrent neural networks in JAX.

Pure cell steps ``step(params, carry, x) -> (carry, y)``, unrolled with
:func:`jax.lax.scan` under ``jit``, with the gradients of the outputs exposed.
"""

from . import distributed as distributed
from . import gradients as gradients
from . import interop as interop
from . import reference as reference
from ._compose import Bidirectional as Bidirectional
from ._compose import BidirectionalParams as BidirectionalParams
from ._compose import BidirectionalState as BidirectionalState
from ._compose import Stack as Stack
from ._compose import bidirectional as bidirectional
from ._compose import stack as stack
from ._elman import ElmanParams as ElmanParams
from ._elman import elman as elman
from ._elman import elman_relu as elman_relu
from ._elman import elman_step as elman_step
from ._elman import make_elman as make_elman
from ._generate import generate as generate
from ._gru import GRUParams as GRUParams
from ._gru import gru as gru
from ._gru import gru_step as gru_step
from ._jacobian import output_jacobian as output_jacobian
from ._lstm import LSTMParams as LSTMParams
from ._lstm import LSTMState as LSTMState
from ._lstm import lstm as lstm
from ._lstm import lstm_step as lstm_step
from ._parallel import ParallelInfo as ParallelInfo
from ._parallel import parallel_solve as parallel_solve
from ._parallel import register_jacobian_diagonal as register_jacobian_diagonal
from ._seed import seed_example as seed_example
from ._types import Cell as Cell
from ._types import StepOutput as StepOutput
from ._unroll import default_unroll as default_unroll
from ._unroll import unroll as unroll

__version__ = "0.1.0"

__all__ = [
    "Bidirectional",
    "BidirectionalParams",
    "BidirectionalState",
    "Cell",
    "GRUParams",
    "LSTMParams",
    "LSTMState",
    "ParallelInfo",
    "Stack",
    "bidirectional",
    "stack",
    "ElmanParams",
    "StepOutput",
    "default_unroll",
    "distributed",
    "elman",
    "elman_relu",
    "elman_step",
    "generate",
    "gradients",
    "interop",
    "gru",
    "gru_step",
    "lstm",
    "lstm_step",
    "make_elman",
    "output_jacobian",
    "parallel_solve",
    "reference",
    "register_jacobian_diagonal",
    "seed_example",
    "unroll",
]
