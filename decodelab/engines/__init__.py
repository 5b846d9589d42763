"""Engines: what decodes a run's prompts. ``decodelab`` is our own decode loop (the default); the others serve
the same composition (model, drafter, strategy, task) through another engine, with its counters mapped onto
decodelab's metric definitions, so the engine is one config switch."""
