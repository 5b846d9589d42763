"""The decoding core: torch and transformers only, nothing of the experiment around it."""
