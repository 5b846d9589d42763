"""Kernels, each beside its torch reference and a test comparing the two (``tests/kernels/``).

- ``linear`` (``linear.cpp``) / ``linear_reference``: the few-row CPU matmul of ``backend.linear=gemv`` (C++, built
  with the machine's compiler on first use); ``linear.py`` imports only torch, and the decoding core calls it.
- ``logits`` / ``logits_reference``: the fused sampling filters (temperature, top-k, top-p, min-p ->
  probabilities, and a draw) without a sort; the reference composes ``decodelab.decoding.logits``' filters.
- ``rejection`` / ``rejection_reference``: rejection samplers for chains and token trees, greedy and
  stochastic, with or without draft probabilities; the reference runs ``decodelab.decoding.verify``'s rules.
- ``common``: what the kernels share (block sizes, exact float ordering, the exponential race).
- ``provider``: ``backend.kernels`` (torch | triton): the provider the decoding core is handed
  (``decodelab.decoding.types.Kernels``), and the one-line refusals when Triton cannot run a config.

The others are Triton kernels. Their random numbers are inputs (uniforms, Exp(1) noise) drawn by the caller from
its generator in the order the torch path draws them, so for the same seed a kernel emits the torch path's tokens.
Only ``linear``, ``provider`` and the references import without Triton. On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``,
set before Triton is imported): that checks correctness and says nothing about speed.
"""


if __name__ == "kernels":
    # Imported under the bare name, which is not ours: the repository root is on sys.path (pytest, `python -m`
    # from the root, a notebook there), and ``kernels`` is Hugging Face's package, which transformers >= 5.25
    # requires and imports when it is imported. Hand the name over to the installed package, so that this folder
    # never shadows it; without one installed, the name stays this docstring-only module.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [entry for entry in sys.path if os.path.realpath(entry or os.getcwd()) != _root])
    if _spec is not None and _spec.loader is not None:
        sys.modules["kernels"] = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(sys.modules["kernels"])
