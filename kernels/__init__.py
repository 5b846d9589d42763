"""Triton kernels, each beside a plain torch reference and a test comparing the two.

Selected by ``backend.kernels`` (torch | triton). No kernel is here yet: the torch path in
``decodelab`` is the reference every future kernel is tested against.
"""
