"""curate: per-token perplexity scoring and Selective Token Masking for LLM fine-tuning data."""

__version__ = "0.1.0"
