"""Text to token ids: tokenizers, splits, batches, the token cache for corpora larger than memory, and
the corpus downloads."""
