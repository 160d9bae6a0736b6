"""Benchmark: every route to RBF attention side by side with dot-product SDPA, on the GPU present.

Run ``python -m rbf_tutorial.bench`` (or ``rbf-tutorial bench``); ``--help`` lists the options.

For each cell of the grid (head dim ``D``, sequence length ``N``, causal or not, forward or
forward+backward) in bfloat16 with ``B = 4`` and ``H = 1024 // D`` heads, every method runs on
the same random inputs and is measured for:

- eager time: median of :func:`triton.testing.do_bench`, L2 flushed before every call. This is what
  a Python loop calling the method gets: when the host (Python, autograd, kernel launches) is slower
  than the GPU, the GPU waits for it and the wait is counted;
- CUDA-graph time: the same step captured once in a :class:`torch.cuda.CUDAGraph` and its replay
  timed the same way. A replay launches no Python, so this is the GPU's share of a step; eager
  minus CUDA-graph time is what the host adds. A method that cannot be captured gets no number, and
  the reason;
- ``x flash``: each time over dot-product SDPA flash's time of the same kind in the same cell;
- peak memory: bytes allocated at the peak of one call, beyond what was live before it;
- relative error ``|out - ref| / |ref|`` of the forward output against a float32 reference.

This module holds the methods and the measurement; :mod:`rbf_tutorial.bench_report` turns results
into tables, target verdicts and plots (``format_tables`` and ``time_ratio_figure`` are importable
from here too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .bench_reference import family_references

__all__ = [
    "DEFAULT_METHODS", "FLASH", "METHODS", "MODES", "RECORDED_DIR", "SAME_IN_EVERY_PART", "BenchConfig",
    "Cell", "Method", "Result", "attention_flops", "grid", "load_results", "main", "measure_method",
    "merge_runs", "newest_recording", "relative_error", "run_benchmark", "write_json",
]

MODES: tuple[str, ...] = ("fwd", "fwd+bwd")

#: FlashAttention's convention: the backward pass does 2.5x the forward's matmul FLOPs.
BACKWARD_FLOP_FACTOR = 2.5
#: The reference method every ``x flash`` ratio divides by; always measured.
FLASH = "dot-sdpa-flash"
#: Where the recorded runs that ship with the package live (``kernel_benchmark_<device>.json``).
RECORDED_DIR = Path(__file__).parent / "recorded"

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Everything about a run that is not the grid: sizes fixed across cells, dtype, timing."""

    batch: int = 4
    model_dim: int = 1024  # heads = model_dim // head_dim, so every D moves the same bytes
    dtype: torch.dtype = torch.bfloat16
    device: str = "cuda"
    warmup_ms: float = 10.0
    rep_ms: float = 50.0
    min_repeats: int = 7  # slow cells still get a median over this many timed calls
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
    """One method measured in one cell. ``status`` is "ok", "OOM", "unavailable" or "error".

    ``ms`` is the eager time; ``cuda_graph_ms`` the time of a CUDA-graph replay of the same step,
    None with the reason in ``cuda_graph_note`` when it could not be taken (recordings made before
    the benchmark measured it have neither).
    """

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
    cuda_graph_ms: float | None = None
    cuda_graph_ratio_to_flash: float | None = None
    cuda_graph_note: str = ""
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
    forward = 4.0 * batch * heads * n_queries * n_keys * head_dim * (0.5 if causal else 1.0)
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


@dataclasses.dataclass(frozen=True)
class Method:
    """A contender: how to get its attention function, and how to judge it.

    ``load`` imports lazily and returns ``fn(q, k, v, causal) -> out`` (an ImportError means the
    method is unavailable here). ``context`` wraps every call (SDPA backend selection). ``family``
    picks the float32 reference its output is compared with. When ``raising_means_unavailable``,
    an exception at run time (not an OOM) means "this backend does not support these inputs here"
    rather than a bug.
    """

    name: str
    label: str  # short column header in the tables
    family: str  # "rbf", "rbf-xsa" or "dot"
    load: Callable[[], AttentionFn]
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    raising_means_unavailable: bool = False
    in_default_run: bool = True  # False: only when named in --methods


def _kernel(*, exclusive: bool = False, fused: bool = True) -> Callable[[], AttentionFn]:
    """The fused kernel's eager autograd path; with ``exclusive``, XSA in its epilogue or after it."""

    def load() -> AttentionFn:
        from rbf_tutorial.kernels import rbf_flash_attention
        from rbf_tutorial.xsa import exclusive as remove_own_value
        from rbf_tutorial.xsa import own_values

        if fused:
            return lambda q, k, v, causal: rbf_flash_attention(q, k, v, causal=causal, exclusive=exclusive)
        return lambda q, k, v, causal: remove_own_value(
            rbf_flash_attention(q, k, v, causal=causal), own_values(v, q.shape[-2]))

    return load


def _route(function_name: str) -> Callable[[], AttentionFn]:
    """A route of :mod:`rbf_tutorial.backends`, called directly: no validation layer in the timed call."""

    def load() -> AttentionFn:
        route = getattr(importlib.import_module("rbf_tutorial.backends"), function_name)
        return lambda q, k, v, causal: route(q, k, v, causal=causal)

    return load


def _dot_sdpa() -> AttentionFn:
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
        Method("rbf-triton", "triton", "rbf", _kernel()),
        Method("rbf-flex", "flex", "rbf", _route("flex_attention")),
        Method("rbf-sdpa-bias", "sdpa-bias", "rbf", _route("sdpa_bias_attention")),
        Method("rbf-sdpa-padded", "sdpa-pad", "rbf", _route("sdpa_padded_attention")),
        Method("rbf-naive", "naive", "rbf", _route("naive_attention")),
        Method(FLASH, "dot-flash", "dot", _dot_sdpa, _sdpa_backend("FLASH_ATTENTION")),
        Method("dot-sdpa-cudnn", "dot-cudnn", "dot", _dot_sdpa, _sdpa_backend("CUDNN_ATTENTION"),
               raising_means_unavailable=True),
        Method("rbf-triton-xsa", "triton-xsa", "rbf-xsa", _kernel(exclusive=True), in_default_run=False),
        Method("rbf-triton-xsa-unfused", "xsa-unfused", "rbf-xsa", _kernel(exclusive=True, fused=False),
               in_default_run=False),
    )
}
"""Every method the benchmark knows, in table order."""

DEFAULT_METHODS: tuple[str, ...] = tuple(name for name, method in METHODS.items() if method.in_default_run)


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


def _clear_grads(grads: Sequence[torch.Tensor] | None) -> None:
    for x in grads or ():
        x.grad = None


def time_ms(step: Callable[[], Any], *, config: BenchConfig,
            grad_to_none: Sequence[torch.Tensor] | None) -> float:
    """Median milliseconds per ``step()`` from :func:`triton.testing.do_bench` (L2 flushed each call).

    ``do_bench`` fits its repeats into ``rep`` ms, which leaves one sample for a 60 ms call; the
    window is stretched so every cell gets at least ``config.min_repeats``.
    """
    import triton.testing

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    rep = max(config.rep_ms, (config.min_repeats + 1) * start.elapsed_time(end))
    return float(triton.testing.do_bench(step, warmup=config.warmup_ms, rep=rep, grad_to_none=grad_to_none,
                                         return_mode="median"))


def cuda_graph_time_ms(
    step: Callable[[], torch.Tensor], *, config: BenchConfig, grads: Sequence[torch.Tensor] | None,
    check: Callable[[torch.Tensor], None],
) -> float:
    """Median milliseconds of one replay of ``step`` captured in a CUDA graph: the GPU's share.

    As PyTorch's CUDA-graph notes prescribe, ``step`` is first run on a side stream, and gradients
    are set to None before capture, so the captured backward writes them into static buffers of the
    graph's own memory pool, afresh on every replay. The output and those gradients are filled with
    NaN before a first replay, and ``check`` gets the output after it, so a capture that silently
    recorded less than the step did cannot pass for a fast one.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _clear_grads(grads)
            step()
    torch.cuda.current_stream().wait_stream(side)
    _clear_grads(grads)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = step()
        for static in (out.detach(), *(x.grad for x in grads or ())):
            static.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check(out)
        if not all(torch.isfinite(x.grad).all() for x in grads or ()):
            raise RuntimeError("the replay left a gradient unwritten (NaN): the capture missed the backward")
        return time_ms(graph.replay, config=config, grad_to_none=None)
    finally:
        graph.reset()
        _clear_grads(grads)


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


def _replay_checker(reference: torch.Tensor | None, eager_error: float | None) -> Callable[[Any], None]:
    """Rejects a replayed output that was never written (still NaN) or is less accurate than eager's."""

    def check(out: torch.Tensor) -> None:
        if not torch.isfinite(out).all():
            raise RuntimeError("the replay left the output unwritten (NaN): the capture missed work")
        error = relative_error(out, reference) if reference is not None else None
        if error is not None and eager_error is not None and not error <= 2 * eager_error + 1e-4:
            raise RuntimeError(f"the replayed output has error {error:.1e}, eager {eager_error:.1e}")

    return check


def _measure(step, grads, reference, result: Result, config: BenchConfig) -> None:
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
    result.tflops = result.flops / (result.ms * 1e-3) / 1e12
    try:
        result.cuda_graph_ms = cuda_graph_time_ms(step, config=config, grads=grads,
                                                  check=_replay_checker(reference, result.rel_err))
    except Exception as error:  # the eager numbers stand; the graph time is only missing
        result.cuda_graph_note = "OOM" if _is_out_of_memory(error) else _first_line(error)
        _release_memory(config.device)


def measure_method(
    fn: AttentionFn, method: Method, cell: Cell, tensors: dict[str, torch.Tensor],
    reference: torch.Tensor | None, config: BenchConfig,
) -> Result:
    """Warm up (compiles and autotunes), check the output, then measure memory and both times."""
    batch, heads = tensors["q"].shape[:2]
    result = Result(
        *dataclasses.astuple(cell), method.name, "ok", batch=batch, heads=heads,
        flops=attention_flops(batch=batch, heads=heads, n_queries=cell.seq_len, n_keys=cell.seq_len,
                              head_dim=cell.head_dim, causal=cell.causal, mode=cell.mode),
    )
    if cell.mode == "fwd":
        q, k, v = tensors["q"], tensors["k"], tensors["v"]
        grads: list[torch.Tensor] | None = None

        def step() -> torch.Tensor:
            return fn(q, k, v, cell.causal)
    else:
        # Views of the shared inputs that collect gradients, cleared before each timed call, so
        # gradient accumulation is never timed.
        q, k, v = (tensors[name].detach().requires_grad_() for name in "qkv")
        grads, upstream = [q, k, v], tensors["upstream"]

        def step() -> torch.Tensor:
            out = fn(q, k, v, cell.causal)
            out.backward(upstream)
            return out

    try:
        with method.context():
            _measure(step, grads, reference, result, config)
    except Exception as error:  # one failing method must not end a long run
        if _is_out_of_memory(error):
            result.status = "OOM"
        else:
            result.status = "unavailable" if method.raising_means_unavailable else "error"
        result.note = _first_line(error)
        result.ms = result.tflops = result.peak_mib = result.rel_err = None
        _release_memory(config.device)
    finally:
        _clear_grads(grads)
    return result


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def grid(
    head_dims: Sequence[int], seq_lens: Sequence[int], causal_values: Sequence[bool], modes: Sequence[str]
) -> list[Cell]:
    """Cells in run order: each (D, N, causal) group with its modes together (they share inputs)."""
    return [Cell(d, n, c, m) for d in head_dims for n in seq_lens for c in causal_values for m in modes]


def draw_inputs(config: BenchConfig, head_dim: int, seq_len: int, causal: bool) -> dict[str, torch.Tensor]:
    """Random ``q``, ``k``, ``v`` and an upstream gradient, reproducible per (D, N, causal)."""
    generator = torch.Generator(device=config.device)
    generator.manual_seed(config.seed * 1_000_003 + head_dim * 65_537 + seq_len * 2 + int(causal))
    shape = (config.batch, config.heads(head_dim), seq_len, head_dim)
    return {name: torch.randn(shape, generator=generator, device=config.device, dtype=config.dtype)
            for name in ("q", "k", "v", "upstream")}


@contextlib.contextmanager
def _room_for_flex_recompiles(limit: int = 64) -> Iterator[None]:
    """FlexAttention compiled with ``dynamic=False`` is one function specialised per shape and grad mode.

    A full grid needs 24 specialisations; past Dynamo's default of 8 recompiles it would fall back
    to eager FlexAttention (which materialises N x N scores) and report that as FlexAttention.
    """
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    with config.patch(**{name: max(limit, getattr(config, name))}):
        yield


def _add_ratios(results: Sequence[Result]) -> None:
    flash = next((r for r in results if r.method == FLASH and r.ok), None)
    for r in results:
        if flash is not None and flash.ms and r.ms is not None:
            r.ratio_to_flash = r.ms / flash.ms
        if flash is not None and flash.cuda_graph_ms and r.cuda_graph_ms is not None:
            r.cuda_graph_ratio_to_flash = r.cuda_graph_ms / flash.cuda_graph_ms


def _progress_line(index: int, total: int, cell: Cell, results: Sequence[Result], seconds: float,
                   elapsed: float) -> str:
    parts = []
    for r in results:
        if not r.ok:
            parts.append(f"{r.method} {r.status}")
            continue
        graph = f"{r.cuda_graph_ms:.3g}" if r.cuda_graph_ms is not None else "n/a"
        text = f"{r.method} {r.ms:.3g}/{graph} ms"
        if r.first_call_s is not None and r.first_call_s >= 1.0:
            text += f" (first call {r.first_call_s:.0f} s)"
        parts.append(text)
    head = f"[{index:>2}/{total}] {cell.describe():<32} {seconds:5.1f} s, {elapsed:6.0f} s in all"
    return f"{head} | eager/CUDA-graph: " + ", ".join(parts)


def run_benchmark(
    cells: Sequence[Cell], methods: Sequence[Method], config: BenchConfig, *,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
    after_each_cell: Callable[[list[Result]], None] | None = None,
) -> list[Result]:
    """Measure every method in every cell; return one :class:`Result` per (cell, method).

    Consecutive cells of one (D, N, causal) share their inputs and references (:func:`grid` orders
    them so). ``after_each_cell`` gets the results so far (to save them: a run cut short keeps them).
    """
    loaded: dict[str, AttentionFn | str] = {}
    for method in methods:
        try:
            loaded[method.name] = method.load()
        except ImportError as error:
            loaded[method.name] = f"unavailable here: {error}"
            log(f"{method.name}: {loaded[method.name]}")
    results: list[Result] = []
    inputs_of: tuple[int, int, bool] | None = None
    run_started = time.perf_counter()
    uses_flex = any(m.name == "rbf-flex" for m in methods)
    with _room_for_flex_recompiles() if uses_flex else contextlib.nullcontext():
        for index, cell in enumerate(cells, start=1):
            if inputs_of != (cell.head_dim, cell.seq_len, cell.causal):
                tensors = references = None  # free the previous inputs before drawing new ones
                _release_memory(config.device)
                inputs_of = (cell.head_dim, cell.seq_len, cell.causal)
                tensors = draw_inputs(config, *inputs_of)
                references = family_references(*(tensors[n] for n in "qkv"), cell.causal,
                                               {m.family for m in methods}, log=log)
            started = time.perf_counter()
            cell_results = []
            for method in methods:
                fn = loaded[method.name]
                if isinstance(fn, str):
                    cell_results.append(Result(*dataclasses.astuple(cell), method.name, "unavailable",
                                               config.batch, config.heads(cell.head_dim), note=fn))
                else:
                    reference = references.get(method.family)
                    cell_results.append(measure_method(fn, method, cell, tensors, reference, config))
            _add_ratios(cell_results)
            results.extend(cell_results)
            now = time.perf_counter()
            log(_progress_line(index, len(cells), cell, cell_results, now - started, now - run_started))
            if after_each_cell is not None:
                after_each_cell(results)
    return results


# ---------------------------------------------------------------------------------------------
# JSON: writing a run, reading one back
# ---------------------------------------------------------------------------------------------


def _json_number(value: Any) -> Any:
    # JSON has no NaN or infinity; keep them visible as text rather than failing or dropping them.
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def _number_from_json(value: Any) -> Any:
    return float(value) if value in ("nan", "inf", "-inf") else value


def write_json(path: Path, results: Sequence[Result], metadata: dict[str, Any],
               targets: Sequence[Any] | None = None) -> None:
    """``{"metadata", "results"[, "targets"]}``; targets are :class:`bench_report.TargetCheck`."""
    records = [{key: _json_number(value) for key, value in dataclasses.asdict(r).items()} for r in results]
    document: dict[str, Any] = {"metadata": metadata, "results": records}
    if targets is not None:
        document["targets"] = [{key: _json_number(value) for key, value in dataclasses.asdict(check).items()}
                               | {"met": check.met} for check in targets]
    # Written aside, then renamed: a run killed mid-write keeps the previous save rather than half a file.
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(document, indent=1) + "\n")
    partial.replace(path)


def newest_recording() -> Path:
    """The most recent ``recorded/kernel_benchmark_*.json`` by its metadata date."""
    def date(path: Path) -> str:
        return str(json.loads(path.read_text())["metadata"].get("date", ""))

    recordings = sorted(RECORDED_DIR.glob("kernel_benchmark_*.json"), key=date)
    if not recordings:
        raise FileNotFoundError(f"no kernel_benchmark_*.json in {RECORDED_DIR}")
    return recordings[-1]


def load_results(path: Path | str | None = None) -> tuple[list[Result], dict[str, Any]]:
    """Read a ``bench.json`` back: its results and its metadata (device, versions, command, date).

    ``None`` reads the newest run recorded on a GPU that ships with the package, so a chapter on a
    machine without one can still show real numbers, with where they came from. Fields a recording
    lacks (older ones have no CUDA-graph times) keep their defaults; fields this version does not
    know are ignored.
    """
    document = json.loads(Path(path if path is not None else newest_recording()).read_text())
    fields = {field.name for field in dataclasses.fields(Result)}
    results = [Result(**{key: _number_from_json(value) for key, value in record.items() if key in fields})
               for record in document["results"]]
    return results, document["metadata"]


#: Metadata that must agree for runs to be shown as one: the machine, the software, the sizes.
SAME_IN_EVERY_PART: tuple[str, ...] = ("device", "torch", "triton", "cuda", "dtype", "batch",
                                       "heads_times_head_dim")


Run = tuple[Sequence[Result], dict[str, Any]]  # results and metadata, as load_results returns them


def merge_runs(runs: Sequence[Run]) -> tuple[list[Result], dict[str, Any]]:
    """Runs over parts of one grid (``--n 1024`` then ``--n 4096,16384``) as one run, in grid order.

    A cell measured again in a later run replaces the earlier one whole, never method by method,
    so every ``x flash`` ratio still divides by the flash time measured next to it. The runs must
    agree on :data:`SAME_IN_EVERY_PART` where both state it. The metadata is every run's (a later
    run's value wins); ``parts`` lists each part's command, date, duration and completeness,
    ``command`` joins the commands with ``" ; "``, ``elapsed_s`` is their sum, and ``complete``
    holds only when every part finished.
    """
    if not runs:
        raise ValueError("runs: expected at least one (results, metadata) pair")
    for field in SAME_IN_EVERY_PART:
        values = list(dict.fromkeys(str(metadata[field]) for _, metadata in runs if field in metadata))
        if len(values) > 1:
            raise ValueError(f"runs: cannot merge runs made with different {field}: {', '.join(values)}")
    cells: dict[Cell, list[Result]] = {}
    for results, _ in runs:
        measured: dict[Cell, list[Result]] = {}
        for r in results:
            measured.setdefault(r.cell, []).append(r)
        cells.update(measured)
    in_grid_order = sorted(cells, key=lambda c: (c.head_dim, c.seq_len, c.causal, MODES.index(c.mode)))
    parts = [part for _, metadata in runs for part in metadata.get("parts") or [
        {key: metadata.get(key) for key in ("command", "date", "elapsed_s", "complete")}]]
    merged = {key: value for _, metadata in runs for key, value in metadata.items()}  # later runs win
    merged |= {"parts": parts, "command": " ; ".join(str(p["command"]) for p in parts),
               "elapsed_s": round(sum(p["elapsed_s"] or 0.0 for p in parts), 1),
               "complete": all(p["complete"] is not False for p in parts)}
    return [r for cell in in_grid_order for r in cells[cell]], merged


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Run the benchmark from the command line (:mod:`rbf_tutorial.bench_cli`); returns the exit status."""
    from .bench_cli import main as command_line

    return command_line(argv, prog=prog)


# The report lives in bench_report (which imports this module); these names stay reachable from here,
# where chapter 03 has always found them.
_REPORT_NAMES = ("format_tables", "format_target_checks", "check_targets", "plot_results",
                 "time_ratio_figure")


def __getattr__(name: str) -> Any:
    if name in _REPORT_NAMES:
        from . import bench_report

        return getattr(bench_report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
