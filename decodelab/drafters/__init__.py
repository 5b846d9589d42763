"""Drafters (proposers), one module each; the registry finds them (decodelab/drafters/registry.py)."""
