"""rbf-tutorial: attention that scores keys by distance, from first principles to fused kernels."""

from .runtime import configure_triton

# Must run before anything imports triton: it reads TRITON_INTERPRET at import time.
configure_triton()

__version__ = "0.1.0"
__all__ = ["BACKENDS", "rbf_attention", "__version__"]


def __getattr__(name: str):
    # The entry point is imported on first use (PEP 562): `import rbf_tutorial` then costs no torch
    # import, which keeps `rbf-tutorial --help` and the other light commands quick.
    if name in ("BACKENDS", "rbf_attention"):
        from . import attention

        return getattr(attention, name)
    raise AttributeError(f"module 'rbf_tutorial' has no attribute {name!r}")
