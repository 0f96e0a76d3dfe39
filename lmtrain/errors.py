"""The one exception type a user sees: its message is a single line that names the problem."""


class LmtrainError(Exception):
    """A mistake in the user's input (config, files, options); the CLI prints it as one line."""
