"""The one exception type a user sees: its message is a single line that names the problem."""

import errno


class LmtrainError(Exception):
    """A mistake in the user's input (config, files, options); the CLI prints it as one line."""

    # True on the copies of one error that the other processes of a distributed training raise
    # (`lmtrain.training.distributed`): process 0 prints it, they exit without a word.
    quiet: bool = False


def error_line(error: LmtrainError) -> str:
    """The one line a user sees for `error`: "error: ..." (an interrupted training, which carries its exit
    code, says what happened without the word)."""
    return str(error) if getattr(error, "exit_code", None) is not None else f"error: {error}"


def os_reason(error: OSError) -> str:
    """A short reason for a failed file operation, e.g. "the disk is full"."""
    if error.errno == errno.ENOSPC:
        return "the disk is full"
    return error.strerror or str(error)
