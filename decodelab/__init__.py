"""decodelab: a declarative experiment platform for LLM decoding."""

__version__ = "0.1.0"
