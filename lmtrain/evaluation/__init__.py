"""What reads a checkpoint: perplexity, sampling, the agreement test, gradient diagnostics, plots,
and the weight mapping to and from torch.nn."""
