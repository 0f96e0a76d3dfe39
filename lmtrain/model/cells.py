"""The recurrent cells of the lecture, written from its equations.

Shapes: B batch, E input size, H hidden size. Every weight acts on the concatenation
`[a(t-1), x(t)]` (the lecture's combined form `W_a = [W_aa, W_ax]`), so each `W_*` has shape
(H, H + E): its first H columns are the recurrent half, the last E the input half.

Each cell has two ways to take a step, and a test proves they agree:
- `forward(x, state)` is the reference: one equation a line, exactly as on the slides.
- `step(x_projected, state, W_recurrent)` is what `layers.RecurrentLayer` runs in its loop: the
  input half `W_x x(t) + b` of every gate was computed for all time steps in one matrix product
  before the loop, so a step only adds the recurrent half.

A state is a named tuple whose first field is the cell's output `a(t)`; nothing above the cell
looks inside it. Cells read a state by position, so a plain tuple (as stored in a checkpoint) works.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.functional import linear

from lmtrain.backprop.stacking import stack_gates
from lmtrain.model import arguments
from lmtrain.speed.torch_internals import version_key

sigmoid, tanh = torch.sigmoid, torch.tanh


class RNNState(NamedTuple):
    a: Tensor  # (B, H)


class GRUState(NamedTuple):
    c: Tensor  # (B, H), the memory cell; the GRU's output is a(t) = c(t)


class LSTMState(NamedTuple):
    a: Tensor  # (B, H)
    c: Tensor  # (B, H)


class Cell(nn.Module):
    """Shared machinery: one (H, H + E) weight and an H bias per gate, named after the lecture."""

    gates: tuple[str, ...] = ()
    state_type: type = RNNState

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size = arguments.size("input_size", input_size)
        self.hidden_size = arguments.size("hidden_size", hidden_size)
        for gate in self.gates:
            self.register_parameter(f"W_{gate}", nn.Parameter(torch.empty(self.hidden_size,
                                                                          self.hidden_size + self.input_size)))
            self.register_parameter(f"b_{gate}", nn.Parameter(torch.empty(self.hidden_size)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # U(-1/sqrt(H), 1/sqrt(H)), the initialisation torch.nn's recurrent layers use.
        bound = 1.0 / math.sqrt(self.hidden_size)
        for parameter in self.parameters():
            nn.init.uniform_(parameter, -bound, bound)

    def initial_state(self, batch_size: int, *, device: torch.device | None = None,
                      dtype: torch.dtype | None = None) -> tuple[Tensor, ...]:
        """`a(0) = 0` (and `c(0) = 0`)."""
        zeros = lambda: torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)  # noqa: E731
        return self.state_type(*(zeros() for _ in self.state_type._fields))

    def stacked_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """The gates' weights stacked in `gates` order, split into the recurrent half (G*H, H),
        the input half (G*H, E), and the stacked bias (G*H,); each one contiguous tensor.

        Without autograd (sampling, evaluation) the stack is kept until a weight changes (a new
        version, device or dtype): sampling runs the layers one token at a time, and stacking anew
        at every token copied all the weights each time (most of a sampling step's time)."""
        if torch.is_grad_enabled():
            return self._stack()
        key = version_key(getattr(self, f"{kind}_{gate}") for kind in "Wb" for gate in self.gates)
        if key is None:  # a torch without version counters: nothing can tell a changed weight
            return self._stack()
        if getattr(self, "_stacked_key", None) != key:
            self._stacked_key, self._stacked = key, self._stack()
        return self._stacked

    def _stack(self) -> tuple[Tensor, Tensor, Tensor]:
        return stack_gates([getattr(self, f"W_{gate}") for gate in self.gates],
                           [getattr(self, f"b_{gate}") for gate in self.gates], self.hidden_size)

    def extra_repr(self) -> str:
        return f"input_size={self.input_size}, hidden_size={self.hidden_size}"


def combine(a_prev: Tensor, x: Tensor) -> Tensor:
    """`[a(t-1), x(t)]`: the two inputs of a gate, side by side (B, H + E)."""
    return torch.cat([a_prev, x], dim=1)


class RNNCell(Cell):
    """The vanilla (Elman) RNN of the lecture:

        a(t) = tanh(W_a [a(t-1), x(t)] + b_a)
    """

    gates = ("a",)
    state_type = RNNState

    def forward(self, x: Tensor, state: RNNState) -> tuple[Tensor, RNNState]:
        (a_prev,) = state
        a = tanh(linear(combine(a_prev, x), self.W_a, self.b_a))
        return a, RNNState(a)

    def step(self, x_projected: Tensor, state: RNNState, W_recurrent: Tensor) -> RNNState:
        (a_prev,) = state
        a = tanh(torch.addmm(x_projected, a_prev, W_recurrent.t()))
        return RNNState(a)


class GRUCell(Cell):
    """The gated recurrent unit (Cho et al. 2014) as on the slides. Full version (`relevance_gate=True`):

        Γ_u  = σ(W_u [c(t-1), x(t)] + b_u)                 update gate
        Γ_r  = σ(W_r [c(t-1), x(t)] + b_r)                 relevance gate
        c̃(t) = tanh(W_c [Γ_r * c(t-1), x(t)] + b_c)        candidate memory
        c(t) = Γ_u * c̃(t) + (1 - Γ_u) * c(t-1)
        a(t) = c(t)

    The simplified GRU (`relevance_gate=False`) drops Γ_r: `c̃(t) = tanh(W_c [c(t-1), x(t)] + b_c)`.

    `gru_reset="after"` is PyTorch's and cuDNN's variant: Γ_r scales the recurrent product rather than
    its input, with a recurrent bias of its own, `W_c = [W_cc, W_cx]`:

        c̃(t) = tanh(W_cx x(t) + b_c + Γ_r * (W_cc c(t-1) + b_cc))
    """

    state_type = GRUState

    def __init__(self, input_size: int, hidden_size: int, *, relevance_gate: bool = True,
                 gru_reset: str = "before") -> None:
        arguments.flags(relevance_gate=relevance_gate)
        if gru_reset not in ("before", "after"):
            raise ValueError(f"gru_reset must be 'before' or 'after'; got {gru_reset!r}")
        if gru_reset == "after" and not relevance_gate:
            raise ValueError("gru_reset 'after' needs relevance_gate=True (it places the relevance gate)")
        self.relevance_gate, self.gru_reset = relevance_gate, gru_reset
        self.gates = ("u", "r", "c") if relevance_gate else ("u", "c")
        super().__init__(input_size, hidden_size)
        if gru_reset == "after":
            bound = 1 / math.sqrt(self.hidden_size)
            self.b_cc = nn.Parameter(torch.empty(self.hidden_size).uniform_(-bound, bound))

    def forward(self, x: Tensor, state: GRUState) -> tuple[Tensor, GRUState]:
        (c_prev,) = state
        gamma_u = sigmoid(linear(combine(c_prev, x), self.W_u, self.b_u))
        gamma_r = sigmoid(linear(combine(c_prev, x), self.W_r, self.b_r)) if self.relevance_gate else 1.0
        if self.gru_reset == "before":
            c_tilde = tanh(linear(combine(gamma_r * c_prev, x), self.W_c, self.b_c))
        else:
            W_cc, W_cx = self.W_c.split([self.hidden_size, self.input_size], dim=1)
            c_tilde = tanh(linear(x, W_cx, self.b_c) + gamma_r * linear(c_prev, W_cc, self.b_cc))
        c = gamma_u * c_tilde + (1 - gamma_u) * c_prev
        a = c
        return a, GRUState(c)

    def step(self, x_projected: Tensor, state: GRUState, W_recurrent: Tensor) -> GRUState:
        H, (c_prev,) = self.hidden_size, state
        if self.gru_reset == "after":
            # Every block multiplies c(t-1) itself: one product for all three.
            recurrent = torch.mm(c_prev, W_recurrent.t())
            gamma_u = sigmoid(x_projected[:, :H] + recurrent[:, :H])
            gamma_r = sigmoid(x_projected[:, H:2 * H] + recurrent[:, H:2 * H])
            c_tilde = tanh(x_projected[:, 2 * H:] + gamma_r * (recurrent[:, 2 * H:] + self.b_cc))
        else:
            # The gates see c(t-1); the candidate sees Γ_r * c(t-1), so it needs its own product.
            gates = torch.addmm(x_projected[:, :-H], c_prev, W_recurrent[:-H].t())
            gamma_u = sigmoid(gates[:, :H])
            gamma_r = sigmoid(gates[:, H:]) if self.relevance_gate else 1.0
            c_tilde = tanh(torch.addmm(x_projected[:, -H:], gamma_r * c_prev, W_recurrent[-H:].t()))
        c = gamma_u * c_tilde + (1 - gamma_u) * c_prev
        return GRUState(c)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, relevance_gate={self.relevance_gate}, gru_reset={self.gru_reset}"


class LSTMCell(Cell):
    """Long short-term memory (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al. 2000):

        Γ_f  = σ(W_f [a(t-1), x(t)] + b_f)                 forget gate
        Γ_u  = σ(W_u [a(t-1), x(t)] + b_u)                 update gate
        c̃(t) = tanh(W_c [a(t-1), x(t)] + b_c)              candidate memory
        c(t) = Γ_f * c(t-1) + Γ_u * c̃(t)
        Γ_o  = σ(W_o [a(t-1), x(t)] + b_o)                 output gate
        a(t) = Γ_o * tanh(c(t))
    """

    gates = ("f", "u", "c", "o")
    state_type = LSTMState

    def __init__(self, input_size: int, hidden_size: int, *, forget_bias: float | None = None) -> None:
        self.forget_bias = arguments.number_or_none("forget_bias", forget_bias)
        super().__init__(input_size, hidden_size)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.forget_bias is not None:
            # A forget-gate bias of 1 keeps the memory at the start (Jozefowicz et al. 2015). None leaves
            # b_f like every other bias, as torch.nn.LSTM does; on Tiny Shakespeare with Adam that learned
            # faster over the first thousand steps (docs/results.md).
            nn.init.constant_(self.b_f, self.forget_bias)

    def forward(self, x: Tensor, state: LSTMState) -> tuple[Tensor, LSTMState]:
        a_prev, c_prev = state
        gamma_f = sigmoid(linear(combine(a_prev, x), self.W_f, self.b_f))
        gamma_u = sigmoid(linear(combine(a_prev, x), self.W_u, self.b_u))
        c_tilde = tanh(linear(combine(a_prev, x), self.W_c, self.b_c))
        c = gamma_f * c_prev + gamma_u * c_tilde
        gamma_o = sigmoid(linear(combine(a_prev, x), self.W_o, self.b_o))
        a = gamma_o * tanh(c)
        return a, LSTMState(a, c)

    def step(self, x_projected: Tensor, state: LSTMState, W_recurrent: Tensor) -> LSTMState:
        a_prev, c_prev = state
        z_f, z_u, z_c, z_o = torch.addmm(x_projected, a_prev, W_recurrent.t()).chunk(4, dim=1)
        gamma_f = sigmoid(z_f)
        gamma_u = sigmoid(z_u)
        c_tilde = tanh(z_c)
        c = gamma_f * c_prev + gamma_u * c_tilde
        gamma_o = sigmoid(z_o)
        a = gamma_o * tanh(c)
        return LSTMState(a, c)


CELLS: dict[str, type[Cell]] = {"rnn": RNNCell, "gru": GRUCell, "lstm": LSTMCell}


def make_cell(name: str, input_size: int, hidden_size: int, *, relevance_gate: bool = True,
              gru_reset: str = "before", forget_bias: float | None = None) -> Cell:
    """The cell called `name` in a config (`model.cell`); each option reaches only the cell it is for."""
    if name not in CELLS:
        raise ValueError(f"cell must be one of {', '.join(CELLS)}; got {name!r}")
    if name == "gru":
        return GRUCell(input_size, hidden_size, relevance_gate=relevance_gate, gru_reset=gru_reset)
    if name == "lstm":
        return LSTMCell(input_size, hidden_size, forget_bias=forget_bias)
    return CELLS[name](input_size, hidden_size)
