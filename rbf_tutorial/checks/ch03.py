"""Checks for chapter 03: the Triton exercises of 03a (forward) and 03b (backward).

Every check launches the learner's ``@triton.jit`` code (through Triton's interpreter on a CPU,
compiled on a GPU) on random inputs of awkward shapes (ragged tiles, Nq != Nk, causal), compares
with float64, prints one line on success and, on failure, names the likely mistake. A piece of the
forward kernel is checked inside the otherwise finished teaching kernel of
:mod:`rbf_tutorial.teaching`, so each exercise is graded on its own.

03a, the forward pass:

- :func:`check_rbf_scores`: exercise 1, the key norms subtracted in SRAM;
- :func:`check_online_softmax_update`: exercise 2, the online-softmax rescale;
- :func:`check_key_range`: exercise 3, the causal loop bounds.

03b, the backward pass:

- :func:`check_dkdv_kernel`: exercise 1, dK with its key-norm term;
- :func:`check_dq_kernel`: exercise 2, the dQ loop body.

How a mistake is named: each check first runs small probe cases that isolate one property (one
key tile against many, causal against not, whole tiles against ragged ones), then compares the
learner's numbers with the float64 value of the usual wrong formulas.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..device import DEVICE, SMALL
from ..reference import causal_visibility, rbf_attention_reference
from .core import compare
from .stubs import not_written_yet

__all__ = [
    "check_dkdv_kernel",
    "check_dq_kernel",
    "check_key_range",
    "check_online_softmax_update",
    "check_rbf_scores",
]

LOG2_E = math.log2(math.e)

EXERCISE_SCORES = "exercise 1 (the key norms in `rbf_scores`)"
EXERCISE_UPDATE = "exercise 2 (the rescale in `online_softmax_update`)"
EXERCISE_KEY_RANGE = "exercise 3 (the causal bounds in `key_range`)"
EXERCISE_DKDV = "exercise 1 of 03b (dK with its key-norm term in `rbf_dkdv_kernel`)"
EXERCISE_DQ = "exercise 2 of 03b (the dQ loop body in `rbf_dq_kernel`)"

# Sizes: tiny under the interpreter, real compiled. Inputs are fp32 on a CPU (the interpreter's
# half-precision tl.dot is unreliable) and fp16 on a GPU, where tl.dot of fp32 would use TF32.
DTYPE = torch.float32 if SMALL else torch.float16
HEAD_DIM = 16 if SMALL else 64
BLOCK_M = 16 if SMALL else 64
BLOCK_N = 32  # unlike HEAD_DIM and BLOCK_M, so a sum over the wrong axis cannot broadcast silently
OUT_TOL = dict(atol=2e-5, rtol=2e-5) if SMALL else dict(atol=5e-3, rtol=5e-3)
GRAD_TOL = dict(atol=1e-4, rtol=1e-4) if SMALL else dict(atol=3e-2, rtol=3e-2)
# (Nq, Nk, causal): ragged tiles everywhere, more keys than queries and more queries than keys.
SHAPES = [(37, 45, False), (37, 45, True), (45, 37, True)] if SMALL else \
    [(449, 517, False), (449, 517, True), (517, 449, True)]


def _random(*shape: int, seed: int, spread: float = 1.0, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * spread).to(device=DEVICE, dtype=dtype)


def _qkv(n_queries: int, n_keys: int, seed: int, dtype: torch.dtype = DTYPE, heads: int = 2):
    q = _random(1, heads, n_queries, HEAD_DIM, seed=seed, dtype=dtype)
    k = _random(1, heads, n_keys, HEAD_DIM, seed=seed + 1, dtype=dtype)
    v = _random(1, heads, n_keys, HEAD_DIM, seed=seed + 2, dtype=dtype)
    return q, k, v


def _close(actual: torch.Tensor, expected: torch.Tensor, tolerance: dict) -> bool:
    return actual.shape == expected.shape and compare(actual, expected, **tolerance)[0]


def _max_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double().cpu() - expected.double().cpu()).abs().nan_to_num(nan=math.inf).max().item()


def _named_mistake(actual: torch.Tensor, candidates: dict[str, torch.Tensor], tolerance: dict) -> str | None:
    """The first known wrong formula whose float64 value ``actual`` equals, if any."""
    for mistake, value in candidates.items():
        if _close(actual, value, tolerance):
            return mistake
    return None


def _shape_hint(error: Exception, exercise: str, hint: str) -> None:
    """Re-raise a broadcasting error from the learner's kernel with a hint; leave others alone."""
    text = " ".join(str(cause) for cause in _chain(error))
    if "broadcast" in text.lower() or "incompatible dimensions" in text.lower():
        raise AssertionError(f"{exercise}: your kernel does not run, tile shapes do not match. {hint}\n"
                             f"Triton said: {str(error).strip()[-600:]}") from error
    raise error


def _chain(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


# ------------------------------------------------------------------------------------------------
# 03a, exercise 1: rbf_scores


def _scores_reference(q: torch.Tensor, k: torch.Tensor, qk_scale: float) -> torch.Tensor:
    q64, k64 = q.double().cpu(), k.double().cpu()
    return qk_scale * (2 * q64 @ k64.transpose(-1, -2) - k64.square().sum(-1)[..., None, :])


def check_rbf_scores(rbf_scores: Callable) -> None:
    """``rbf_scores(q, k_t, qk_scale, ACC_DTYPE)`` must return ``qk_scale * (2 q.k - |k|^2)`` per tile.

    Launched in a kernel that writes every tile out, on ragged 37 x 45 tiles whose keys have very
    different lengths, then on float64 inputs (the accumulator dtype must follow ``ACC_DTYPE``).
    """
    from .. import teaching

    n_queries, n_keys = (37, 45) if SMALL else (200, 333)
    q = _random(1, 2, n_queries, HEAD_DIM, seed=31)
    # Keys of very different lengths: a sign error on |k|^2 then changes which key wins.
    lengths = torch.rand(1, 2, n_keys, 1, generator=torch.Generator().manual_seed(32)) * 2.2 + 0.3
    k = (_random(1, 2, n_keys, HEAD_DIM, seed=33, dtype=torch.float32) * lengths.to(DEVICE)).to(DTYPE)
    qk_scale = LOG2_E / math.sqrt(HEAD_DIM)
    hint_axis = ("k_t is (D, BLOCK_N): the key norms are one number per key, a sum over axis 0 "
                 "(its feature axis), and must broadcast as key_norms[None, :].")
    with not_written_yet(EXERCISE_SCORES):
        try:
            got = teaching.tile_scores(q, k, qk_scale, scores=rbf_scores, block_m=BLOCK_M, block_n=BLOCK_N)
        except Exception as error:
            _shape_hint(error, EXERCISE_SCORES, hint_axis)
    expected = _scores_reference(q, k, qk_scale)
    tolerance = dict(atol=1e-4, rtol=1e-5) if SMALL else dict(atol=2e-2, rtol=2e-3)
    if not _close(got, expected, tolerance):
        q64, k64 = q.double().cpu(), k.double().cpu()
        dots = q64 @ k64.transpose(-1, -2)
        norms = k64.square().sum(-1)[..., None, :]
        q_norms = q64.square().sum(-1)[..., :, None]
        candidates = {
            "weights favour long keys: the key norm is added, not subtracted; the logit is "
            "qk_scale * (2 q.k - |k|^2)": qk_scale * (2 * dots + norms),
            "the dot product lost its factor 2: -|q - k|^2 = 2 q.k - |k|^2 - |q|^2": (
                qk_scale * (dots - norms)),
            "the key norms are missing (that is dot-product attention's logit, times 2)": qk_scale * 2 * dots,
            "the key norms are missing (that is dot-product attention's logit)": qk_scale * dots,
            "qk_scale is missing: multiply the whole logit by it": 2 * dots - norms,
            "that is -qk_scale |q - k|^2: softmax would agree, but the kernel never forms |q|^2, and the "
            "saved log-sum-exp must match what the backward pass recomputes, qk_scale * (2 q.k - |k|^2)":
                qk_scale * (2 * dots - norms - q_norms),
        }
        mistake = _named_mistake(got, candidates, tolerance)
        raise AssertionError(
            f"{EXERCISE_SCORES}: the logits differ from float64 by up to {_max_diff(got, expected):.3g}. "
            + (f"They equal those of a known mistake: {mistake}." if mistake else
               "Expected qk_scale * (2 * tl.dot(q, k_t) - key_norms[None, :]) with key_norms = "
               "tl.sum(k * k, axis=0) of k_t in ACC_DTYPE.")
        )
    max_diff = _max_diff(got, expected)

    # float64 inputs: the result must keep float64's precision (accumulate in ACC_DTYPE). A Python
    # float reaches a compiled kernel as a float32 scalar, so the scale here is one that float32 holds
    # exactly: the comparison then measures the kernel's arithmetic, not the rounding of its argument.
    scale32 = float(torch.tensor(qk_scale, dtype=torch.float32))
    q64 = _random(1, 1, 16, HEAD_DIM, seed=34, dtype=torch.float64)
    k64 = _random(1, 1, 48, HEAD_DIM, seed=35, spread=1.5, dtype=torch.float64)
    with not_written_yet(EXERCISE_SCORES):
        got64 = teaching.tile_scores(q64, k64, scale32, scores=rbf_scores, block_m=16, block_n=BLOCK_N)
    if not _close(got64, _scores_reference(q64, k64, scale32), dict(atol=1e-10, rtol=1e-10)):
        raise AssertionError(
            f"{EXERCISE_SCORES}: right in float32, but with float64 inputs the logits are off by "
            f"{_max_diff(got64, _scores_reference(q64, k64, scale32)):.1e}: convert the key tile with "
            ".to(ACC_DTYPE), not .to(tl.float32), so float64 inputs are summed in float64."
        )
    print(f"✓ rbf_scores matches float64 on ragged {n_queries}x{n_keys} tiles, in {str(DTYPE)[6:]} and "
          f"float64 (max diff {max_diff:.1e})")


# ------------------------------------------------------------------------------------------------
# 03a, exercise 2: online_softmax_update


def _prefix_state(scores: torch.Tensor, v: torch.Tensor, block: int):
    """float64 (row_max, row_sum, acc) after each key tile, for base-2 scores (Nq, Nk) and v (Nk, D)."""
    states = []
    for end in range(block, scores.shape[1] + block, block):
        seen = scores[:, :end]
        row_max = seen.max(dim=1).values
        weights = torch.exp2(seen - row_max[:, None])
        states.append((row_max, weights.sum(dim=1), weights @ v[:end]))
    return [torch.stack(parts) for parts in zip(*states, strict=True)]


def _simulated_sums(scores: torch.Tensor, block: int, alpha_rule: str) -> torch.Tensor:
    """float64 row_sum after each tile when the old sum is rescaled by the wrong alpha: "inverted"
    multiplies by exp2(new_max - old_max) instead of exp2(old_max - new_max)."""
    row_max = torch.full(scores.shape[:1], -math.inf, dtype=torch.float64)
    row_sum = torch.zeros(scores.shape[:1], dtype=torch.float64)
    sums = []
    for start in range(0, scores.shape[1], block):
        tile = scores[:, start:start + block]
        new_max = torch.maximum(row_max, tile.max(dim=1).values)
        old = torch.where(row_max == -math.inf, torch.zeros_like(row_max), row_max)
        alpha = torch.exp2(new_max - old) if alpha_rule == "inverted" else torch.exp2(old - new_max)
        row_sum = alpha * row_sum + torch.exp2(tile - new_max[:, None]).sum(dim=1)
        row_max = new_max
        sums.append(row_sum)
    return torch.stack(sums)


def _rising_keys(n_queries: int, n_tiles: int, seed: int):
    """One head whose key tiles come ever closer to the origin, so each tile raises most rows' maximum."""
    q = _random(n_queries, HEAD_DIM, seed=seed)
    shrink = torch.linspace(2.2, 0.4, n_tiles).repeat_interleave(BLOCK_M)[:, None]
    k = _random(n_tiles * BLOCK_M, HEAD_DIM, seed=seed + 1, dtype=torch.float32)
    k = (k * shrink.to(DEVICE)).to(DTYPE)
    v = _random(n_tiles * BLOCK_M, HEAD_DIM, seed=seed + 2)
    return q, k, v


def _diagnose_update(update, n_tiles: int) -> None:
    """Run the online softmax over 1, then ``n_tiles`` key tiles and name what goes wrong first."""
    from .. import teaching

    tolerance = dict(atol=1e-5, rtol=1e-5) if SMALL else dict(atol=2e-2, rtol=2e-2)
    q, k, v = _rising_keys(20, n_tiles, seed=41)
    scale = 1 / math.sqrt(HEAD_DIM)
    scores = _scores_reference(q, k, scale * LOG2_E)
    for tiles in (1, n_tiles):
        keys = tiles * BLOCK_M
        with not_written_yet(EXERCISE_UPDATE):
            got = teaching.online_softmax_trace(q, k[:keys], v[:keys], scale, update=update, block=BLOCK_M)
        expected = _prefix_state(scores[:, :keys], v[:keys].double().cpu(), BLOCK_M)
        names = ("row_max", "row_sum", "acc")
        wrong = [name for name, a, e in zip(names, got, expected, strict=True) if not _close(a, e, tolerance)]
        if not wrong:
            continue
        where = "with a single key tile" if tiles == 1 else f"over {tiles} key tiles whose maxima keep rising"
        unshifted_sums = torch.exp2(scores[:, :keys]).cumsum(1)[:, BLOCK_M - 1::BLOCK_M].T
        if "row_max" not in wrong and _close(got[1], unshifted_sums, tolerance):
            hint = ("row_sum and acc are measured against 0, not against the running maximum: "
                    "p = exp2(scores - new_max[:, None]), and rescale the old sums by alpha")
        elif "row_max" in wrong:
            hint = ("row_max must end as the running maximum: return new_max = "
                    "maximum(row_max, max(scores, axis=1))")
        elif tiles == 1:
            hint = ("even one tile is wrong, so the rescale is not (yet) the problem: new_max = "
                    "maximum(row_max, max(scores, axis=1)), p = exp2(scores - new_max[:, None]), "
                    "row_sum + sum(p, axis=1), acc + dot(p, v)")
        elif wrong == ["acc"]:
            errors = [_max_diff(a, e) for a, e in zip(got[2], expected[2], strict=True)]
            hint = (f"the output is off by an error that grows with the number of key tiles (after "
                    f"each tile: {', '.join(f'{x:.2g}' for x in errors)}): did you rescale acc by alpha?")
        elif wrong == ["row_sum"]:
            hint = "row_sum is off and acc is right: did you rescale row_sum by alpha?"
        elif _close(got[1], _simulated_sums(scores[:, :keys], BLOCK_M, "inverted"),
                    dict(atol=1e-5, rtol=1e-3)):
            hint = "alpha is upside down: alpha = exp2(row_max - new_max), old minus new, so it is at most 1"
        else:
            hint = "rescale both row_sum and acc by alpha = exp2(row_max - new_max) before adding this tile"
        ending = "" if hint.endswith("?") else "."
        raise AssertionError(f"{EXERCISE_UPDATE}: {', '.join(wrong)} wrong {where}: {hint}{ending}")


def check_online_softmax_update(online_softmax_update: Callable) -> None:
    """``online_softmax_update(acc, row_max, row_sum, scores, v)`` inside the teaching forward kernel.

    Probes: the running state after one and after several key tiles whose maxima rise (the
    rescale), causal rows that see no key at all (no NaN), logits large enough to overflow exp2 in
    float32 (the max subtracted), and the kernel's output against float64 on ragged shapes.
    """
    from .. import teaching

    pieces = {"UPDATE": online_softmax_update}
    _diagnose_update(online_softmax_update, n_tiles=6)
    worst = 0.0
    for case, (n_queries, n_keys, causal) in enumerate(SHAPES):
        q, k, v = _qkv(n_queries, n_keys, seed=50 + 3 * case)
        with not_written_yet(EXERCISE_UPDATE):
            out, _ = teaching.flash_rbf_forward(q, k, v, causal, pieces=pieces, block=BLOCK_M)
        expected = rbf_attention_reference(q, k, v, causal=causal)
        if not bool(torch.isfinite(out).all()):
            seen_nothing = ~causal_visibility(n_queries, n_keys).any(dim=1)
            rows = torch.nonzero((~torch.isfinite(out.cpu())).any(-1).any(0).any(0)).flatten().tolist()
            blind_rows = set(torch.nonzero(seen_nothing).flatten().tolist())
            if causal and blind_rows and set(rows) <= blind_rows:
                raise AssertionError(
                    f"{EXERCISE_UPDATE}: rows {rows[0]}..{rows[-1]} see no key at all (causal, "
                    f"Nq={n_queries} > "
                    f"Nk={n_keys}) and come out NaN: -inf - (-inf) is NaN. When new_max is -inf, subtract 0 "
                    "instead: reference = tl.where(new_max == float('-inf'), 0.0, new_max)."
                )
            raise AssertionError(f"{EXERCISE_UPDATE}: the output holds NaN or infinity "
                                 f"(Nq={n_queries}, Nk={n_keys}, causal={causal}).")
        if not _close(out, expected, OUT_TOL):
            raise AssertionError(f"{EXERCISE_UPDATE}: the attention output differs from float64 by "
                                 f"{_max_diff(out, expected):.3g} (Nq={n_queries}, Nk={n_keys}, "
                                 f"causal={causal}).")
        worst = max(worst, _max_diff(out, expected))

    # Logits of several hundred: exp2 overflows float32 (2^128) unless the maximum is subtracted first.
    q, k, v = _qkv(16, 3 * BLOCK_M, seed=60, heads=1)
    with not_written_yet(EXERCISE_UPDATE):
        out, _ = teaching.flash_rbf_forward(q, k, v, scale=24.0, pieces=pieces, block=BLOCK_M)
    expected = rbf_attention_reference(q, k, v, scale=24.0)
    # Logits near 500 carry float32 rounding of about 3e-5 into every weight's exponent.
    large_tolerance = dict(atol=2e-4, rtol=2e-4) if SMALL else OUT_TOL
    if not bool(torch.isfinite(out).all()):
        raise AssertionError(f"{EXERCISE_UPDATE}: with large logits (scale 24) the output overflows to "
                             "NaN or infinity: compute exp2(scores - new_max), never exp2(scores).")
    if not _close(out, expected, large_tolerance):
        raise AssertionError(f"{EXERCISE_UPDATE}: with large logits (scale 24) the output is off by "
                             f"{_max_diff(out, expected):.3g}.")
    print(f"✓ online_softmax_update matches float64 after every key tile, in {len(SHAPES)} ragged and "
          f"causal shapes and with large logits (max diff {max(worst, _max_diff(out, expected)):.1e})")


# ------------------------------------------------------------------------------------------------
# 03a, exercise 3: key_range


def _key_range_cases():
    """(Nq, Nk, BLOCK_M, BLOCK_N, causal) covering odd lengths, Nq != Nk both ways, unequal blocks."""
    shapes = [(64, 64), (37, 37), (1, 1), (1, 40), (40, 1), (20, 52), (52, 20), (33, 17), (17, 33),
              (48, 16), (16, 48), (100, 3), (5, 70), (90, 130)]
    blocks = ((16, 16), (16, 32), (32, 16), (64, 16))
    cases = [(nq, nk, bm, bn, True) for nq, nk in shapes for bm, bn in blocks]
    return cases + [(37, 45, 16, 16, False), (45, 37, 32, 16, False)]


def _explain_bounds(band_start: int, hi: int, first: int, nq: int, nk: int, bm: int, bn: int, causal: bool):
    """None when (band_start, hi) make the kernel visit exactly the right tiles; else what is wrong."""
    real_queries = range(first, min(first + bm, nq))
    offset = nk - nq if causal else nk  # query i sees keys j <= i + offset (non-causal: all of them)

    def sees(i, j):
        return 0 <= j < nk and (not causal or j <= i + offset)

    unmasked = list(range(0, band_start, bn))
    masked = list(range(band_start, hi, bn))
    rows = f"query tile at rows {first}..{real_queries[-1]} (Nq={nq}, Nk={nk}, BLOCK_M={bm}, BLOCK_N={bn})"
    got = f"your bounds give band_start={band_start}, hi={hi}"
    if band_start < 0 or (masked and masked[0] < 0):
        return (f"{rows}: {got}: the masked loop starts before key 0 and would read memory in front "
                "of k. Clamp seen_by_all to [0, n_keys] before dividing: Triton's // truncates toward "
                "zero (-20 // 16 is -1 there, not -2).")
    for start in unmasked:
        hidden = [(i, j) for j in range(start, start + bn) for i in real_queries if not sees(i, j)]
        if hidden:
            i, j = hidden[0]
            return (f"{rows}: {got}: the unmasked loop covers key {j}, which query {i} must not see "
                    "(or which does not exist). The unmasked tiles must be seen completely by every "
                    "query of the tile: take them from its *first* query, seen_by_all = "
                    "first_query + 1 + n_keys - n_queries, clamped to [0, n_keys].")
    covered = [j for start in unmasked + masked for j in range(start, start + bn)]
    if len(covered) != len(set(covered)):
        return f"{rows}: {got}: some keys are visited twice (band_start must be a whole number of tiles)."
    for i in real_queries:
        missed = [j for j in range(nk) if sees(i, j) and j not in covered]
        if missed:
            hint = ("is hi computed from the tile's last real query, min(first_query + BLOCK_M, "
                    "n_queries) - 1?" if i != real_queries[0] else
                    "hi counts the keys the tile's last query sees: last_query + 1 + n_keys - n_queries")
            if causal and nk > nq and all(j > i for j in missed):
                hint = ("with more keys than queries the alignment is bottom-right: query i sees keys "
                        "up to i + n_keys - n_queries; did you leave out the offset n_keys - n_queries?")
            keys = f"key {missed[0]}" if len(missed) == 1 else f"keys {missed[0]}..{missed[-1]}"
            return (f"{rows}: {got}: query {i} misses {keys}, which it sees. "
                    f"The tile's queries miss keys: {hint}")
    for start in masked:
        if not any(sees(i, j) for j in range(start, start + bn) for i in real_queries):
            return (f"{rows}: {got}: the kernel visits the key tile at {start}, which no query of the tile "
                    "sees (or which lies past the last key): clamp hi to [0, n_keys] and take it from the "
                    "last real query.")
    seen_by_all = min(max(first + 1 + offset, 0), nk) if causal else nk
    if len(unmasked) < seen_by_all // bn:
        extra = seen_by_all // bn - len(unmasked)
        return (f"{rows}: {got}: correct, but it masks {extra} tile(s) that every "
                "query sees completely: seen_by_all is the number of keys the tile's first query sees, "
                "first_query + 1 + n_keys - n_queries (clamped to [0, n_keys]).")
    return None


def check_key_range(key_range: Callable) -> None:
    """``key_range(first_query, n_queries, n_keys, BLOCK_M, BLOCK_N, CAUSAL) -> (band_start, hi)``.

    The bounds are computed by the learner's function inside a kernel, for every query tile of
    many shapes, and checked against the causal rule key by key: nothing visible missed, nothing
    hidden unmasked, no tile nobody sees, no mask where none is needed. Then the teaching forward
    kernel runs with them against float64.
    """
    from .. import teaching

    cases = _key_range_cases()
    tiles = 0
    for nq, nk, bm, bn, causal in cases:
        with not_written_yet(EXERCISE_KEY_RANGE):
            bounds = teaching.forward_bounds(nq, nk, causal=causal, block_m=bm, block_n=bn,
                                             key_range=key_range)
        for tile, (band_start, hi) in enumerate(bounds):
            problem = _explain_bounds(band_start, hi, tile * bm, nq, nk, bm, bn, causal)
            if problem:
                raise AssertionError(f"{EXERCISE_KEY_RANGE}: {problem}")
            tiles += 1
    worst = 0.0
    for case, (n_queries, n_keys, causal) in enumerate(SHAPES):
        q, k, v = _qkv(n_queries, n_keys, seed=70 + 3 * case)
        with not_written_yet(EXERCISE_KEY_RANGE):
            out, _ = teaching.flash_rbf_forward(q, k, v, causal, pieces={"KEY_RANGE": key_range},
                                                block=BLOCK_M)
        expected = rbf_attention_reference(q, k, v, causal=causal)
        if not _close(out, expected, OUT_TOL):
            raise AssertionError(f"{EXERCISE_KEY_RANGE}: the bounds look right, yet the output differs from "
                                 f"float64 by {_max_diff(out, expected):.3g} (Nq={n_queries}, Nk={n_keys}).")
        worst = max(worst, _max_diff(out, expected))
    print(f"✓ key_range visits exactly the tiles it must in {tiles} query tiles of {len(cases)} shapes, "
          f"and the kernel matches float64 (max diff {worst:.1e})")


# ------------------------------------------------------------------------------------------------
# 03b: the backward kernels


def _backward_case(n_queries: int, n_keys: int, causal: bool, seed: int):
    """Inputs, the teaching forward's (out, lse), and float64 gradients by autograd."""
    from .. import teaching

    q, k, v = _qkv(n_queries, n_keys, seed=seed)
    grad_out = _random(*q.shape, seed=seed + 3)
    out, lse = teaching.flash_rbf_forward(q, k, v, causal, block=BLOCK_M)
    leaves = [x.detach().double().cpu().requires_grad_() for x in (q, k, v)]
    expected = torch.autograd.grad(rbf_attention_reference(*leaves, causal=causal), leaves,
                                   grad_out.double().cpu())
    return (q, k, v, grad_out, out, lse), expected


def _float64_ds(q, k, v, grad_out, causal: bool, scale: float):
    """P and dS = P * (dP - Delta) in float64, from the definition (no kernel involved)."""
    q64, k64, v64, g64 = (x.double().cpu() for x in (q, k, v, grad_out))
    logits = scale * (2 * q64 @ k64.transpose(-1, -2) - k64.square().sum(-1)[..., None, :])
    if causal:
        logits = logits.masked_fill(~causal_visibility(q.shape[-2], k.shape[-2]), float("-inf"))
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    dp = g64 @ v64.transpose(-1, -2)
    ds = p * (dp - (g64 * (p @ v64)).sum(-1, keepdim=True))
    return q64, k64, p, ds


def _launch_backward(which: str, kernel, inputs, causal: bool, exercise: str, hint: str):
    from .. import teaching

    q, k, v, grad_out, out, lse = inputs
    q3, k3, v3, do3, lse3, delta = teaching.backward_inputs(grad_out, q, k, v, out, lse)
    launch = teaching.launch_dkdv if which == "dkdv" else teaching.launch_dq
    with not_written_yet(exercise):
        try:
            result = launch(kernel, q3, k3, v3, do3, lse3, delta, causal=causal,
                            scale=1 / math.sqrt(HEAD_DIM), block_m=BLOCK_M, block_n=BLOCK_N)
        except Exception as error:
            _shape_hint(error, exercise, hint)
    return result


def check_dkdv_kernel(rbf_dkdv_kernel) -> None:
    """The learner's ``rbf_dkdv_kernel``, launched on the teaching forward's output: dK and dV
    against float64 autograd, causal and not, Nq != Nk both ways, BLOCK_M != BLOCK_N."""
    hint = "dS is (BLOCK_M, BLOCK_N): its column sums, one per key, are tl.sum(ds, axis=0)."
    worst = 0.0
    scale = 1 / math.sqrt(HEAD_DIM)
    for case, (n_queries, n_keys, causal) in enumerate(SHAPES):
        inputs, (_, dk_expected, dv_expected) = _backward_case(n_queries, n_keys, causal, seed=80 + 4 * case)
        dk, dv = _launch_backward("dkdv", rbf_dkdv_kernel, inputs, causal, EXERCISE_DKDV, hint)
        dk, dv = dk.reshape(dk_expected.shape), dv.reshape(dv_expected.shape)
        shape = f"Nq={n_queries}, Nk={n_keys}, causal={causal}"
        if not _close(dv, dv_expected, GRAD_TOL):
            raise AssertionError(f"{EXERCISE_DKDV}: dV is wrong ({shape}), and dV is given code: did an edit "
                                 "outside the exercise lines change the loop?")
        if not _close(dk, dk_expected, GRAD_TOL):
            q64, k64, _, ds = _float64_ds(*inputs[:4], causal, scale)
            term_q, term_k = ds.transpose(-1, -2) @ q64, ds.sum(-2)[..., :, None] * k64
            candidates = {
                "dK of dot-product attention: the key norms add -2 scale (sum_i dS_ij) k_j, the "
                "column sums of dS times k": 2 * scale * term_q,
                "a key-norm term with the wrong sign: the logit holds -|k|^2, so its gradient is -2 k": (
                    2 * scale * (term_q + term_k)),
                "a key-norm term counted twice: dk is multiplied by 2 scale after the loop, so inside it the "
                "term is -colsum(dS) k": 2 * scale * (term_q - 2 * term_k),
                "2 scale applied twice: the line after the loop already multiplies dk by it": (
                    4 * scale * scale * (term_q - term_k)),
                "only the key-norm term: dS^T Q is missing": -2 * scale * term_k,
            }
            mistake = _named_mistake(dk, candidates, GRAD_TOL)
            raise AssertionError(
                f"{EXERCISE_DKDV}: dK differs from float64 autograd by {_max_diff(dk, dk_expected):.3g} "
                f"({shape}). " + (f"It equals {mistake}." if mistake else
                                  "Expected dk += dot(trans(ds), q) - sum(ds, axis=0)[:, None] * k.")
            )
        worst = max(worst, _max_diff(dk, dk_expected), _max_diff(dv, dv_expected))
    print(f"✓ rbf_dkdv_kernel: dK and dV match float64 autograd in {len(SHAPES)} ragged and causal "
          f"shapes (max diff {worst:.1e})")


def check_dq_kernel(rbf_dq_kernel) -> None:
    """The learner's ``rbf_dq_kernel``, launched on the teaching forward's output: dQ against float64
    autograd, for whole and ragged key tiles, causal and not, Nq != Nk both ways."""
    hint = "dS is (BLOCK_M, BLOCK_N) and k is (BLOCK_N, D): dq += tl.dot(ds, k), with k loaded as (keys, D)."
    scale = 1 / math.sqrt(HEAD_DIM)
    whole = (2 * BLOCK_N, 4 * BLOCK_N, False)  # every key tile full: separates the ragged edge out
    worst = 0.0
    failures = {}
    for case, (n_queries, n_keys, causal) in enumerate([whole, *SHAPES]):
        inputs, (dq_expected, _, _) = _backward_case(n_queries, n_keys, causal, seed=90 + 4 * case)
        dq = _launch_backward("dq", rbf_dq_kernel, inputs, causal, EXERCISE_DQ, hint)
        dq = dq.reshape(dq_expected.shape)
        if _close(dq, dq_expected, GRAD_TOL):
            worst = max(worst, _max_diff(dq, dq_expected))
            continue
        q64, k64, p, ds = _float64_ds(*inputs[:4], causal, scale)
        candidates = {
            "P K instead of dS K: dQ comes from the gradient of the logits, dS": 2 * scale * p @ k64,
            "dS K without the factor: the store multiplies by 2 scale, keep it": ds @ k64,
            "2 scale applied twice: the store already multiplies dq by it": 4 * scale * scale * ds @ k64,
        }
        mistake = _named_mistake(dq, candidates, GRAD_TOL)
        failures[(n_queries, n_keys, causal)] = (_max_diff(dq, dq_expected), mistake)
    if failures:
        (n_queries, n_keys, causal), (diff, mistake) = next(iter(failures.items()))
        shape = f"Nq={n_queries}, Nk={n_keys}, causal={causal}"
        if mistake:
            hint = f"It equals {mistake}."
        elif whole not in failures and all(causal for _, _, causal in failures):
            hint = ("Whole and non-causal tiles are right, causal ones wrong: pass CAUSAL on to "
                    "probabilities_and_ds, which masks the keys each query must not see.")
        elif whole not in failures:
            hint = ("Whole key tiles are right, ragged ones wrong: the last key tile hangs over n_keys, so "
                    "load k and v with mask=keys[:, None] < n_keys, other=0.0.")
        else:
            hint = ("Per key tile: keys = start_n + arange(0, BLOCK_N), load k and v (masked), "
                    "_, ds = probabilities_and_ds(...), dq += dot(ds, k).")
        raise AssertionError(f"{EXERCISE_DQ}: dQ differs from float64 autograd by {diff:.3g} ({shape}). "
                             f"{hint}")
    print(f"✓ rbf_dq_kernel: dQ matches float64 autograd for whole, ragged and causal key tiles "
          f"(max diff {worst:.1e})")
