"""The training loop and what it needs: the optimizer, the run folder, several processes."""
