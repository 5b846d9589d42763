"""Triton kernels, each beside its torch reference and a test comparing the two (``tests/kernels/``).

- ``logits`` / ``logits_reference``: the fused sampling filters (temperature, top-k, top-p, min-p ->
  probabilities, and a draw) without a sort; the reference composes ``decodelab.decoding.logits``' filters.
- ``rejection`` / ``rejection_reference``: rejection samplers for chains and token trees, greedy and
  stochastic, with or without draft probabilities; the reference runs ``decodelab.decoding.verify``'s rules.
- ``common``: what the kernels share (block sizes, exact float ordering, the exponential race).
- ``provider``: ``backend.kernels`` (torch | triton): the provider the decoding core is handed
  (``decodelab.decoding.types.Kernels``), and the one-line refusals when Triton cannot run a config.

Random numbers are inputs (uniforms, Exp(1) noise) drawn by the caller from its generator in the order the
torch path draws them, so for the same seed a kernel emits the torch path's tokens. Only ``provider`` and
the references import without Triton. On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``,
set before Triton is imported): that checks correctness and says nothing about speed.
"""
