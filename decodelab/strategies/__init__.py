"""Strategies (what is decoded), one module each; the registry finds them (decodelab/strategies/registry.py)."""
