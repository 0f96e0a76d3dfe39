"""Weights to and from `torch.nn.RNN`, `GRU` and `LSTM` (batch_first=True), so a model trained with
either runs in the other with the same outputs. The only lmtrain module that names torch's recurrent
modules; docs/interop.md has the mapping as a table.

torch keeps two weights per layer, `weight_ih` (G*H, E) and `weight_hh` (G*H, H), their rows in blocks of
H, one block per gate, and two biases. Our cells keep one `W_gate` (H, H + E) per gate acting on
`[a(t-1), x(t)]`, so `W_gate = sign * [W_h(gate), W_i(gate)]` and `b_gate = sign * (b_i(gate) + b_h(gate))`:

    torch         rows of weight_ih / weight_hh       ours
    RNN (tanh)    (h)                                 (a)
    GRU           (r, z, n)                           (r, u = 1 - z, c)    reset "after" only
    LSTM          (i, f, g, o)                        (u, f, c, o)

The GRU's sign: torch's z keeps the old memory, h' = (1 - z) n + z h, our Γ_u lets the candidate in,
c' = Γ_u c̃ + (1 - Γ_u) c, so Γ_u = 1 - z = σ(-(...)). Its candidate keeps torch's two biases apart:
b_c = b_in, and b_cc = b_hn stays inside Γ_r * (W_cc c + b_cc).

A state in torch's layout is h_n (num_layers * num_directions, B, H), or (h_n, c_n) for the LSTM, row
`l * num_directions + d` for layer l and direction d (0 left to right, 1 right to left).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmtrain.model.cells import Cell, GRUCell, LSTMCell, RNNCell
from lmtrain.model.layers import BidirectionalLayer, RecurrentStack

TorchRecurrent = nn.RNN | nn.GRU | nn.LSTM
TorchState = Tensor | tuple[Tensor, Tensor]

TORCH_MODULES: dict[str, type[nn.Module]] = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}
TORCH_MODES = {"RNN_TANH": "rnn", "GRU": "gru", "LSTM": "lstm"}  # torch's `mode` attribute -> our cell name
# torch's gate blocks, in the order of their rows: (our gate, sign).
GATES: dict[str, tuple[tuple[str, int], ...]] = {
    "rnn": (("a", 1),),
    "gru": (("r", 1), ("u", -1), ("c", 1)),
    "lstm": (("u", 1), ("f", 1), ("c", 1), ("o", 1)),
}


class TorchLayout(nn.Module):
    """A `RecurrentStack` (`.stack`) called the way torch's recurrent modules are: `forward(x, state)`
    with x (B, T, E) takes an optional initial state in torch's layout (h0, or (h0, c0) for the LSTM)
    and returns `(output, state)` with output (B, T, H or 2H) and the final state in torch's layout."""

    def __init__(self, stack: RecurrentStack) -> None:
        super().__init__()
        self.stack = stack

    def forward(self, x: Tensor, state: TorchState | None = None) -> tuple[Tensor, TorchState]:
        stack_state = None if state is None else state_from_torch(state, self.stack)
        output, stack_state = self.stack(x, stack_state)                    # (B, T, H or 2H)
        return output, state_to_torch(stack_state)


def layer_cells(stack: RecurrentStack) -> list[Cell]:
    """Every cell of the stack in torch's order: layer by layer, left to right before right to left."""
    return [cell for layer in stack.layers
            for cell in ((layer.left_to_right_layer.cell, layer.right_to_left_layer.cell)
                         if isinstance(layer, BidirectionalLayer)
                         else (layer.cell,))]


def torch_suffixes(num_layers: int, bidirectional: bool) -> list[str]:
    """torch's parameter suffixes in the same order: `l0`, `l0_reverse`, `l1`, ..."""
    directions = ("", "_reverse") if bidirectional else ("",)
    return [f"l{layer}{suffix}" for layer in range(num_layers) for suffix in directions]


def cell_parameters_from_torch(name: str, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor,
                               bias_hh: Tensor) -> dict[str, Tensor]:
    """Our cell's parameters (`W_*`, `b_*`, and the GRU's `b_cc`) from one direction of one torch layer.
    Plain tensor arithmetic, so gradients flow through it."""
    gates = GATES[name]
    blocks = zip(gates, *(t.chunk(len(gates)) for t in (weight_ih, weight_hh, bias_ih, bias_hh)))
    parameters = {}
    for (gate, sign), W_i, W_h, b_i, b_h in blocks:
        parameters[f"W_{gate}"] = sign * torch.cat([W_h, W_i], dim=1)      # [recurrent half, input half]
        if name == "gru" and gate == "c":
            parameters["b_c"], parameters["b_cc"] = b_i, b_h               # tanh(W_cx x + b_c + Γ_r * (W_cc c + b_cc))
        else:
            parameters[f"b_{gate}"] = sign * (b_i + b_h)
    return parameters


def cell_parameters_to_torch(name: str, cell: Cell) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`(weight_ih, weight_hh, bias_ih, bias_hh)` for torch from one of our cells; torch's bias_hh is zero
    except the GRU's candidate block, which is our b_cc."""
    H = cell.hidden_size
    weight_ih, weight_hh, bias_ih, bias_hh = [], [], [], []
    for gate, sign in GATES[name]:
        W, b = sign * getattr(cell, f"W_{gate}"), sign * getattr(cell, f"b_{gate}")
        weight_hh.append(W[:, :H])
        weight_ih.append(W[:, H:])
        bias_ih.append(b)
        bias_hh.append(cell.b_cc if name == "gru" and gate == "c" else torch.zeros_like(b))
    return tuple(torch.cat(blocks) for blocks in (weight_ih, weight_hh, bias_ih, bias_hh))


def torch_name(cell: Cell) -> str:
    """The name of the torch module equivalent to `cell` ("rnn", "gru", "lstm"); ValueError if none is."""
    if isinstance(cell, GRUCell) and not cell.relevance_gate:
        raise ValueError("a simplified GRU (relevance_gate: false) has no torch.nn.GRU equivalent: torch's GRU "
                         "always has the reset gate r")
    if isinstance(cell, GRUCell) and cell.gru_reset != "after":
        raise ValueError("a GRU with reset 'before' (the lecture's: c̃ = tanh(W_c [Γ_r * c(t-1), x] + b_c)) has no "
                         "torch.nn.GRU equivalent: torch applies its reset gate after the product, "
                         "n = tanh(W_in x + b_in + r * (W_hn h + b_hn)); train with model.gru_reset: after")
    for name, cell_type in (("rnn", RNNCell), ("gru", GRUCell), ("lstm", LSTMCell)):
        if isinstance(cell, cell_type):
            return name
    raise ValueError(f"no torch.nn equivalent for {type(cell).__name__}")


def checked_torch_name(module: nn.Module) -> str:
    """Our cell name for a torch recurrent module, or an error saying why it cannot be imported."""
    if not isinstance(module, (nn.RNN, nn.GRU, nn.LSTM)):
        raise TypeError(f"from_torch takes a torch.nn.RNN, GRU or LSTM; got {type(module).__name__}")
    if module.mode == "RNN_RELU":
        raise ValueError("nn.RNN(nonlinearity='relu') has no lmtrain equivalent: the lecture's RNN cell is "
                         "a(t) = tanh(W_a [a(t-1), x(t)] + b_a); use nonlinearity='tanh'")
    if not module.batch_first:
        raise ValueError("from_torch needs batch_first=True: lmtrain is batch-first, (B, T, E)")
    if getattr(module, "proj_size", 0) > 0:
        raise ValueError(f"an LSTM with proj_size={module.proj_size} has no lmtrain equivalent: "
                         "LSTMCell has no output projection; use proj_size=0")
    return TORCH_MODES[module.mode]


def from_torch(module: TorchRecurrent) -> TorchLayout:
    """An lmtrain stack with `module`'s weights (copied; same dtype and device), its dropout and its
    training mode, wrapped to take and return states in torch's layout: `from_torch(m)(x)` equals `m(x)`."""
    name = checked_torch_name(module)
    options = {"gru_reset": "after"} if name == "gru" else {}
    stack = RecurrentStack(name, module.input_size, module.hidden_size, num_layers=module.num_layers,
                           dropout=module.dropout, bidirectional=module.bidirectional, **options)
    reference = module.weight_ih_l0
    stack.to(device=reference.device, dtype=reference.dtype)
    with torch.no_grad():
        for cell, suffix in zip(layer_cells(stack), torch_suffixes(module.num_layers, module.bidirectional),
                                strict=True):
            weight_ih, weight_hh = getattr(module, f"weight_ih_{suffix}"), getattr(module, f"weight_hh_{suffix}")
            if module.bias:
                bias_ih, bias_hh = getattr(module, f"bias_ih_{suffix}"), getattr(module, f"bias_hh_{suffix}")
            else:  # torch's bias=False: our biases are zeros
                bias_ih = bias_hh = weight_ih.new_zeros(weight_ih.size(0))
            for parameter, value in cell_parameters_from_torch(name, weight_ih, weight_hh, bias_ih, bias_hh).items():
                getattr(cell, parameter).copy_(value)
    return TorchLayout(stack).train(module.training)


def to_torch(module: TorchLayout | RecurrentStack) -> TorchRecurrent:
    """The `torch.nn.RNN`, `GRU` or `LSTM` (batch_first=True, bias=True) equal to an lmtrain stack, bare
    or wrapped: same weights, dtype, device, dropout and training mode. ValueError for a cell torch lacks
    (the lecture's GRU with reset "before", the simplified GRU), and for locked dropout or weight drop."""
    stack = module.stack if isinstance(module, TorchLayout) else module
    if stack.dropout.locked or stack.weight_drop > 0:
        raise ValueError("torch's recurrent modules have neither locked (variational) dropout nor weight drop; "
                         "build the stack without them to convert it")
    cells = layer_cells(stack)
    name = torch_name(cells[0])
    bidirectional = isinstance(stack.layers[0], BidirectionalLayer)
    reference = cells[0].W_a if name == "rnn" else cells[0].W_c
    result = TORCH_MODULES[name](cells[0].input_size, cells[0].hidden_size, num_layers=len(stack.layers),
                                 bias=True, batch_first=True, dropout=stack.dropout.p, bidirectional=bidirectional,
                                 device=reference.device, dtype=reference.dtype)
    with torch.no_grad():
        for cell, suffix in zip(cells, torch_suffixes(len(stack.layers), bidirectional), strict=True):
            for kind, value in zip(("weight_ih", "weight_hh", "bias_ih", "bias_hh"),
                                   cell_parameters_to_torch(name, cell)):
                getattr(result, f"{kind}_{suffix}").copy_(value)
    return result.train(module.training)


def state_to_torch(state: list) -> TorchState:
    """A stack's state (one entry per layer: a cell state, or a (left to right, right to left) pair) in torch's
    layout: h_n (num_layers * num_directions, B, H), or (h_n, c_n) for the LSTM."""
    cell_states = [cell_state for entry in state
                   for cell_state in ((entry,) if isinstance(entry[0], Tensor) else entry)]
    fields = tuple(torch.stack(field) for field in zip(*cell_states))  # a(t) (the GRU's c(t)) -> h; the LSTM's c -> c
    return fields[0] if len(fields) == 1 else fields


def state_from_torch(state: TorchState, stack: RecurrentStack) -> list:
    """A state in torch's layout (h0, or (h0, c0) for the LSTM) as `stack`'s: one entry per layer, a
    (left to right, right to left) pair for a bidirectional layer."""
    cells = layer_cells(stack)
    fields = (state,) if isinstance(state, Tensor) else tuple(state)
    state_type, H = cells[0].state_type, cells[0].hidden_size
    if len(fields) != len(state_type._fields):
        expected = "(h0, c0)" if len(state_type._fields) == 2 else "h0 (a tensor)"
        raise ValueError(f"a {type(cells[0]).__name__} stack takes the state {expected}; got {len(fields)} tensor(s)")
    for field in fields:
        if field.dim() != 3 or field.size(0) != len(cells) or field.size(2) != H:
            raise ValueError(f"a state in torch's layout is (num_layers * num_directions, B, H) = "
                             f"({len(cells)}, B, {H}); got {tuple(field.shape)}")
    cell_states = [state_type(*(field[index] for field in fields)) for index in range(len(cells))]
    if isinstance(stack.layers[0], BidirectionalLayer):
        return [(cell_states[index], cell_states[index + 1]) for index in range(0, len(cells), 2)]
    return cell_states
