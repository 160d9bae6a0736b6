"""Fused Triton kernels for RBF attention, imported as ``rbf_tutorial.kernels``.

``rbf_flash_attention`` is the public entry point (also the ``"triton"`` backend of
``rbf_tutorial.rbf_attention``); ``flash_forward`` and ``flash_backward`` are the raw launches,
without autograd, for the chapters and the benchmark.
"""

from .launch import MAX_HEAD_DIM, flash_backward, flash_forward
from .op import rbf_flash_attention

__all__ = ["MAX_HEAD_DIM", "flash_backward", "flash_forward", "rbf_flash_attention"]
