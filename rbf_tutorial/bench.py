"""Benchmark: every route to RBF attention side by side with dot-product SDPA, on the GPU present.

Run ``python -m rbf_tutorial.bench`` (or ``rbf-tutorial bench``); ``--help`` lists the options.

For each cell of the grid (head dim ``D``, sequence length ``N``, causal or not, forward or
forward+backward) in bfloat16 with ``B = 4`` and ``H = 1024 // D`` heads, every method runs on
the same random inputs and is measured for:

- time: median of :func:`triton.testing.do_bench` (L2 flushed before every call);
- effective TFLOP/s: one FLOP count for every method (``4 B H Nq Nk D`` forward, halved when
  causal, times 3.5 with the backward: the FlashAttention convention), so TFLOP/s rank the same
  way as time;
- ``x flash``: time over the time of dot-product SDPA on its flash backend in the same cell;
- peak memory: bytes allocated at the peak of one call, beyond what was live before it;
- relative error ``|out - ref| / |ref|`` of the forward output against a float32 reference.

Method names (``--methods``): see :data:`METHODS`. The table is printed last; a JSON file with
every number and PNG plots go to ``--out``. ``--methods rbf-triton,rbf-triton-xsa,rbf-triton-xsa-unfused``
measures what exclusive self attention costs: fused into the kernel's epilogue, or applied after it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .reference import causal_visibility
from .runtime import triton_installed

__all__ = [
    "FLASH",
    "METHODS",
    "MODES",
    "DEFAULT_METHODS",
    "BenchConfig",
    "Cell",
    "Method",
    "MethodUnavailable",
    "Plan",
    "Result",
    "TargetCheck",
    "attention_flops",
    "build_parser",
    "check_targets",
    "chunked_reference",
    "format_target_checks",
    "format_xsa_overhead",
    "format_tables",
    "grid",
    "main",
    "plan_from_args",
    "plot_results",
    "relative_error",
    "run_benchmark",
    "write_json",
]

MODES: tuple[str, ...] = ("fwd", "fwd+bwd")
DEFAULT_HEAD_DIMS: tuple[int, ...] = (64, 128)
DEFAULT_SEQ_LENS: tuple[int, ...] = (1024, 4096, 16384)
QUICK_HEAD_DIMS: tuple[int, ...] = (64,)
QUICK_SEQ_LENS: tuple[int, ...] = (1024, 4096)

#: FlashAttention's convention: the backward pass does 2.5x the forward's matmul FLOPs.
BACKWARD_FLOP_FACTOR = 2.5
#: Largest float32 score block one reference chunk materialises (the matmul route holds a few).
REFERENCE_CHUNK_BYTES = 2**30
#: The reference method every ``x flash`` ratio divides by; always measured.
FLASH = "dot-sdpa-flash"

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# What is measured
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Everything about a run that is not the grid: sizes fixed across cells, dtype, timing."""

    batch: int = 4
    model_dim: int = 1024  # heads = model_dim // head_dim, so every D moves the same bytes
    dtype: torch.dtype = torch.bfloat16
    device: str = "cuda"
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_repeats: int = 5  # slow cells still get a median over this many timed calls
    seed: int = 0

    def heads(self, head_dim: int) -> int:
        return max(1, self.model_dim // head_dim)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One point of the grid."""

    head_dim: int
    seq_len: int
    causal: bool
    mode: str  # "fwd" or "fwd+bwd"

    def describe(self) -> str:
        return f"D={self.head_dim} N={self.seq_len} {'causal' if self.causal else 'non-causal'} {self.mode}"


@dataclasses.dataclass
class Result:
    """One method measured in one cell. ``status`` is "ok", "OOM", "unavailable" or "error"."""

    head_dim: int
    seq_len: int
    causal: bool
    mode: str
    method: str
    status: str
    batch: int = 0
    heads: int = 0
    flops: float = 0.0
    ms: float | None = None
    tflops: float | None = None
    ratio_to_flash: float | None = None
    peak_mib: float | None = None
    rel_err: float | None = None
    first_call_s: float | None = None  # the warm-up call: compilation and autotuning show up here
    note: str = ""

    @property
    def cell(self) -> Cell:
        return Cell(self.head_dim, self.seq_len, self.causal, self.mode)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def attention_flops(
    *, batch: int, heads: int, n_queries: int, n_keys: int, head_dim: int, causal: bool, mode: str
) -> float:
    """Matmul FLOPs of attention: ``4 B H Nq Nk D`` forward (two matmuls, 2 FLOPs per multiply-add),
    halved when causal, times ``1 + 2.5`` for forward+backward.

    The same count is used for every method, RBF or not, so TFLOP/s are "effective": the key-norm
    work an RBF route does on top is not credited.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    forward = 4.0 * batch * heads * n_queries * n_keys * head_dim
    if causal:
        forward *= 0.5
    return forward * (1.0 + BACKWARD_FLOP_FACTOR) if mode == "fwd+bwd" else forward


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """``|out - reference| / |reference|`` in the Frobenius norm, accumulated in float64."""
    if out.shape != reference.shape:
        raise ValueError(f"out: shape {tuple(out.shape)} does not match reference {tuple(reference.shape)}")
    reference = reference.detach().float()
    denominator = torch.linalg.vector_norm(reference, dtype=torch.float64).item()
    if denominator == 0.0:
        raise ValueError("reference: has zero norm, so a relative error is undefined")
    difference = out.detach().float() - reference
    return torch.linalg.vector_norm(difference, dtype=torch.float64).item() / denominator


# ---------------------------------------------------------------------------------------------
# The methods
# ---------------------------------------------------------------------------------------------


class MethodUnavailable(Exception):
    """A method cannot run in this installation (its module or backend is missing)."""


@dataclasses.dataclass(frozen=True)
class Method:
    """A contender: how to get its attention function, and how to judge it.

    ``load`` imports lazily and returns ``fn(q, k, v, causal) -> out``, or raises
    :class:`MethodUnavailable`. ``context`` wraps every call (SDPA backend selection).
    ``family`` picks the float32 reference its output is compared with. When
    ``raising_means_unavailable``, an exception at run time (not an OOM) means "this backend
    does not support these inputs here" rather than a bug.
    """

    name: str
    label: str  # short column header in the tables
    family: str  # "rbf" or "dot"
    load: Callable[[], AttentionFn]
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    raising_means_unavailable: bool = False
    in_default_run: bool = True  # False: only when named in --methods


def _load_triton_kernel() -> AttentionFn:
    try:
        from rbf_tutorial.kernels import rbf_flash_attention
    except ImportError as error:
        raise MethodUnavailable(f"rbf_tutorial.kernels.rbf_flash_attention: {error}") from None
    return lambda q, k, v, causal: rbf_flash_attention(q, k, v, causal=causal)


def _triton_xsa_loader(fused: bool) -> Callable[[], AttentionFn]:
    """The kernel with exclusive self attention: in its epilogue, or as separate torch ops after it."""

    def load() -> AttentionFn:
        try:
            from rbf_tutorial.kernels import rbf_flash_attention
            from rbf_tutorial.xsa import exclusive, own_values
        except ImportError as error:
            raise MethodUnavailable(f"rbf_tutorial.kernels / rbf_tutorial.xsa: {error}") from None
        if fused:
            return lambda q, k, v, causal: rbf_flash_attention(q, k, v, causal=causal, exclusive=True)
        return lambda q, k, v, causal: exclusive(
            rbf_flash_attention(q, k, v, causal=causal), own_values(v, q.shape[-2])
        )

    return load


def _rbf_backend_loader(backend: str) -> Callable[[], AttentionFn]:
    def load() -> AttentionFn:
        try:
            from rbf_tutorial.attention import BACKENDS, rbf_attention
        except ImportError as error:
            raise MethodUnavailable(f"rbf_tutorial.attention: {error}") from None
        if backend not in BACKENDS:
            raise MethodUnavailable(f"rbf_attention has no backend {backend!r}")
        return lambda q, k, v, causal: rbf_attention(q, k, v, causal=causal, backend=backend)

    return load


def _sdpa_route_loader(function_name: str) -> Callable[[], AttentionFn]:
    def load() -> AttentionFn:
        try:
            from rbf_tutorial import backends
        except ImportError as error:
            raise MethodUnavailable(f"rbf_tutorial.backends: {error}") from None
        route = getattr(backends, function_name, None)
        if route is None:
            raise MethodUnavailable(f"rbf_tutorial.backends has no {function_name}")
        return lambda q, k, v, causal: route(q, k, v, causal=causal)

    return load


def _load_dot_sdpa() -> AttentionFn:
    # Nq == Nk in every cell, so SDPA's top-left causal mask equals the bottom-right one.
    return lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _sdpa_backend(name: str) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    def context() -> contextlib.AbstractContextManager[Any]:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(getattr(SDPBackend, name))

    return context


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("rbf-triton", "triton", "rbf", _load_triton_kernel),
        Method("rbf-flex", "flex", "rbf", _rbf_backend_loader("flex")),
        Method("rbf-sdpa-bias", "sdpa-bias", "rbf", _sdpa_route_loader("sdpa_bias_attention")),
        Method("rbf-sdpa-padded", "sdpa-pad", "rbf", _sdpa_route_loader("sdpa_padded_attention")),
        Method("rbf-naive", "naive", "rbf", _rbf_backend_loader("naive")),
        Method(FLASH, "dot-flash", "dot", _load_dot_sdpa, _sdpa_backend("FLASH_ATTENTION")),
        Method(
            "dot-sdpa-cudnn", "dot-cudnn", "dot", _load_dot_sdpa, _sdpa_backend("CUDNN_ATTENTION"),
            raising_means_unavailable=True,
        ),
        Method("rbf-triton-xsa", "triton-xsa", "rbf-xsa", _triton_xsa_loader(fused=True),
               in_default_run=False),
        Method("rbf-triton-xsa-unfused", "xsa-unfused", "rbf-xsa", _triton_xsa_loader(fused=False),
               in_default_run=False),
    )
}
"""Every method the benchmark knows, in table order."""

DEFAULT_METHODS: tuple[str, ...] = tuple(name for name, method in METHODS.items() if method.in_default_run)


# ---------------------------------------------------------------------------------------------
# The float32 references
# ---------------------------------------------------------------------------------------------


def dot_attention_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Plain dot-product attention, materialised, bottom-right causal (reference only)."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        visible = causal_visibility(q.shape[-2], k.shape[-2], device=q.device)
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def rbf_attention_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """RBF attention through the materialising ``matmul`` backend (reference only)."""
    from rbf_tutorial.attention import rbf_attention

    return rbf_attention(q, k, v, causal=causal, backend="matmul")


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
        previous = matmul.fp32_precision
        matmul.fp32_precision = "ieee"
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
    attend: AttentionFn,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    *,
    max_chunk_bytes: int = REFERENCE_CHUNK_BYTES,
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
            keys_seen = stop + n_keys - n_queries if causal else n_keys
            keys, values = k[:, :, :keys_seen], v[:, :, :keys_seen]
            out[:, :, start:stop] = attend(q[:, :, start:stop], keys, values, causal)
    return out


# ---------------------------------------------------------------------------------------------
# Measuring one method in one cell
# ---------------------------------------------------------------------------------------------


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _release_memory(device: str) -> None:
    # After an OOM the failed call's tensors can survive in reference cycles until collected.
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _time_one_call_ms(step: Callable[[], Any], device: str) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    _synchronize(device)
    return start.elapsed_time(end)


def time_ms(
    step: Callable[[], Any], *, config: BenchConfig, grad_to_none: Sequence[torch.Tensor] | None
) -> float:
    """Median milliseconds per ``step()`` from :func:`triton.testing.do_bench`.

    ``do_bench`` fits its repeats into ``rep`` ms, which leaves one sample for a 60 ms call; the
    repetition window is stretched so every cell gets at least ``config.min_repeats``.
    """
    import triton.testing

    one_call = _time_one_call_ms(step, config.device)
    rep = max(config.rep_ms, (config.min_repeats + 1) * one_call)
    return float(
        triton.testing.do_bench(
            step, warmup=config.warmup_ms, rep=rep, grad_to_none=grad_to_none, return_mode="median"
        )
    )


def peak_memory_bytes(step: Callable[[], Any], *, config: BenchConfig) -> int:
    """Extra bytes at the peak of one ``step()``, beyond everything live before it."""
    from rbf_tutorial.memory import peak_memory

    return peak_memory(step, device=config.device)


def _is_out_of_memory(error: BaseException) -> bool:
    # torch.compile can wrap an allocator failure in its own exception types.
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def _clear_grads(grads: Sequence[torch.Tensor] | None) -> None:
    for x in grads or ():
        x.grad = None


def _measure_step(
    step: Callable[[], torch.Tensor],
    grads: Sequence[torch.Tensor] | None,
    reference: torch.Tensor | None,
    result: Result,
    config: BenchConfig,
) -> None:
    # A function of its own so that, when a call fails, its tensors die with this frame.
    started = time.perf_counter()
    out = step()  # the warm-up: compiles and autotunes, so it is never timed
    _synchronize(config.device)
    result.first_call_s = time.perf_counter() - started
    if reference is not None:
        result.rel_err = relative_error(out, reference)
    del out
    _clear_grads(grads)
    result.peak_mib = peak_memory_bytes(step, config=config) / 2**20
    _clear_grads(grads)
    result.ms = time_ms(step, config=config, grad_to_none=grads)


def measure_method(
    fn: AttentionFn,
    method: Method,
    cell: Cell,
    tensors: dict[str, torch.Tensor],
    reference: torch.Tensor | None,
    config: BenchConfig,
) -> Result:
    """Warm up (compiles and autotunes), check the output, then measure memory and time."""
    batch, heads = tensors["q"].shape[:2]
    result = Result(
        cell.head_dim, cell.seq_len, cell.causal, cell.mode, method.name, status="ok",
        batch=batch, heads=heads,
        flops=attention_flops(
            batch=batch, heads=heads, n_queries=cell.seq_len, n_keys=cell.seq_len,
            head_dim=cell.head_dim, causal=cell.causal, mode=cell.mode,
        ),
    )
    if cell.mode == "fwd":
        q, k, v = tensors["q"], tensors["k"], tensors["v"]
        grads: list[torch.Tensor] | None = None

        def step() -> torch.Tensor:
            return fn(q, k, v, cell.causal)
    else:
        # Views of the shared inputs that collect gradients; do_bench clears .grad before each
        # timed call, so gradient accumulation is never timed.
        q, k, v = (tensors[name].detach().requires_grad_() for name in ("q", "k", "v"))
        grads = [q, k, v]
        upstream = tensors["upstream"]

        def step() -> torch.Tensor:
            out = fn(q, k, v, cell.causal)
            out.backward(upstream)
            return out

    try:
        with method.context():
            _measure_step(step, grads, reference, result, config)
    except Exception as error:  # one failing method must not end a long run
        if _is_out_of_memory(error):
            result.status = "OOM"
        elif method.raising_means_unavailable:
            result.status = "unavailable"
        else:
            result.status = "error"
        result.note = _first_line(error)
        result.ms = result.peak_mib = result.rel_err = None
    finally:
        _clear_grads(grads)
    if not result.ok:
        _release_memory(config.device)
    elif result.ms:
        result.tflops = result.flops / (result.ms * 1e-3) / 1e12
    return result


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def draw_inputs(config: BenchConfig, head_dim: int, seq_len: int, causal: bool) -> dict[str, torch.Tensor]:
    """Random ``q``, ``k``, ``v`` and an upstream gradient, reproducible per (D, N, causal)."""
    generator = torch.Generator(device=config.device)
    generator.manual_seed(config.seed * 1_000_003 + head_dim * 65_537 + seq_len * 2 + int(causal))
    shape = (config.batch, config.heads(head_dim), seq_len, head_dim)
    return {
        name: torch.randn(shape, generator=generator, device=config.device, dtype=config.dtype)
        for name in ("q", "k", "v", "upstream")
    }


@contextlib.contextmanager
def _room_for_flex_recompiles(limit: int = 64) -> Iterator[None]:
    """FlexAttention is one compiled function: every (shape, causal, grad mode) is a recompile.

    Dynamo's default of 8 recompiles per function would make it fall back to eager (which
    materialises N x N scores) part-way through the grid and report that as FlexAttention.
    """
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    with config.patch(**{name: max(limit, getattr(config, name))}):
        yield


def _add_ratios(results: Sequence[Result]) -> None:
    flash = next((r for r in results if r.method == FLASH and r.ok and r.ms), None)
    for result in results:
        if flash is not None and result.ok and result.ms is not None:
            result.ratio_to_flash = result.ms / flash.ms


def _progress_line(index: int, total: int, cell: Cell, results: Sequence[Result], seconds: float) -> str:
    parts = []
    for r in results:
        text = f"{r.method} {r.ms:.3g} ms" if r.ok and r.ms is not None else f"{r.method} {r.status}"
        if r.first_call_s is not None and r.first_call_s >= 1.0:
            text += f" (first call {r.first_call_s:.0f} s)"
        parts.append(text)
    return f"[{index:>2}/{total}] {cell.describe():<32} {seconds:6.1f} s | " + ", ".join(parts)


def grid(
    head_dims: Sequence[int], seq_lens: Sequence[int], causal_values: Sequence[bool], modes: Sequence[str]
) -> list[Cell]:
    """Cells in run order: each (D, N, causal) group with its modes together (they share inputs)."""
    return [
        Cell(d, n, c, m) for d in head_dims for n in seq_lens for c in causal_values for m in modes
    ]


def run_benchmark(
    cells: Sequence[Cell],
    methods: Sequence[Method],
    config: BenchConfig,
    *,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
    after_each_cell: Callable[[list[Result]], None] | None = None,
) -> list[Result]:
    """Measure every method in every cell; return one :class:`Result` per (cell, method).

    ``after_each_cell`` gets the results so far (to save them: a long run cut short keeps them).
    """
    loaded: dict[str, AttentionFn | str] = {}
    for method in methods:
        try:
            loaded[method.name] = method.load()
        except MethodUnavailable as error:
            loaded[method.name] = str(error)
            log(f"{method.name}: unavailable ({error})")

    uses_flex = any(m.name == "rbf-flex" for m in methods)
    results: list[Result] = []
    groups: dict[tuple[int, int, bool], list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.head_dim, cell.seq_len, cell.causal), []).append(cell)

    index = 0
    with _room_for_flex_recompiles() if uses_flex else contextlib.nullcontext():
        for (head_dim, seq_len, causal), group_cells in groups.items():
            tensors = draw_inputs(config, head_dim, seq_len, causal)
            references = _references(tensors, causal, {m.family for m in methods}, log)
            for cell in group_cells:
                index += 1
                started = time.perf_counter()
                cell_results = []
                for method in methods:
                    fn = loaded[method.name]
                    if isinstance(fn, str):
                        cell_results.append(_unavailable(cell, method, fn, config))
                        continue
                    cell_results.append(
                        measure_method(fn, method, cell, tensors, references.get(method.family), config)
                    )
                _add_ratios(cell_results)
                results.extend(cell_results)
                log(_progress_line(index, len(cells), cell, cell_results, time.perf_counter() - started))
                if after_each_cell is not None:
                    after_each_cell(results)
            del tensors, references
            _release_memory(config.device)
    return results


def _references(
    tensors: dict[str, torch.Tensor], causal: bool, families: set[str], log: Callable[[str], None]
) -> dict[str, torch.Tensor]:
    references = {}
    base_families = {EXCLUSIVE_OF.get(family, family) for family in families}
    for family in sorted(base_families):
        try:
            references[family] = chunked_reference(
                REFERENCES[family], tensors["q"], tensors["k"], tensors["v"], causal
            )
        except Exception as error:  # the timings are still worth having
            log(f"{family} reference failed, no errors reported: {_first_line(error)}")
    for family in families & EXCLUSIVE_OF.keys():
        base = references.get(EXCLUSIVE_OF[family])
        if base is not None:
            from .xsa import exclusive, own_values

            own = own_values(tensors["v"].detach().float(), base.shape[-2])
            references[family] = exclusive(base, own)
    return references


def _unavailable(cell: Cell, method: Method, why: str, config: BenchConfig) -> Result:
    return Result(
        cell.head_dim, cell.seq_len, cell.causal, cell.mode, method.name, status="unavailable",
        batch=config.batch, heads=config.heads(cell.head_dim), note=why,
    )


# ---------------------------------------------------------------------------------------------
# Targets (issue 3, "Must")
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TargetCheck:
    """One target: met (True), missed (False) or not checkable (None), and the cells that missed."""

    target: str
    checked: int = 0
    misses: list[str] = dataclasses.field(default_factory=list)

    @property
    def met(self) -> bool | None:
        if self.misses:
            return False
        return True if self.checked else None


def check_targets(results: Sequence[Result], *, method: str = "rbf-triton") -> list[TargetCheck]:
    """The issue's Must targets for ``method``, cell by cell.

    A cell where ``method`` did not run counts as a miss; a cell where the method it is compared
    with did not run is skipped (not counted as checked).
    """
    by_cell: dict[Cell, dict[str, Result]] = {}
    for r in results:
        by_cell.setdefault(r.cell, {})[r.method] = r

    fast_long = TargetCheck(f"time <= 1.0x {FLASH} at N >= 4096")
    fast_short = TargetCheck(f"time <= 1.2x {FLASH} at N < 4096")
    beats_flex = TargetCheck("faster than rbf-flex in every cell")
    accurate = TargetCheck("relative error <= 2.5e-3 (bf16 vs float32 reference)")
    lean = TargetCheck(f"peak memory <= 1.1x {FLASH}'s")

    for cell, row in by_cell.items():
        ours = row.get(method)
        if ours is None:
            continue
        where = cell.describe()
        flash, flex = row.get(FLASH), row.get("rbf-flex")
        speed = fast_long if cell.seq_len >= 4096 else fast_short
        limit = 1.0 if cell.seq_len >= 4096 else 1.2
        if not ours.ok:
            for check in (speed, beats_flex, accurate, lean):
                check.checked += 1
                check.misses.append(f"{where}: {ours.status}")
            continue
        if ours.ratio_to_flash is not None:
            speed.checked += 1
            if ours.ratio_to_flash > limit:
                speed.misses.append(f"{where}: {ours.ratio_to_flash:.2f}x")
        if flex is not None and flex.ok and flex.ms is not None:
            beats_flex.checked += 1
            if ours.ms >= flex.ms:
                beats_flex.misses.append(f"{where}: {ours.ms:.3g} vs {flex.ms:.3g} ms")
        if ours.rel_err is not None:
            accurate.checked += 1
            if not ours.rel_err <= 2.5e-3:  # written so NaN misses
                accurate.misses.append(f"{where}: {ours.rel_err:.2e}")
        if flash is not None and flash.ok and flash.peak_mib and ours.peak_mib is not None:
            lean.checked += 1
            if ours.peak_mib > 1.1 * flash.peak_mib:
                lean.misses.append(f"{where}: {ours.peak_mib:.0f} vs {flash.peak_mib:.0f} MiB")
    return [fast_long, fast_short, beats_flex, accurate, lean]


def format_target_checks(
    checks: Sequence[TargetCheck], *, method: str = "rbf-triton", max_misses_shown: int = 6
) -> str:
    """One line per target, then the cells that missed it (the first few; the JSON has all)."""
    lines = [f"Must targets for {method} (issue 3):"]
    for check in checks:
        verdict = {True: "MET", False: "MISSED", None: "NOT CHECKED"}[check.met]
        passed = check.checked - len(check.misses)
        lines.append(f"  {verdict:<11} {check.target}  ({passed}/{check.checked} cells)")
        lines.extend(f"      {miss}" for miss in check.misses[:max_misses_shown])
        if len(check.misses) > max_misses_shown:
            lines.append(f"      ... and {len(check.misses) - max_misses_shown} more")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The report: tables, JSON, plots
# ---------------------------------------------------------------------------------------------

_STATUS_TEXT = {"OOM": "OOM", "unavailable": "n/a", "error": "error"}


def _format_ms(ms: float) -> str:
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def _format_small(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}" if value >= 1 else f"{value:.2g}"


def _time_entry(r: Result) -> str:
    text = _format_ms(r.ms)
    return f"{text} {r.ratio_to_flash:.2f}x" if r.ratio_to_flash is not None else text


_TABLES: tuple[tuple[str, Callable[[Result], str | None], bool], ...] = (
    # (title, entry for an "ok" result or None if missing, one row per mode?)
    (f"Time: ms and x {FLASH} (median of triton.testing.do_bench)",
     lambda r: _time_entry(r) if r.ms is not None else None, True),
    ("Effective TFLOP/s (the same FLOP count for every method)",
     lambda r: _format_small(r.tflops) if r.tflops is not None else None, True),
    ("Peak memory, MiB beyond the inputs",
     lambda r: _format_small(r.peak_mib) if r.peak_mib is not None else None, True),
    ("Relative error of the forward output vs a float32 reference (RBF vs RBF, dot vs dot)",
     lambda r: f"{r.rel_err:.1e}" if r.rel_err is not None else None, False),
)


def _label(method: str) -> str:
    return METHODS[method].label if method in METHODS else method


def _wide_table(
    title: str, results: Sequence[Result], methods: Sequence[str],
    entry: Callable[[Result], str | None], per_mode: bool,
) -> str:
    rows: dict[tuple, dict[str, str]] = {}
    for r in results:
        key = (r.head_dim, r.seq_len, r.causal, r.mode if per_mode else "")
        cells = rows.setdefault(key, {})
        text = entry(r) if r.ok else _STATUS_TEXT.get(r.status, r.status)
        if text is not None and _replaces_entry(cells.get(r.method), text):
            cells[r.method] = text
    header = ["D", "N", "causal"] + (["mode"] if per_mode else [])
    body = [
        [str(d), str(n), "yes" if c else "no"] + ([m] if per_mode else [])
        for (d, n, c, m) in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    method_widths = [max(len(_label(m)), *(len(row.get(m, "-")) for row in rows.values())) for m in methods]
    lines = [title]
    head = "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))
    labels = "  ".join(_label(m).rjust(w) for m, w in zip(methods, method_widths, strict=True))
    lines.append(f"{head} | {labels}")
    lines.append("-" * len(lines[-1]))
    for prefix, row in zip(body, rows.values(), strict=True):
        left = "  ".join(p.rjust(w) for p, w in zip(prefix, widths, strict=True))
        right = "  ".join(row.get(m, "-").rjust(w) for m, w in zip(methods, method_widths, strict=True))
        lines.append(f"{left} | {right}")
    return "\n".join(lines)


def _replaces_entry(current: str | None, candidate: str) -> bool:
    """In a table that merges modes (errors), a number beats a status, and the first number stays."""
    if current is None:
        return True
    current_is_status = current in _STATUS_TEXT.values()
    candidate_is_status = candidate in _STATUS_TEXT.values()
    return current_is_status and not candidate_is_status


def format_tables(results: Sequence[Result], methods: Sequence[str] | None = None) -> str:
    """The report: one wide table per measure, a row per cell, a column per method."""
    if not results:
        return "No results."
    if methods is None:
        methods = list(dict.fromkeys(r.method for r in results))
    legend = "Columns: " + ", ".join(f"{_label(m)} = {m}" for m in methods)
    legend += ".  n/a = unavailable, OOM = out of memory, - = not measured."
    if results:
        first = results[0]
        legend += f"\nbatch {first.batch}, heads x D = {first.heads * first.head_dim}"
    tables = [_wide_table(title, results, methods, entry, per_mode) for title, entry, per_mode in _TABLES]
    return "\n\n".join([legend, *tables])


def format_xsa_overhead(results: Sequence[Result], *, plain: str = "rbf-triton") -> str:
    """Time of the kernel with XSA (fused, and unfused when measured) over the plain kernel, per cell.

    Empty when the run measured no XSA method next to ``plain``.
    """
    by_cell: dict[Cell, dict[str, Result]] = {}
    for r in results:
        by_cell.setdefault(r.cell, {})[r.method] = r
    columns = [name for name in ("rbf-triton-xsa", "rbf-triton-xsa-unfused")
               if any(name in methods for methods in by_cell.values())]
    if not columns:
        return ""
    labels = " | ".join(f"{_label(c):>12}" for c in columns)
    header = f"{'D':>4} {'N':>6} {'causal':>7} {'mode':>8} | {labels}"
    lines = ["XSA cost: time with exclusive self attention / time of the plain kernel (same cell)", header]
    for cell, methods in by_cell.items():
        base = methods.get(plain)
        if base is None or not base.ok:
            continue
        entries = []
        for name in columns:
            r = methods.get(name)
            entries.append(f"{r.ms / base.ms:>11.2f}x" if r is not None and r.ok else f"{'n/a':>12}")
        lines.append(f"{cell.head_dim:>4} {cell.seq_len:>6} {'yes' if cell.causal else 'no':>7} "
                     f"{cell.mode:>8} | " + " | ".join(entries))
    return "\n".join(lines)


def _json_number(value: Any) -> Any:
    # JSON has no NaN or infinity; keep them visible as text rather than failing or dropping them.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def run_metadata(config: BenchConfig, argv: Sequence[str], seconds: float) -> dict[str, Any]:
    """Where and how the numbers were taken."""
    import triton

    metadata: dict[str, Any] = {
        "command": shlex.join(["python", "-m", "rbf_tutorial.bench", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "dtype": str(config.dtype).removeprefix("torch."),
        "batch": config.batch,
        "heads_times_head_dim": config.model_dim,
        "warmup_ms": config.warmup_ms,
        "rep_ms": config.rep_ms,
        "min_repeats": config.min_repeats,
        "seed": config.seed,
        "elapsed_s": round(seconds, 1),
        "flops": "4*B*H*Nq*Nk*D forward, x0.5 causal, x3.5 forward+backward; the same for every method",
        "timing": "median of triton.testing.do_bench (L2 flushed before each call); fwd+bwd is "
        "forward + backward with a fixed upstream gradient, q/k/v grads cleared before each call",
        "peak_memory": "torch.cuda.max_memory_allocated over one call minus memory allocated before it",
        "inputs": "standard normal q, k, v and upstream gradient, drawn once per (D, N, causal) and "
        "shared by both modes and all methods",
        "reference": "float32 on the GPU (full-precision matmuls), all batches and heads, computed in "
        f"query chunks of at most {REFERENCE_CHUNK_BYTES / 2**30:.0f} GiB of scores: RBF methods "
        "against rbf_attention(backend='matmul'), dot methods against materialised softmax(q k^T/sqrt(D)) v",
    }
    if torch.device(config.device).type == "cuda" and torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(config.device)
        metadata["device"] = properties.name
        metadata["device_memory_gib"] = round(properties.total_memory / 2**30, 1)
        metadata["compute_capability"] = f"{properties.major}.{properties.minor}"
    else:
        metadata["device"] = str(config.device)
    return metadata


def write_json(
    path: Path,
    results: Sequence[Result],
    metadata: dict[str, Any],
    targets: Sequence[TargetCheck] | None = None,
) -> None:
    records = [{key: _json_number(value) for key, value in dataclasses.asdict(r).items()} for r in results]
    document: dict[str, Any] = {"metadata": metadata, "results": records}
    if targets is not None:
        document["targets"] = [{**dataclasses.asdict(check), "met": check.met} for check in targets]
    path.write_text(json.dumps(document, indent=1) + "\n")


RECORDED_H100 = Path(__file__).parent / "recorded" / "kernel_benchmark_h100.json"


def load_results(path: Path | str = RECORDED_H100) -> tuple[list[Result], dict[str, Any]]:
    """Read a ``bench.json`` back: its results and its metadata (device, versions, command, date).

    The default is the run recorded on an H100 that ships with the package, so a chapter on a
    machine without a GPU can still show real numbers, with where they came from.
    """
    document = json.loads(Path(path).read_text())
    fields = {field.name for field in dataclasses.fields(Result)}
    results = [Result(**{key: value for key, value in record.items() if key in fields})
               for record in document["results"]]
    return results, document["metadata"]


def plot_results(results: Sequence[Result], out_dir: Path, *, device_name: str = "") -> list[Path]:
    """Two PNGs, one panel per (D, causal, mode): time over flash's time vs N, and peak memory vs N."""
    if not results:
        return []
    title = f"RBF attention vs dot-product SDPA, bf16{', ' + device_name if device_name else ''}"
    ratio = time_ratio_figure(results, title=title)
    memory = _plot_grid(results, lambda r: r.peak_mib, ylabel="peak memory (MiB)", title=title)
    written = []
    for filename, figure in (("time_ratio.png", ratio), ("peak_memory.png", memory)):
        figure.savefig(out_dir / filename, dpi=120)
        written.append(out_dir / filename)
    return written


def time_ratio_figure(results: Sequence[Result], *, title: str = "") -> Any:
    """Time over dot-product flash's time vs N, one panel per (D, causal, mode); guides at 1.0 and 1.2."""
    return _plot_grid(results, lambda r: r.ratio_to_flash, ylabel=f"time / {FLASH} time", title=title,
                      skip=(FLASH,), guides=(1.0, 1.2))


def _plot_grid(
    results: Sequence[Result],
    value: Callable[[Result], float | None],
    *,
    ylabel: str,
    title: str,
    skip: Sequence[str] = (),
    guides: Sequence[float] = (),
) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state touched
    from matplotlib.ticker import FuncFormatter, NullFormatter

    panels = list(dict.fromkeys((r.head_dim, r.causal, r.mode) for r in results))
    methods = [m for m in dict.fromkeys(r.method for r in results) if m not in skip]
    colors = {m: f"C{i % 10}" for i, m in enumerate(dict.fromkeys(r.method for r in results))}
    seq_lens = sorted({r.seq_len for r in results})
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.2 * columns, 3.4 * rows + 0.6), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    handles: dict[str, Any] = {}
    for ax, (head_dim, causal, mode) in zip(axes, panels, strict=False):
        for method in methods:
            points = sorted(
                (r.seq_len, value(r)) for r in results
                if (r.method, r.head_dim, r.causal, r.mode) == (method, head_dim, causal, mode)
                and r.ok and value(r)
            )
            if points:
                (line,) = ax.plot(*zip(*points, strict=True), marker="o", color=colors[method], label=method)
                handles.setdefault(method, line)
        for level in guides:
            ax.axhline(level, color="0.4", linestyle="--" if level == 1.0 else ":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(seq_lens, [str(n) for n in seq_lens])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        # label the minor ticks at 2, 3 and 5 (times a power of ten) too: ratios span a decade or less
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}" if f"{y:.0e}"[0] in "235" else ""))
        ax.set_title(f"D={head_dim}, {'causal' if causal else 'non-causal'}, {mode}", fontsize=10)
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.25)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if handles:
        axes[0].legend(list(handles.values()), list(handles), fontsize=7)
    figure.suptitle(title)
    return figure


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _choice_list(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(part.strip() for part in text.split(",") if part.strip())
        unknown = [v for v in values if v not in choices]
        if not values or unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(map(repr, unknown)) or 'empty list'}; choose from {', '.join(choices)}"
            )
        return values

    return parse


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m rbf_tutorial.bench",
        description=(
            "Time RBF attention (Triton kernel, FlexAttention, SDPA bias/padded routes, naive cdist) "
            "side by side with dot-product SDPA (flash and cuDNN backends) on this GPU, in bf16 with "
            "B=4 and H=1024/D. Prints a table last and writes bench.json, table.txt and PNG plots to "
            "--out. Needs a CUDA GPU (--help works anywhere)."
        ),
    )
    parser.add_argument(
        "--quick", action="store_true",
        help=f"a short run: D={','.join(map(str, QUICK_HEAD_DIMS))}, N={','.join(map(str, QUICK_SEQ_LENS))}, "
        "shorter timing windows (explicit --d, --n, --warmup, --rep still win)",
    )
    parser.add_argument(
        "--methods", type=_choice_list(tuple(METHODS)), default=DEFAULT_METHODS,
        help=f"comma-separated subset of: {', '.join(METHODS)} (default: {', '.join(DEFAULT_METHODS)}; "
        f"{FLASH} is always added, since every ratio divides by its time)",
    )
    parser.add_argument("--d", type=_int_list, default=None, help="head dims, comma-separated "
                        f"(default {','.join(map(str, DEFAULT_HEAD_DIMS))})")
    parser.add_argument("--n", type=_int_list, default=None, help="sequence lengths, comma-separated "
                        f"(default {','.join(map(str, DEFAULT_SEQ_LENS))})")
    parser.add_argument("--causal", choices=("both", "true", "false"), default="both",
                        help="causal masking, non-causal, or both (default both)")
    parser.add_argument("--modes", type=_choice_list(MODES), default=MODES,
                        help=f"comma-separated subset of: {', '.join(MODES)} (default both)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="directory for bench.json, table.txt and the PNGs (default bench-results)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="do_bench warm-up, ms (default 25; 10 quick)")
    parser.add_argument("--rep", type=float, default=None, help="do_bench repetition window, ms "
                        "(default 100; 40 quick)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random inputs (default 0)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument(
        "--check-targets", action="store_true",
        help="also print which of issue 3's Must targets rbf-triton meets: <= 1.0x flash at N >= 4096, "
        "<= 1.2x below, faster than rbf-flex, relative error <= 2.5e-3, peak memory within 10%% of flash",
    )
    return parser


@dataclasses.dataclass(frozen=True)
class Plan:
    """The parsed command line, defaults resolved."""

    cells: tuple[Cell, ...]
    methods: tuple[str, ...]
    config: BenchConfig
    out_dir: Path
    check_targets: bool
    plots: bool


def plan_from_args(args: argparse.Namespace) -> Plan:
    head_dims = args.d or (QUICK_HEAD_DIMS if args.quick else DEFAULT_HEAD_DIMS)
    seq_lens = args.n or (QUICK_SEQ_LENS if args.quick else DEFAULT_SEQ_LENS)
    causal_values = {"both": (False, True), "true": (True,), "false": (False,)}[args.causal]
    methods = [name for name in METHODS if name in args.methods or name == FLASH]
    config = BenchConfig(
        warmup_ms=args.warmup if args.warmup is not None else (10.0 if args.quick else 25.0),
        rep_ms=args.rep if args.rep is not None else (40.0 if args.quick else 100.0),
        min_repeats=3 if args.quick else 5,
        seed=args.seed,
    )
    return Plan(
        cells=tuple(grid(head_dims, seq_lens, causal_values, args.modes)),
        methods=tuple(methods),
        config=config,
        out_dir=args.out,
        check_targets=args.check_targets,
        plots=not args.no_plots,
    )


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Run the benchmark from the command line; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    plan = plan_from_args(build_parser(prog).parse_args(argv))
    if not torch.cuda.is_available():
        print(
            "rbf_tutorial.bench: no CUDA GPU is visible (torch.cuda.is_available() is False), and the "
            "benchmark times GPU kernels. Run it on a machine with an NVIDIA GPU and a CUDA build of "
            "PyTorch; `--help` lists the options.",
            file=sys.stderr,
        )
        return 2
    if not triton_installed():
        print("rbf_tutorial.bench: triton is not installed; it times with triton.testing.do_bench.",
              file=sys.stderr)
        return 2

    device_name = torch.cuda.get_device_name()
    print(
        f"rbf_tutorial.bench on {device_name}: {len(plan.cells)} cells x {len(plan.methods)} methods, "
        f"torch {torch.__version__}",
        file=sys.stderr,
    )
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def save_so_far(results_so_far: list[Result]) -> None:
        metadata = run_metadata(plan.config, argv, time.perf_counter() - started)
        write_json(plan.out_dir / "bench.json", results_so_far, {**metadata, "complete": False})

    methods = [METHODS[name] for name in plan.methods]
    results = run_benchmark(plan.cells, methods, plan.config, after_each_cell=save_so_far)
    seconds = time.perf_counter() - started

    tables = format_tables(results, plan.methods)
    targets = check_targets(results) if plan.check_targets else None
    metadata = {**run_metadata(plan.config, argv, seconds), "complete": True}
    write_json(plan.out_dir / "bench.json", results, metadata, targets)
    (plan.out_dir / "table.txt").write_text(tables + "\n")
    written = [plan.out_dir / "bench.json", plan.out_dir / "table.txt"]
    if plan.plots:
        written += plot_results(results, plan.out_dir, device_name=device_name)
    print(f"\n{device_name}, {seconds:.0f} s; wrote {', '.join(str(p) for p in written)}")
    if targets is not None:
        print("\n" + format_target_checks(targets))
    overhead = format_xsa_overhead(results)
    if overhead:
        print("\n" + overhead)
    print("\n" + tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
