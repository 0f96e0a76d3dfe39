"""`python -m lmtrain` runs the CLI."""

from lmtrain.cli import run

run()
