"""Several processes training one model: PyTorch's DistributedDataParallel (Li et al. 2020, "PyTorch
Distributed: Experiences on Accelerating Data Parallel Training"), gloo on the CPU, NCCL on CUDA.

    torchrun --nproc_per_node=N -m lmtrain train CONFIG        (or: lmtrain train CONFIG --nproc N)

torchrun starts N processes and tells each its place in environment variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Every process holds the whole model. `train.batch_size` is the
global batch: process r trains on rows [r B/N, (r+1) B/N) of it (`data.shard_rows`), and DDP averages
the gradients during the backward pass, so every process takes the same optimizer step and the weights
stay identical. Process 0 alone writes the run folder and prints.

What keeps N processes from waiting on each other forever: every collective call is made by all of
them at the same point of the program, so a decision that could come out differently in different
processes (stop on a signal, skip a non-finite step, write best.pt) is taken on values they all share,
and an error in one process is handed to all (`run_on_all`, `from_main`) before the next collective.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import io
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lmtrain.data.dataset import shard_rows
from lmtrain.errors import LmtrainError, error_line

T = TypeVar("T")

# A collective that some process never joins fails after this long instead of hanging. Every wait is
# short in a healthy run (evaluation is split between the processes; process 0 alone only writes).
TIMEOUT = timedelta(minutes=15)

# Whether a process group can be freed while a gloo thread waits for the GIL: torch 2.8 frees it without
# holding the GIL (pytorch/pytorch#154976); before, that deadlocks (pytorch/pytorch#56297). See `process_group`.
GROUP_ENDS_WITH_TRAINING = torch.__version__ >= "2.8"

# Before torch 2.8, the groups of the trainings this process ran, never freed: see `process_group`.
_GROUPS_KEPT_TO_THE_END: list[dist.ProcessGroup] = []


PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent ends
STARTED_BY_NPROC = "LMTRAIN_STARTED_BY_NPROC"  # set by `launch` for the processes it starts


@dataclass(frozen=True)
class World:
    rank: int = 0          # this process, 0 .. size - 1
    size: int = 1          # processes in all, on all machines
    local_rank: int = 0    # this process on its machine: its GPU is cuda:local_rank
    local_size: int = 1    # processes on this machine

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_environment(environment: Mapping[str, str] = os.environ) -> World:
    """This process's place, read from the variables torchrun sets; one process alone without them."""
    names = {"rank": "RANK", "size": "WORLD_SIZE", "local_rank": "LOCAL_RANK", "local_size": "LOCAL_WORLD_SIZE"}
    values = {}
    for field, name in names.items():
        if name in environment:
            try:
                values[field] = int(environment[name])
            except ValueError:
                raise LmtrainError(f"the environment variable {name} must be an integer; got "
                                   f"{environment[name]!r}") from None
    world = World(**values)
    if world.size < 1 or not 0 <= world.rank < world.size:
        raise LmtrainError(f"RANK {world.rank} and WORLD_SIZE {world.size} do not fit: RANK runs from 0 to "
                           f"WORLD_SIZE - 1")
    return world


def check_batch_size(batch_size: int, world: World) -> None:
    if batch_size % world.size:
        raise stop_everywhere(LmtrainError(f"train.batch_size {batch_size} is not divisible by the number of "
                                           f"processes ({world.size}): it is the global batch, split evenly between "
                                           f"them"), world)


def process_device(device: torch.device, world: World) -> torch.device:
    """The device of this process: the CPU as asked, or one GPU per process, cuda:LOCAL_RANK."""
    if device.type != "cuda" or not world.distributed:
        return device
    if device.index is not None:
        raise stop_everywhere(LmtrainError(f"train.device is {device} but each of the {world.size} processes takes "
                                           f"a GPU of its own (cuda:LOCAL_RANK): use cuda or auto"), world)
    if world.local_rank >= torch.cuda.device_count():
        raise LmtrainError(f"process {world.rank} needs cuda:{world.local_rank} but this machine has "
                           f"{torch.cuda.device_count()} GPU(s): start at most that many processes on it")
    return torch.device("cuda", world.local_rank)


@contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """Join the other processes for the duration (nothing to do for one process alone). Where
    `GROUP_ENDS_WITH_TRAINING` (torch 2.8 or later) the group ends with the block, its threads with it,
    once nothing made inside (a DDP model) holds it.

    Why its threads must end here: a gloo worker thread frees a finished collective's tensors after the
    collective has returned, and a tensor Python made needs the GIL to be freed. If the interpreter is
    already shutting down by then, the thread cannot have the GIL and the process aborts ("terminate called
    without an active exception"); a busy machine makes that wait long enough to happen. Before torch 2.8,
    freeing a group holds the GIL while it joins the threads, which deadlocks on the same thread
    (pytorch/pytorch#56297, fixed by #154976): the last barrier's work holds the collective before it, whose
    tensors Python made, and a gloo thread frees it just after the barrier returns. There the group is never
    freed: it is kept (with its idle threads) until the process ends, and a training process leaves
    without the interpreter's shutdown (`end_process`)."""
    if not world.distributed:
        yield
        return
    stop_with_launcher()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL works on the current device
    # DDP imports torch.distributed.nn, whose functions take the default group of the moment of that first
    # import as a default argument: imported after the group exists, they would keep it alive for good.
    if GROUP_ENDS_WITH_TRAINING:
        importlib.import_module("torch.distributed.nn")
    try:
        dist.init_process_group(backend, timeout=TIMEOUT)
    except (RuntimeError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LmtrainError(f"process {world.rank} of {world.size} could not join the others ({backend}, "
                           f"MASTER_ADDR {os.environ.get('MASTER_ADDR')}, MASTER_PORT "
                           f"{os.environ.get('MASTER_PORT')}): {reason}") from None
    try:
        yield
        dist.barrier()  # every process is done with the group before any leaves it
    except BaseException as error:
        traceback.clear_frames(error.__traceback__)  # the frames of a failed run would keep its DDP model
        raise
    finally:
        if not GROUP_ENDS_WITH_TRAINING:  # unregistered below, but not freed: freeing it can deadlock
            _GROUPS_KEPT_TO_THE_END.append(dist.group.WORLD)
        dist.destroy_process_group()
        if GROUP_ENDS_WITH_TRAINING:
            gc.collect()  # the model's reference cycles go now, and the group with them: its threads are joined


def stop_with_launcher() -> None:
    """In a process that `--nproc` started, have the system send it SIGTERM when the launcher ends, however
    it ends: killed with SIGKILL, it cannot stop its processes, which then trained on alone, holding the
    run folder. SIGTERM stops a run after its step with last.pt written, so `--resume` goes on. Linux only
    (prctl's PR_SET_PDEATHSIG). Processes started otherwise (torchrun, a script, a shell that exits after
    starting them) are left as they are: their parent's end need not be theirs."""
    if not sys.platform.startswith("linux") or os.environ.get(STARTED_BY_NPROC) != "1":
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the launcher ended before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def end_process(code: int) -> NoReturn:
    """Exit with `code`. A training process whose process group outlives training (torch before 2.8,
    `process_group`) skips the interpreter's shutdown: the group would be freed there, and a gloo thread
    still freeing a collective's tensor would abort or deadlock the process after the run was done and
    saved. Its output is flushed first; nothing else is left to do by then (checkpoints are written and
    closed inside `train()`)."""
    try:
        in_group = world_from_environment().distributed
    except LmtrainError:  # torchrun's variables were refused before any group was made
        in_group = False
    if in_group and not GROUP_ENDS_WITH_TRAINING:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)
    sys.exit(code)


def data_parallel(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """The model as training calls it: under DDP, parameters are broadcast from process 0 once, and
    gradients are averaged in buckets while the backward pass still runs. DDP needs nothing of the
    hand-written backward (`model.gradients: manual`): it hooks the parameters' gradient accumulation.
    Every parameter takes part in every step (both LMs of a `bi` model run each step, a tied weight is
    one parameter), so DDP need not search for unused ones (`find_unused_parameters`, a graph walk a step)."""
    if not world.distributed:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


# -- agreeing -------------------------------------------------------------------------------------------

def run_on_all(world: World, action: Callable[[], T]) -> T:
    """`action()` in every process. An LmtrainError in any of them is raised in all of them, so none goes
    on to wait for one that stopped; process 0 prints it, naming the process it came from."""
    try:
        result, message = action(), ""
    except LmtrainError as error:
        if not world.distributed or error.quiet:  # quiet: already shared by every process (`stop_everywhere`)
            raise
        result, message = None, str(error) or type(error).__name__
    if not world.distributed:
        return result
    for rank, text in enumerate(_all_gather_bytes(message.encode())):
        if text:
            raise stop_everywhere(LmtrainError(text.decode() if rank == 0 else f"process {rank}: {text.decode()}"),
                                  world)
    return result


def from_main(world: World, produce: Callable[[], T]) -> T:
    """`produce()` in process 0 alone; its result (tensors and plain values), or its LmtrainError, is handed
    to every process. For what only process 0 may read or decide: the checkpoint to resume (the machines
    need not share a disk), whether the run folder is free."""
    if not world.distributed:
        return produce()
    box: tuple[Any, str] = (None, "")
    if world.is_main:
        try:
            box = (produce(), "")
        except LmtrainError as error:
            box = (None, str(error) or type(error).__name__)
    result, message = _from_bytes(_broadcast_bytes(_to_bytes(box) if world.is_main else b""))
    if message:
        raise stop_everywhere(LmtrainError(message), world)
    return result


def stop_everywhere(error: LmtrainError, world: World) -> LmtrainError:
    """`error`, which every process raises alike, ready to raise. Process 0 prints its line here and the
    others wait for that at a barrier: the launcher stops every process once one has exited, so a line
    printed later, on process 0's way out, could be cut off. Returned quiet: nothing prints it again."""
    if not world.distributed:
        return error
    if not dist.is_initialized():  # no process group yet: each process stops on its own, process 0 prints
        error.quiet = not world.is_main
        return error
    if world.is_main:
        print(error_line(error), file=sys.stderr, flush=True)
    dist.barrier()
    error.quiet = True
    return error


def agree_on_step(world: World, loss_total: Tensor, seconds: float, stop_signal: int | None
                  ) -> tuple[Tensor, float, int | None]:
    """One small all-reduce a step gives every process the same three facts: the loss summed over all
    of them (non-finite if any one's is, so all skip a bad step together), the mean step time (what
    `max_seconds` limits, so all stop at the same step), and a stop signal if any process got one
    (SIGTERM before SIGINT)."""
    if not world.distributed:
        return loss_total, seconds, stop_signal
    flags = torch.tensor([seconds, stop_signal == signal.SIGINT, stop_signal == signal.SIGTERM],
                         dtype=torch.float64, device=loss_total.device)
    values = torch.cat([loss_total.detach().double().reshape(1), flags])
    dist.all_reduce(values)
    agreed = signal.SIGTERM if values[3] > 0 else signal.SIGINT if values[2] > 0 else None
    return values[0].to(loss_total.dtype), float(values[1]) / world.size, agreed


def sum_over_processes(world: World, values: Tensor) -> Tensor:
    if not world.distributed:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values


def gather_objects(world: World, value: T) -> list[T]:
    """Every process's `value` (tensors and plain values), in rank order."""
    if not world.distributed:
        return [value]
    return [_from_bytes(data) for data in _all_gather_bytes(_to_bytes(value))]


# Objects travel as torch.save bytes in uint8 tensors, read back with weights_only=True. (torch's own
# object collectives pickle through NumPy, which lmtrain does not need.)

def _to_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _collective_device() -> torch.device:
    """NCCL moves only CUDA tensors; gloo, CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _bytes_tensor(data: bytes, length: int, device: torch.device) -> Tensor:
    tensor = torch.zeros(length, dtype=torch.uint8)
    if data:
        tensor[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return tensor.to(device)


def _tensor_bytes(tensor: Tensor) -> bytes:
    store = bytearray(tensor.numel())
    if store:
        torch.frombuffer(store, dtype=torch.uint8).copy_(tensor)
    return bytes(store)


def _broadcast_bytes(data: bytes) -> bytes:
    """Process 0's `data`, in every process."""
    device = _collective_device()
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    buffer = _bytes_tensor(data, int(size), device)
    if int(size):
        dist.broadcast(buffer, src=0)
    return _tensor_bytes(buffer)


def _all_gather_bytes(data: bytes) -> list[bytes]:
    """Every process's `data`, in rank order (padded to the longest for the collective)."""
    device, count = _collective_device(), dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(count)]
    dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64, device=device))
    lengths = [int(size) for size in sizes]
    if max(lengths) == 0:  # the usual case of `run_on_all`: no error anywhere
        return [b""] * count
    parts = [torch.empty(max(lengths), dtype=torch.uint8, device=device) for _ in range(count)]
    dist.all_gather(parts, _bytes_tensor(data, max(lengths), device))
    return [_tensor_bytes(part[:length]) for part, length in zip(parts, lengths)]


# -- the carried state of stream mode ----------------------------------------------------------------------

def gather_rows(world: World, state: Any) -> Any:
    """The carried state of the global batch: every process's rows (B/N, H) concatenated in rank order
    into (B, H), as one process would hold it, so a checkpoint resumes under any number of processes."""
    if state is None or not world.distributed:
        return state

    def gather(tensor: Tensor) -> Tensor:
        parts = [torch.empty_like(tensor) for _ in range(world.size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    return map_tensors(state, gather)


def own_rows(world: World, state: Any) -> Any:
    """This process's rows of a global carried state (the inverse of `gather_rows`)."""
    if state is None or not world.distributed:
        return state
    return map_tensors(state, lambda tensor: tensor[shard_rows(tensor.size(0), rank=world.rank,
                                                               world_size=world.size)])


def map_tensors(tree: Any, function: Callable[[Tensor], Tensor]) -> Any:
    """`function` applied to every tensor of nested lists and tuples (a state: layers of tuples; a
    named tuple comes back a plain one, as the training loop's own detach makes it)."""
    if isinstance(tree, Tensor):
        return function(tree)
    if isinstance(tree, list):
        return [map_tensors(branch, function) for branch in tree]
    return tuple(map_tensors(branch, function) for branch in tree) if isinstance(tree, tuple) else tree


# -- `lmtrain train --nproc N` ------------------------------------------------------------------------------

def launch(nproc: int, arguments: list[str], *, batch_size: int, on_cpu: bool) -> int:
    """Start `nproc` training processes on this machine with torchrun's launcher (`--standalone`: a
    rendezvous on a free localhost port) running `python -m lmtrain train ARGUMENTS`, and return their
    exit code. The processes print for themselves (process 0 speaks for all). On the CPU (`on_cpu`),
    each process needs a core of its own: more processes than cores is refused."""
    if nproc < 1:
        raise LmtrainError(f"--nproc must be at least 1; got {nproc}")
    if world_from_environment().distributed:
        raise LmtrainError("--nproc starts processes of its own: under torchrun, leave it out")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if on_cpu and nproc > cores:
        raise LmtrainError(f"--nproc {nproc} is more processes than the {cores} cores this process may use: "
                           f"training on the CPU, each needs a core of its own (--nproc {cores} or fewer)")
    check_batch_size(batch_size, World(size=nproc))
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # An equal share of the cores for each process, as torchrun would otherwise set 1 with a warning.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))
    os.environ[STARTED_BY_NPROC] = "1"  # the processes end with this launcher (`stop_with_launcher`)
    # The launcher logs every signal and worker exit at length; the workers say for themselves why they
    # stopped. (Its loggers each have a level of their own, set when its modules load.)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("torch.distributed.elastic") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.CRITICAL)
    try:
        run(parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "lmtrain", "train", *arguments]))
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        if failure.exitcode < 0:
            raise LmtrainError(f"training process {rank} was killed by {signal.Signals(-failure.exitcode).name}"
                               ) from None
        return failure.exitcode
    except SignalException as error:
        return 128 + int(error.sigval)
    return 0

