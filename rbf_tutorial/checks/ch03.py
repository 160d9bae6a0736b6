"""Checks for chapter 03, the fused kernel written live.

Each exercise in the chapter is a small PyTorch (or plain Python) function that mirrors one step of
the Triton kernel, so it can be tested on its own before the kernel relies on it:

- :func:`check_online_softmax_step` — fold one tile of scores into the running max, sum and output;
- :func:`check_rbf_logits_tile` — the key-norm subtraction, ``scale * (2 q.k - |k|^2)``;
- :func:`check_last_key_tile` — the causal loop bound: the last key tile a query tile must visit;
- :func:`check_dk_key_norm_term` — the extra term the key norms add to ``dk``.

Every check prints what it compared and raises ``AssertionError`` with a hint when it fails. The
expected values are computed independently of the formulas the learner is asked to write: from
a full softmax, from ``torch.cdist``, by brute force over the causal mask, and by autograd.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch

from .core import assert_close

__all__ = [
    "check_dk_key_norm_term",
    "check_last_key_tile",
    "check_online_softmax_step",
    "check_rbf_logits_tile",
]

LN_2 = math.log(2.0)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unpack_state(result, where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not (isinstance(result, tuple | list) and len(result) == 3):
        raise AssertionError(
            f"{where}: online_softmax_step must return a tuple (row_max, row_sum, acc), got "
            f"{type(result).__name__}."
        )
    return tuple(result)


def check_online_softmax_step(online_softmax_step: Callable) -> None:
    """Check ``online_softmax_step(row_max, row_sum, acc, scores_tile, v_tile)``.

    It returns the new ``(row_max, row_sum, acc)`` after folding in one tile of scores.

    Scores are in base-2 units (the kernel works with ``exp2``), so the full-softmax answer
    is ``softmax(scores * ln 2) @ v``. Three cases: one step from the empty state, checked
    entry by entry; a stream of tiles whose maxima rise and fall; and scores large enough
    that ``exp2`` overflows float32 unless the running max is subtracted first.
    """
    gen = _generator(3)
    rows, cols, dim_v = 5, 4, 3

    # 1. One step from the empty state: row_max = -inf, row_sum = 0, acc = 0.
    scores = torch.randn(rows, cols, generator=gen, dtype=torch.float64) * 3
    values = torch.randn(cols, dim_v, generator=gen, dtype=torch.float64)
    empty_max = torch.full((rows,), float("-inf"), dtype=torch.float64)
    empty_sum = torch.zeros(rows, dtype=torch.float64)
    empty_acc = torch.zeros(rows, dim_v, dtype=torch.float64)
    new_max, new_sum, new_acc = _unpack_state(
        online_softmax_step(empty_max, empty_sum, empty_acc, scores, values), "first step"
    )
    expected_max = scores.max(dim=1).values
    weights = torch.exp2(scores - expected_max[:, None])
    hint_first = ("From the empty state the new row_max is the tile's row max, the new row_sum is "
                  "sum(exp2(s - row_max)) and the new acc is exp2(s - row_max) @ v.")
    assert_close(new_max, expected_max, name="first step: row_max", hint=hint_first)
    assert_close(new_sum, weights.sum(dim=1), name="first step: row_sum", hint=hint_first)
    assert_close(new_acc, weights @ values, name="first step: acc", hint=hint_first)

    # 2. Streams of tiles whose maxima rise and fall, so the rescale matters: moderate scores in
    #    float64, then scores of several hundred in float32, where exp2 overflows (2^128 is the
    #    float32 limit) unless the running max is subtracted first.
    for name, spread, dtype in (
        ("stream", 4.0, torch.float64),
        ("large scores", 300.0, torch.float32),
    ):
        n_tiles = 4
        scores = torch.randn(rows, cols * n_tiles, generator=gen, dtype=torch.float64) * spread
        scores[:, cols:2 * cols] += spread  # the second tile raises the running max ...
        scores[:, 2 * cols:3 * cols] -= 2 * spread  # ... the third lies far below it
        values = torch.randn(cols * n_tiles, dim_v, generator=gen, dtype=torch.float64)
        row_max = torch.full((rows,), float("-inf"), dtype=dtype)
        row_sum = torch.zeros(rows, dtype=dtype)
        acc = torch.zeros(rows, dim_v, dtype=dtype)
        for tile in range(n_tiles):
            tile_cols = slice(tile * cols, (tile + 1) * cols)
            row_max, row_sum, acc = _unpack_state(
                online_softmax_step(row_max, row_sum, acc, scores[:, tile_cols].to(dtype),
                                    values[tile_cols].to(dtype)),
                name,
            )
        expected = torch.softmax(scores * LN_2, dim=1) @ values
        tolerance = dict(atol=1e-10, rtol=1e-8) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
        assert_close(
            acc / row_sum[:, None], expected, name=f"{name}: output", **tolerance,
            hint="Rescale the old row_sum and acc by alpha = exp2(old_max - new_max) before adding this "
                 "tile's contribution, and subtract new_max inside exp2 so nothing overflows.",
        )
        assert_close(row_max, scores.max(dim=1).values.to(dtype), name=f"{name}: row_max", **tolerance,
                     hint="row_max must end as the running maximum over every tile seen.")
    print("online_softmax_step: all checks passed.")


def check_rbf_logits_tile(rbf_logits_tile: Callable) -> None:
    """Check ``rbf_logits_tile(q_tile, k_tile, scale)`` returns ``scale * (2 q.k - |k|^2)`` in float32.

    The tile is not square (so a key norm summed over the wrong axis cannot broadcast its way
    through), inputs come in float32 and float16 (the result must be float32 either way, as the
    kernel's accumulator is), and the rows' softmax must equal that of ``-scale * |q - k|^2``.
    """
    gen = _generator(5)
    block_m, block_n, head_dim = 6, 8, 16
    hint = ("Expected scale * (2 * q_tile @ k_tile.T - |k_j|^2), with |k_j|^2 summed over the feature "
            "axis (one number per key), computed in float32.")
    for dtype, scale in ((torch.float32, 0.25), (torch.float16, 1 / math.sqrt(head_dim))):
        q_tile = torch.randn(block_m, head_dim, generator=gen).to(dtype)
        k_tile = (torch.randn(block_n, head_dim, generator=gen) * 1.5).to(dtype)
        logits = rbf_logits_tile(q_tile, k_tile, scale)
        if not isinstance(logits, torch.Tensor):
            raise AssertionError(f"rbf_logits_tile must return a tensor, got {type(logits).__name__}.")
        if logits.dtype != torch.float32:
            raise AssertionError(
                f"rbf_logits_tile returned {logits.dtype} for {dtype} inputs; the kernel accumulates in "
                "float32, so upcast the tiles (.float()) before multiplying."
            )
        q64, k64 = q_tile.double(), k_tile.double()
        distances = torch.cdist(q64, k64) ** 2
        # |q - k|^2 = |q|^2 - 2 q.k + |k|^2, so the expected logits are -scale |q - k|^2 + scale |q|^2.
        expected = -scale * distances + scale * q64.square().sum(dim=1, keepdim=True)
        tag = str(dtype).removeprefix("torch.")
        assert_close(logits, expected, name=f"logits, {tag}", atol=1e-4, rtol=1e-5, hint=hint)
        assert_close(
            torch.softmax(logits.double(), dim=1), torch.softmax(-scale * distances, dim=1),
            name=f"softmax rows, {tag}", atol=1e-6, rtol=1e-5, hint=hint,
        )
    print("rbf_logits_tile: all checks passed.")


def _last_key_tile_by_brute_force(query_tile_start: int, block_m: int, block_n: int, nq: int, nk: int) -> int:
    """Walk every (query, key) pair of the tile through the causal rule; no formula involved."""
    last = -1
    for query in range(query_tile_start, min(query_tile_start + block_m, nq)):
        for key in range(nk):
            if key <= query + nk - nq:
                last = max(last, key // block_n)
    return last


def _last_key_tile_cases() -> list[tuple[int, int, int, int, int]]:
    cases = []
    shapes = [(64, 64), (37, 37), (1, 1), (1, 40), (40, 1), (20, 52), (52, 20), (33, 17), (17, 33),
              (16, 16), (48, 16), (16, 48), (100, 3), (5, 70)]
    for nq, nk in shapes:
        for block_m, block_n in ((16, 16), (16, 32), (32, 16), (8, 64)):
            for query_tile_start in range(0, nq, block_m):
                cases.append((query_tile_start, block_m, block_n, nq, nk))
    return cases


def check_last_key_tile(last_key_tile: Callable) -> None:
    """Check ``last_key_tile(query_tile_start, block_m, block_n, nq, nk)`` on many shapes.

    The expected answer comes from brute force over the causal rule (query ``i`` sees key ``j``
    iff ``j <= i + nk - nq``); the cases include ``nq != nk``, odd lengths, a last query tile
    that sticks out past ``nq``, unequal block sizes, and query tiles that see no key (-1).
    """
    cases = _last_key_tile_cases()
    wrong = []
    for case in cases:
        expected = _last_key_tile_by_brute_force(*case)
        got = last_key_tile(*case)
        if not isinstance(got, numbers.Integral) or isinstance(got, bool):
            raise AssertionError(
                f"last_key_tile{case} returned {got!r} ({type(got).__name__}); return a Python int."
            )
        if int(got) != expected:
            wrong.append((case, expected, int(got)))
    exact = not wrong
    print(f"{'last_key_tile':<24} exact: {exact!s:<5}  cases: {len(cases)}  wrong: {len(wrong)}")
    if wrong:
        lines = "\n".join(
            f"  last_key_tile(query_tile_start={c[0]}, block_m={c[1]}, block_n={c[2]}, nq={c[3]}, "
            f"nk={c[4]}) = {got}, expected {expected}"
            for c, expected, got in wrong[:5]
        )
        raise AssertionError(
            f"{len(wrong)} of {len(cases)} cases are wrong, for example:\n{lines}\n"
            "The tile's last query is min(query_tile_start + block_m, nq) - 1; it sees keys up to "
            "last_query + nk - nq, but never past nk - 1. Return -1 when that is below 0, and mind "
            "that -1 // block_n is -1 in Python (in Triton it would be 0)."
        )
    print("last_key_tile: all checks passed.")


def check_dk_key_norm_term(dk_key_norm_term: Callable) -> None:
    """Check ``dk_key_norm_term(ds, k, scale)`` returns ``-2 scale (sum_i ds_ij) k_j``, shape of ``k``.

    The expected value is not the formula: it is autograd's gradient, with respect to ``k``, of the
    key-norm part of the logits, ``sum_ij ds_ij * (-scale |k_j|^2)``. ``ds`` has more rows than
    columns so a sum over the wrong axis fails loudly.
    """
    gen = _generator(7)
    hint = ("The logits contain -scale * |k_j|^2 for every query i; its derivative in k_j is "
            "-2 * scale * k_j, weighted by ds_ij and summed over the queries i (ds.sum(dim=0)).")
    for n_queries, n_keys, head_dim, scale in ((9, 5, 16, 0.25), (4, 12, 8, 1 / math.sqrt(8))):
        ds = torch.randn(n_queries, n_keys, generator=gen, dtype=torch.float64)
        k = torch.randn(n_keys, head_dim, generator=gen, dtype=torch.float64)
        k_leaf = k.clone().requires_grad_()
        key_norm_logits = -scale * k_leaf.square().sum(dim=1)[None, :].expand(n_queries, n_keys)
        (expected,) = torch.autograd.grad((ds * key_norm_logits).sum(), k_leaf)
        got = dk_key_norm_term(ds, k, scale)
        if not isinstance(got, torch.Tensor):
            raise AssertionError(f"dk_key_norm_term must return a tensor, got {type(got).__name__}.")
        assert_close(got, expected, name=f"dk term, ds {n_queries}x{n_keys}", atol=1e-10, rtol=1e-8,
                     hint=hint)
    print("dk_key_norm_term: all checks passed.")
