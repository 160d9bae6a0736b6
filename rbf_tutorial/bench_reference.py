"""The float32 answers the benchmark judges every method's bf16 output against.

Exact (full-precision matmuls, no TF32), for every batch and head, and small enough to fit next to
the inputs at N = 16384: queries are taken a block at a time (:func:`chunked_reference`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from .reference import causal_visibility

__all__ = ["EXCLUSIVE_OF", "REFERENCES", "REFERENCE_CHUNK_BYTES", "chunked_reference",
           "dot_attention_fp32", "family_references", "rbf_attention_fp32"]

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]

#: Largest float32 score block one reference chunk materialises (the matmul route holds a few).
REFERENCE_CHUNK_BYTES = 2**30


def dot_attention_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Plain dot-product attention, materialised, bottom-right causal."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        visible = causal_visibility(q.shape[-2], k.shape[-2], device=q.device)
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def rbf_attention_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """RBF attention through the materialising ``matmul`` route."""
    from .backends import matmul_attention

    return matmul_attention(q, k, v, causal=causal)


#: family -> function computing that family's attention in the inputs' (float32) dtype.
REFERENCES: dict[str, AttentionFn] = {"rbf": rbf_attention_fp32, "dot": dot_attention_fp32}
#: families whose reference is another family's, then exclusive self attention (XSA needs each query's
#: own value, which a chunk of queries with a trimmed key range cannot index, so it runs afterwards).
EXCLUSIVE_OF: dict[str, str] = {"rbf-xsa": "rbf"}


@contextlib.contextmanager
def _full_float32_matmuls() -> Iterator[None]:
    # TF32 would leave the reference with ~1e-3 error of its own: as large as what it judges.
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        # PyTorch >= 2.9: the per-backend setting. Reading the legacy global one after anyone has
        # used this API raises, so the legacy calls below are only for older versions.
        previous, matmul.fp32_precision = matmul.fp32_precision, "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = previous
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def chunked_reference(
    attend: AttentionFn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
    *, max_chunk_bytes: int = REFERENCE_CHUNK_BYTES,
) -> torch.Tensor:
    """``attend`` on float32 copies of the inputs, a block of queries at a time; exact, all heads.

    At N = 16384 the full float32 score matrix of 64 heads is 68 GB, so queries are split into
    chunks whose ``(B, H, chunk, Nk)`` scores fit ``max_chunk_bytes``. Causal chunks keep the
    bottom-right alignment by taking keys only up to the chunk's last visible one: for queries
    ``[start, stop)`` that is ``stop + Nk - Nq`` keys, and then the chunk's own bottom-right
    rule (``j <= i + Nk' - Nq'``) is exactly the global one.
    """
    q, k, v = (x.detach().float() for x in (q, k, v))
    batch, heads, n_queries, _ = q.shape
    n_keys = k.shape[-2]
    rows = max(1, max_chunk_bytes // (batch * heads * n_keys * 4))
    out = q.new_empty((batch, heads, n_queries, v.shape[-1]))
    with torch.no_grad(), _full_float32_matmuls():
        for start in range(0, n_queries, rows):
            stop = min(n_queries, start + rows)
            seen = stop + n_keys - n_queries if causal else n_keys
            out[:, :, start:stop] = attend(q[:, :, start:stop], k[:, :, :seen], v[:, :, :seen], causal)
    return out


def family_references(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, families: set[str],
    *, log: Callable[[str], None] = print,
) -> dict[str, torch.Tensor]:
    """family -> float32 output for these inputs; a family whose reference fails is left out (logged)."""
    references = {}
    for family in sorted({EXCLUSIVE_OF.get(family, family) for family in families}):
        try:
            references[family] = chunked_reference(REFERENCES[family], q, k, v, causal)
        except Exception as error:  # the timings are still worth having
            log(f"{family} reference failed, no errors reported: {type(error).__name__}: {error}"[:300])
    for family in families & EXCLUSIVE_OF.keys():
        base = references.get(EXCLUSIVE_OF[family])
        if base is not None:
            from .xsa import exclusive, own_values

            references[family] = exclusive(base, own_values(v.detach().float(), base.shape[-2]))
    return references
