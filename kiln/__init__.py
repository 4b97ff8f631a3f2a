"""kiln: a continuous-batching LLM inference server."""

__version__ = "0.1.0"
