"""Which code runs a layer: decided once, here, when its forward starts, and kept for its backward.

A `Route` says three things: whether the compiled kernels run (`loops`), whether oneDNN may make the
matrix products (`onednn`), and the dtype the products take their factors in (`product_dtype`). The
hand-written Functions (lmtrain/backprop/, the output layer) take it as their first argument, keep it
in their autograd context and run their backward on it, so a forward and its backward always take
the same route, whatever changes between the two.

The inputs to the decision are the user's, read where they live, never a switch of lmtrain's own:
- mixed precision is torch's: inside `torch.autocast(device, dtype=torch.bfloat16)` the products take
  bfloat16 factors summed in float32 (`train.precision: bfloat16` opens that block around the forward).
  torch.amp's `custom_fwd`/`custom_bwd` do not fit: with `cast_inputs` they forget that the forward ran
  under autocast, and without it the forward's own elementwise arithmetic would be autocast too;
- oneDNN follows torch's own switch, `torch.backends.mkldnn.enabled`; it makes the float32 products
  except on an x86 CPU with AVX2 and no AVX-512, where MKL's addmm is the faster (`ONEDNN_FLOAT32`);
  it makes bfloat16 products only on a CPU where it has them
  (`torch_internals.ONEDNN_BFLOAT16`; torch's addmm makes them elsewhere);
- the compiled kernels run unless `LMTRAIN_COMPILED=0` (or they cannot be built: `kernels.load`;
  under `LMTRAIN_COMPILED=1` that stops the run, `kernels.load_for_a_run`).
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from types import ModuleType

import torch

from lmtrain.speed import kernels
from lmtrain.speed.torch_internals import ONEDNN_BFLOAT16, ONEDNN_LINEAR, cpu_capability

# Packing W for oneDNN costs a few products' worth of time: for fewer uses than this, as when sampling
# feeds one token at a time, W is used as it is.
PACK_FROM = 4


def onednn_for_float32(capability: str) -> bool:
    """Whether oneDNN makes the float32 products on a CPU of torch's `capability`. On an x86 CPU with AVX2
    and no AVX-512 MKL's addmm is the faster; with AVX-512 oneDNN matches MKL (Intel Xeon) or beats it
    (AMD Zen 5, where MKL runs its AVX2 code) (docs/benchmarks.md, "oneDNN or MKL on this CPU"). Other
    CPUs keep oneDNN: not measured."""
    return capability != "AVX2"


ONEDNN_FLOAT32 = onednn_for_float32(cpu_capability())  # this CPU's, decided once as lmtrain loads


@dataclass(frozen=True)
class Route:
    """How one call runs; `PYTHON` is the plain route (Python loops, torch's addmm, the factors' dtype)."""

    loops: ModuleType | None = None            # the compiled kernels, or None: the Python loops and torch
    onednn: bool = False                       # oneDNN may make the products (else torch's addmm)
    product_dtype: torch.dtype | None = None   # the products' factors (bfloat16: mixed precision); None: as given

    @property
    def mixed(self) -> bool:
        """Whether the products round their factors to `product_dtype` (and return float32)."""
        return self.product_dtype is not None

    def time_loops(self, steps: int) -> ModuleType | None:
        """The compiled time loops, if this route has them and they run a sequence of `steps`: at least
        PACK_FROM (they pack W first, which a single step, as when sampling, would not repay). None: the
        Python loops."""
        return self.loops if steps >= PACK_FROM else None

    def bfloat16_loops(self, hidden_size: int) -> bool:
        """Whether the compiled loops make their per-step products in bfloat16: with bfloat16 products, where
        nothing stands in the way (`kernels.bfloat16_obstacle`: AVX-512 BF16, an even `hidden_size`).
        Elsewhere they make them in float32, faster than the Python loops' bfloat16 calls, and only the
        products over all time steps take bfloat16 factors."""
        return (self.loops is not None and self.product_dtype == torch.bfloat16
                and kernels.bfloat16_obstacle(self.loops, hidden_size) is None)

    def low_copy(self, like: torch.Tensor, hidden_size: int) -> torch.Tensor | None:
        """A bfloat16 buffer shaped like `like` for the compiled loops to round a product's factor into as
        they make it (then also a factor of the weight gradients), or None where their per-step products
        are float32 (`bfloat16_loops`)."""
        return torch.empty_like(like, dtype=torch.bfloat16) if self.bfloat16_loops(hidden_size) else None

    def lowered(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` as a factor of a product: rounded to the product dtype when mixed and float32."""
        return tensor.to(self.product_dtype) if self.mixed and tensor.dtype == torch.float32 else tensor


PYTHON = Route()


def choose(tensor: torch.Tensor, *, compiled: bool = True) -> Route:
    """The route for a call whose input is `tensor`: the fastest that computes the same numbers here.
    `compiled=False` keeps to the Python loops (for the tests and benchmarks that compare the two)."""
    device = tensor.device.type
    product_dtype = None
    if tensor.dtype == torch.float32 and _autocast_enabled(device):
        product_dtype = torch.get_autocast_dtype(device)
    bfloat16 = torch.bfloat16 in (tensor.dtype, product_dtype)
    onednn = (ONEDNN_LINEAR is not None and torch.backends.mkldnn.enabled and device == "cpu"
              and tensor.dtype in (torch.float32, torch.bfloat16)
              and (ONEDNN_BFLOAT16 if bfloat16 else ONEDNN_FLOAT32))
    loops = None
    if compiled and device == "cpu" and tensor.dtype == torch.float32 and kernels.switch() != "0":
        loops = kernels.load_for_a_run()
    return Route(loops=loops, onednn=onednn, product_dtype=product_dtype)


def _autocast_enabled(device: str) -> bool:
    return device in ("cpu", "cuda") and torch.is_autocast_enabled(device)


def runs_on_its_route(function: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """Class decorator for an autograd Function whose forward takes a Route first: the route is kept in
    the context for the backward (which returns no gradient for it), and both run with autocast off, the
    route having already said what precision the products take."""
    forward, backward = function.forward, function.backward

    @functools.wraps(forward)
    def forward_on_route(ctx, route: Route, *arguments):
        ctx.route = route
        with _autocast_off():
            return forward(ctx, route, *arguments)

    @functools.wraps(backward)
    def backward_on_route(ctx, *gradients):
        with _autocast_off():
            return (None, *_as_tuple(backward(ctx, *gradients)))

    function.forward, function.backward = staticmethod(forward_on_route), staticmethod(backward_on_route)
    return function


def _as_tuple(gradients) -> tuple:
    return gradients if isinstance(gradients, tuple) else (gradients,)


def _autocast_off() -> AbstractContextManager:
    """Autocast off on every device it is on; nothing to enter when it is off (the float32 case, every
    call: a context manager per call costs more than the check)."""
    devices = [device for device in ("cpu", "cuda") if _autocast_enabled(device)]
    if not devices:
        return nullcontext()
    stack = ExitStack()
    for device in devices:
        stack.enter_context(torch.autocast(device, enabled=False))
    return stack
