"""Self-contained checkpoints: weights, resolved config, tokenizer, optimizer state, progress, data
position and RNG states, all as CPU tensors and plain Python values.

Written atomically (a temporary file in the same folder, flushed and fsynced, then renamed over the
old one), so a crash mid-write leaves the previous checkpoint intact. Read only with
`torch.load(..., weights_only=True)`: a checkpoint cannot run code when loaded. Reading one checks the
CRC-32 of each of its parts and that its weights are finite, so damage is refused by name.
"""

from __future__ import annotations

import errno
import io
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmtrain.config import DEVICE_NAME, Config, from_dict, shown
from lmtrain.data.tokenizer import Tokenizer, file_kind
from lmtrain.errors import LmtrainError
from lmtrain.files import atomic_write
from lmtrain.model.language_model import LanguageModel, check_size
from lmtrain.speed.memory import available_bytes

FORMAT_VERSION = 2
# Format 1 named the right-to-left LM of `direction: bi` and the reversed layer of a bidirectional layer
# "backward", the word that also named the gradient algorithm: format 2 gives each its own name.
FORMAT_1_NAMES = ((".backward_layer.", ".right_to_left_layer."), (".forward_layer.", ".left_to_right_layer."))
FORMAT_1_PREFIXES = (("rnn_backward.", "rnn_right_to_left."),)
REQUIRED = ("format_version", "config", "tokenizer", "model")
ANOTHER = "use another checkpoint (best.pt, an earlier step-*.pt)"


def to_cpu(tree: Any) -> Any:
    """A copy of nested dicts/lists/tuples with every tensor detached on the CPU (named tuples
    become plain tuples, which the safe loader accepts)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {key: to_cpu(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [to_cpu(value) for value in tree]
    if isinstance(tree, tuple):
        return tuple(to_cpu(value) for value in tree)
    return tree



def checkpoint_bytes(payload: dict[str, Any]) -> bytes:
    """The serialized checkpoint: every tensor on the CPU, plus the format version."""
    buffer = io.BytesIO()
    torch.save(to_cpu({"format_version": FORMAT_VERSION, **payload}), buffer)
    return buffer.getvalue()


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    try:
        atomic_write(path, checkpoint_bytes(payload))
    except OSError as error:
        raise LmtrainError(f"could not write checkpoint {path}: {error.strerror or error}") from None


def load_checkpoint(path: str | Path, *, training: bool = False) -> dict[str, Any]:
    """The checkpoint's contents on the CPU; a clear error for anything that is not one of ours, or whose
    weights are not finite. `training`: it is to be resumed, so its training state is checked too."""
    path = _checkpoint_file(path)
    payload = _read(path)
    _check_contents(payload, path)
    if training:
        _check_training_state(payload, path)
    return migrated(payload)


def _checkpoint_file(path: str | Path) -> Path:
    """`path` as a Path, once it names a file that is there to read."""
    if not str(path):  # Path("") is the current folder
        raise LmtrainError("no checkpoint path given (an empty string)")
    path = Path(path)
    try:
        path.stat()
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise LmtrainError(f"{path}: a loop of symbolic links, not a checkpoint") from None
        if error.errno != errno.ENOENT:
            raise LmtrainError(f"cannot read checkpoint {path}: {error.strerror}") from None
        raise LmtrainError(f"checkpoint not found: {path}") from None
    if path.is_dir():
        advice = "a checkpoint is a file" if path.suffix == ".pt" else f"give the .pt file, e.g. {path}/best.pt"
        raise LmtrainError(f"checkpoint path is a directory: {path} ({advice})")
    if (kind := file_kind(path)) != "file":  # a device would be read forever, a pipe cannot be seeked in
        raise LmtrainError(f"{path} is a {kind}, not a checkpoint file: save it to a file and give that")
    return path


def _read(path: Path) -> Any:
    """What the file holds, read with torch's safe loader after its checksums are checked."""
    # torch.load does not check the archive's CRC-32s, so a flipped bit in the weights would load as other
    # weights; the file is read once more to check them (from the page cache, as torch.load reads it next).
    try:
        with zipfile.ZipFile(path) as archive:
            failed = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError):
        failed = None  # not a zip archive, or a broken one: torch.load below says which
    if failed is not None:
        raise LmtrainError(f"{path}: damaged: its part {failed} fails its checksum (the file changed after it was "
                           f"written); {ANOTHER}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch words it "Unsupported global: GLOBAL x" or, for modules it blocks outright (os, sys),
        # "Trying to load unsupported GLOBAL x whose module ... is blocked".
        found = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", str(error), re.IGNORECASE)
        if found is None:  # the safe loader also raises this for files that are no pickle at all
            raise LmtrainError(f"{path}: not a readable lmtrain checkpoint (truncated, corrupt, or another kind "
                               f"of file)") from None
        raise LmtrainError(f"{path}: refused to load: it holds Python objects ({found.group(1)}), not only "
                           f"tensors and plain data; lmtrain never unpickles code") from None
    except Exception:  # noqa: BLE001 - torch raises many types for a damaged file
        raise LmtrainError(f"{path}: not a readable lmtrain checkpoint (truncated, corrupt, or another kind "
                           f"of file)") from None
    return payload


def _check_contents(payload: Any, path: Path) -> None:
    """Refuse what lmtrain never writes: a missing part, another format version, a section of the wrong
    kind, progress that is no number, weights that are not finite floating-point numbers, a broken tokenizer."""
    if not isinstance(payload, dict) or any(key not in payload for key in REQUIRED):
        raise LmtrainError(f"{path}: not an lmtrain checkpoint")
    version = payload["format_version"]
    if not isinstance(version, (int, float)) or isinstance(version, bool) and version is not True:
        raise LmtrainError(f"{path}: not an lmtrain checkpoint (its format version {shown(version)} is not a "
                           f"number)")
    if version not in (1, FORMAT_VERSION):
        relation = "newer" if version > FORMAT_VERSION else "older"
        raise LmtrainError(f"{path}: checkpoint format {shown(version)} is {relation} than this lmtrain reads "
                           f"({FORMAT_VERSION}); use a matching lmtrain version")
    for key, kind in (("config", dict), ("tokenizer", dict), ("model", dict), ("progress", dict)):
        if key in payload and not isinstance(payload[key], kind):
            raise LmtrainError(f"{path}: not an lmtrain checkpoint (its {key} is a {type(payload[key]).__name__}, "
                               f"not a mapping)")
    if not all(isinstance(section, dict) for section in payload["config"].values()):
        raise LmtrainError(f"{path}: not an lmtrain checkpoint (its config sections are not mappings)")
    for key, value in payload.get("progress", {}).items():
        if key in PROGRESS and not _plain_number(value, whole=key in WHOLE_PROGRESS, optional=key == "best_valid_loss"):
            raise LmtrainError(f"{path}: not an lmtrain checkpoint (its progress.{key} is {shown(value)}, not a "
                               f"{'whole ' if key in WHOLE_PROGRESS else ''}number)")
    # Training writes floating-point, finite weights only (it stops before non-finite ones), so anything
    # else is damage, refused by name rather than cast, sampled into garbage or scored as a perplexity of NaN.
    for name, value in payload["model"].items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise LmtrainError(f"{path}: damaged: its weight {shown(name)} is {str(kind).removeprefix('torch.')}, "
                               f"not floating-point numbers; {ANOTHER}")
        if not bool(torch.isfinite(value).all()):
            raise LmtrainError(f"{path}: damaged: its weights are not finite (NaN or infinity in {shown(name)}); "
                               f"{ANOTHER}")
    try:
        Tokenizer.from_dict(payload["tokenizer"])
    except (LmtrainError, KeyError, TypeError) as error:
        reason = str(error) if isinstance(error, LmtrainError) else "its tokenizer is not what lmtrain writes"
        raise LmtrainError(f"{path}: damaged: {reason}; {ANOTHER}") from None



def _check_training_state(payload: dict[str, Any], path: Path) -> None:
    """What `--resume` reads besides the weights, in the shapes `training.resume.checkpoint_payload`
    writes: a damaged one is refused here, so that the run goes back to an older checkpoint."""
    def rng_state(value: Any) -> bool:
        return (isinstance(value, dict) and isinstance(value.get("torch"), torch.Tensor)
                and value["torch"].dtype == torch.uint8 and value["torch"].shape == torch.get_rng_state().shape
                and isinstance(value.get("cuda", []), list)
                and all(isinstance(state, torch.Tensor) for state in value.get("cuda", [])))

    def fingerprint(value: Any) -> bool:
        return (isinstance(value, dict) and isinstance(value.get("path"), str) and isinstance(value.get("sha256"), str)
                and _plain_number(value.get("size"), whole=True, optional=False))

    def stream_state(value: Any) -> bool:  # one LM's carried state: none, or each layer's tensors
        return value is None or isinstance(value, list) and all(
            isinstance(layer, (list, tuple)) and all(isinstance(part, torch.Tensor) for part in layer)
            for layer in value)

    checks = {
        "optimizer": lambda value: isinstance(value, dict) and isinstance(value.get("state"), dict)
        and isinstance(value.get("param_groups"), list),
        "rng": rng_state,
        "rng_by_rank": lambda value: isinstance(value, list) and all(map(rng_state, value)),
        "data_files": lambda value: isinstance(value, dict) and all(map(fingerprint, value.values())),
        "stream_states": lambda value: isinstance(value, list) and all(map(stream_state, value)),
    }
    for key, intact in checks.items():
        if key in payload and not intact(payload[key]):
            raise LmtrainError(f"{path}: damaged: its {key} is not what lmtrain writes there, so training cannot "
                               f"resume from it")
    missing = [key for key in ("progress", "optimizer", "rng", "stream_states") if key not in payload]
    if missing:
        raise LmtrainError(f"{path}: holds no {', '.join(missing)}, so training cannot resume from it")


def migrated(payload: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of an older format in today's: format 1's weight names renamed (its config's
    `model.backward` is read by `config.from_dict` as `model.gradients`)."""
    if payload["format_version"] == FORMAT_VERSION:
        return payload
    model = {}
    for key, value in payload["model"].items():
        for old, new in FORMAT_1_PREFIXES:
            key = new + key[len(old):] if key.startswith(old) else key
        for old, new in FORMAT_1_NAMES:
            key = key.replace(old, new)
        model[key] = value
    return {**payload, "model": model, "format_version": FORMAT_VERSION}


WHOLE_PROGRESS = ("step", "epoch", "batch_index", "tokens")
PROGRESS = (*WHOLE_PROGRESS, "best_valid_loss", "train_seconds", "elapsed_seconds")  # training.resume.Progress's fields


def _plain_number(value: Any, *, whole: bool, optional: bool) -> bool:
    if value is None:
        return optional
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return value >= 0 and (not whole or isinstance(value, int))


def model_from_checkpoint(payload: dict[str, Any], path: str | Path = "checkpoint"
                          ) -> tuple[LanguageModel, Tokenizer, Config]:
    """Rebuild the model (on the CPU, in eval mode), its tokenizer and config."""
    try:
        config = from_dict(payload["config"])
        tokenizer = Tokenizer.from_dict(payload["tokenizer"])
        check_size(config.model, tokenizer.vocab_size, bytes_per_parameter=4, available=available_bytes())
        model = LanguageModel.from_config(config.model, tokenizer.vocab_size)
        model.load_state_dict(payload["model"])
    except (LmtrainError, KeyError, TypeError, RuntimeError) as error:
        # torch's load_state_dict names each mismatched tensor on a line after its heading: keep them on one
        lines = [line.strip().rstrip(".") for line in str(error).strip().splitlines() if line.strip()]
        message = "; ".join(lines[1:] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines)
        message = message or type(error).__name__
        raise LmtrainError(f"{path}: checkpoint does not match its own model config: {message}") from None
    return model.eval(), tokenizer, config


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[LanguageModel, Tokenizer, Config]:
    """Load a checkpoint for sampling or evaluation: (model on `device`, tokenizer, config)."""
    model, tokenizer, config, _ = load_model_and_payload(path, device)
    return model, tokenizer, config


def load_model_and_payload(path: str | Path, device: torch.device | str = "cpu"
                           ) -> tuple[LanguageModel, Tokenizer, Config, dict[str, Any]]:
    """`load_model`, and the checkpoint's whole payload for what else it records (progress, data files)."""
    device = usable_device(device)
    payload = load_checkpoint(path)
    model, tokenizer, config = model_from_checkpoint(payload, path)
    return model.to(device), tokenizer, config, payload


def usable_device(device: torch.device | str, option: str = "device") -> torch.device:
    """`device` ("cpu", "cuda", "cuda:N"), refused in one line naming `option` (a command's `--device`, the
    config's `train.device`, a Python argument) where it is no device name or no such device is here."""
    name = str(device)
    if not re.fullmatch(DEVICE_NAME, name):
        raise LmtrainError(f"{option} must be cpu, cuda or cuda:N; got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        use = f"{option} cpu" if option.startswith("-") else f"{option}=cpu" if "." in option else f"{option}='cpu'"
        raise LmtrainError(f"{option} {name}: no CUDA device is available here (use {use})")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise LmtrainError(f"{option} {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device(name)


def resolve_device(name: str) -> torch.device:
    """`train.device`: `auto` is CUDA when present, else the CPU; a device named must be here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return usable_device(name, "train.device")


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def describe(path: str | Path) -> dict[str, Any]:
    """What `lmtrain info` shows: format, model size, vocabulary, progress and the config."""
    payload = load_checkpoint(path)
    model, tokenizer, config = model_from_checkpoint(payload, path)
    progress = payload.get("progress", {})
    epoch = progress.get("epoch")
    between_epochs = bool(epoch) and progress.get("batch_index") == 0  # a run stopped at an epoch's end
    return {"format_version": payload["format_version"], "cell": config.model.cell,
            "layers": config.model.num_layers, "hidden_size": config.model.hidden_size,
            "direction": config.model.direction, "parameters": parameter_count(model),
            "level": tokenizer.level, "vocab_size": tokenizer.vocab_size, "first_tokens": tokenizer.tokens[:12],
            "step": progress.get("step"), "epochs_completed": progress.get("epoch"),
            "epoch_in_progress": None if epoch is None or between_epochs else epoch + 1,
            "best_valid_loss": progress.get("best_valid_loss"), "train_seconds": progress.get("train_seconds"),
            "config": payload["config"]}
