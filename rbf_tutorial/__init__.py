"""rbf-tutorial: attention that scores keys by distance, from first principles to fused kernels."""

from .runtime import configure_triton

# Must run before anything imports triton: it reads TRITON_INTERPRET at import time.
configure_triton()

from .attention import BACKENDS, rbf_attention  # noqa: E402

__version__ = "0.1.0"
__all__ = ["BACKENDS", "rbf_attention", "__version__"]
