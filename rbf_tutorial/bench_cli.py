"""The benchmark's command line: ``python -m rbf_tutorial.bench`` (or ``rbf-tutorial bench``).

Parses the options into a :class:`Plan`, runs it (:func:`rbf_tutorial.bench.run_benchmark`), saves
``bench.json`` after every cell, and prints the target verdicts and the tables last. A grid too long
for one sitting is measured in parts: ``--append`` adds a run's cells to the ``bench.json`` already in
``--out``, and ``--merge`` combines finished ``bench.json`` files without measuring anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import bench, bench_report
from .bench import DEFAULT_METHODS, FLASH, METHODS, MODES, BenchConfig, Cell, Result
from .bench_reference import REFERENCE_CHUNK_BYTES
from .runtime import triton_installed

__all__ = ["Plan", "build_parser", "main", "plan_from_args", "run_metadata"]

DEFAULT_HEAD_DIMS: tuple[int, ...] = (64, 128)
DEFAULT_SEQ_LENS: tuple[int, ...] = (1024, 4096, 16384)
QUICK_HEAD_DIMS: tuple[int, ...] = (64,)
QUICK_SEQ_LENS: tuple[int, ...] = (1024, 4096)


def _comma_list(item: Callable[[str], Any], choices: Sequence[str] = ()) -> Callable[[str], tuple]:
    """An argparse type for ``a,b,c``: each part parsed by ``item`` and, given ``choices``, one of them."""

    def parse(text: str) -> tuple:
        try:
            values = tuple(item(part.strip()) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        if choices and any(v not in choices for v in values):
            unknown = ", ".join(repr(v) for v in values if v not in choices)
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(choices)}")
        if not choices and any(v < 1 for v in values):
            raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
        return values

    return parse


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m rbf_tutorial.bench",
        description=(
            "Time RBF attention (Triton kernel, FlexAttention, SDPA bias/padded routes, naive cdist) "
            "side by side with dot-product SDPA (flash and cuDNN backends) on this GPU, in bf16 with "
            "B=4 and H=1024/D. Every time is taken twice: eager (what a Python loop gets) and as a "
            "CUDA-graph replay (the GPU's share). Prints a progress line per cell and the tables last; "
            "writes bench.json (after every cell), table.txt and PNG plots to --out. A grid can be measured "
            "in parts (--append, or --merge afterwards). Needs a CUDA GPU (--help and --merge work anywhere)."
        ),
    )
    add = parser.add_argument
    add("--quick", action="store_true",
        help=f"a short run: D={','.join(map(str, QUICK_HEAD_DIMS))}, N={','.join(map(str, QUICK_SEQ_LENS))}, "
        "shorter timing windows (explicit --d, --n, --warmup, --rep still win)")
    add("--methods", type=_comma_list(str, tuple(METHODS)), default=DEFAULT_METHODS,
        help=f"comma-separated subset of: {', '.join(METHODS)} (default: {', '.join(DEFAULT_METHODS)}; "
        f"{FLASH} is always added, since every ratio divides by its time)")
    add("--d", type=_comma_list(int), default=None,
        help=f"head dims, comma-separated (default {','.join(map(str, DEFAULT_HEAD_DIMS))})")
    add("--n", type=_comma_list(int), default=None,
        help=f"sequence lengths, comma-separated (default {','.join(map(str, DEFAULT_SEQ_LENS))})")
    add("--causal", choices=("both", "true", "false"), default="both",
        help="causal masking, non-causal, or both (default both)")
    add("--modes", type=_comma_list(str, MODES), default=MODES,
        help=f"comma-separated subset of: {', '.join(MODES)} (default both)")
    add("--out", type=Path, default=Path("bench-results"),
        help="directory for bench.json, table.txt and the PNGs (default bench-results)")
    add("--warmup", type=float, default=None, help="do_bench warm-up, ms (default 10; 5 quick)")
    add("--rep", type=float, default=None, help="do_bench repetition window, ms (default 50; 25 quick)")
    add("--seed", type=int, default=0, help="seed for the random inputs (default 0)")
    add("--no-plots", action="store_true", help="skip the PNG plots")
    add("--targets", action="store_true", help=bench_report.TARGETS_HELP)
    parts = parser.add_mutually_exclusive_group()
    parts.add_argument("--append", action="store_true",
                       help="add this run's cells to the bench.json already in --out (a grid measured "
                       "in parts, e.g. --n 1024 then --n 4096,16384 --append): a cell measured again "
                       "replaces its old numbers, the file is saved after every cell, and the tables and "
                       "targets cover it all")
    parts.add_argument("--merge", type=Path, nargs="+", metavar="BENCH_JSON", default=(),
                       help="measure nothing: combine bench.json files of runs over parts of one grid (same "
                       "device and versions; a later file's cell replaces an earlier one's) into --out, and "
                       "print the tables (and --targets); needs no GPU")
    return parser


@dataclasses.dataclass(frozen=True)
class Plan:
    """The parsed command line, defaults resolved."""

    cells: tuple[Cell, ...]
    methods: tuple[str, ...]
    config: BenchConfig
    out_dir: Path
    targets: bool
    plots: bool
    append: bool = False  # add to OUT/bench.json rather than replace it
    merge: tuple[Path, ...] = ()  # combine these bench.json files instead of measuring


def plan_from_args(args: argparse.Namespace) -> Plan:
    quick = args.quick
    config = BenchConfig(
        warmup_ms=args.warmup if args.warmup is not None else (5.0 if quick else 10.0),
        rep_ms=args.rep if args.rep is not None else (25.0 if quick else 50.0),
        min_repeats=5 if quick else 7,
        seed=args.seed,
    )
    cells = bench.grid(args.d or (QUICK_HEAD_DIMS if quick else DEFAULT_HEAD_DIMS),
                       args.n or (QUICK_SEQ_LENS if quick else DEFAULT_SEQ_LENS),
                       {"both": (False, True), "true": (True,), "false": (False,)}[args.causal], args.modes)
    methods = tuple(name for name in METHODS if name in args.methods or name == FLASH)
    return Plan(tuple(cells), methods, config, args.out, targets=args.targets, plots=not args.no_plots,
                append=args.append, merge=tuple(args.merge))


def run_metadata(config: BenchConfig, argv: Sequence[str], seconds: float) -> dict[str, Any]:
    """Where and how the numbers were taken."""
    import triton

    cuda = torch.device(config.device).type == "cuda" and torch.cuda.is_available()
    properties = torch.cuda.get_device_properties(config.device) if cuda else None
    return {
        "command": shlex.join(["python", "-m", "rbf_tutorial.bench", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": properties.name if properties else str(config.device),
        **({"device_memory_gib": round(properties.total_memory / 2**30, 1),
            "compute_capability": f"{properties.major}.{properties.minor}"} if properties else {}),
        "dtype": str(config.dtype).removeprefix("torch."), "batch": config.batch,
        "heads_times_head_dim": config.model_dim, "warmup_ms": config.warmup_ms, "rep_ms": config.rep_ms,
        "min_repeats": config.min_repeats, "seed": config.seed, "elapsed_s": round(seconds, 1),
        "flops": "4*B*H*Nq*Nk*D forward, x0.5 causal, x3.5 forward+backward; the same for every method",
        "timing": "eager (ms): median of triton.testing.do_bench (L2 flushed before each call); fwd+bwd is "
        "forward + backward with a fixed upstream gradient, q/k/v grads cleared before each call",
        "cuda_graph_timing": "cuda_graph_ms: the same step captured once in a torch.cuda.CUDAGraph (warmed "
        "up on a side stream; grads None before capture, so the captured backward writes static buffers), "
        "its replay timed by do_bench the same way; null, the reason in cuda_graph_note, if not capturable",
        "peak_memory": "torch.cuda.max_memory_allocated over one call minus memory allocated before it",
        "inputs": "standard normal q, k, v and upstream gradient, drawn once per (D, N, causal) and "
        "shared by both modes and all methods",
        "reference": "float32 on the GPU (full-precision matmuls), all batches and heads, in query chunks "
        f"of at most {REFERENCE_CHUNK_BYTES / 2**30:.0f} GiB of scores: RBF methods against the "
        "materialising matmul route, dot methods against materialised softmax(q k^T/sqrt(D)) v",
    }


def _methods_in(results: Sequence[Result]) -> list[str]:
    """The methods a (possibly merged) run measured, in table order."""
    present = dict.fromkeys(r.method for r in results)
    return [name for name in METHODS if name in present] + [name for name in present if name not in METHODS]


def _report(results: list[Result], metadata: dict[str, Any], plan: Plan) -> None:
    """Write bench.json (with the target verdicts), table.txt and the plots; print verdicts and tables."""
    json_path, table_path = plan.out_dir / "bench.json", plan.out_dir / "table.txt"
    tables = bench_report.format_tables(results, _methods_in(results))
    targets = bench_report.check_targets(results) if plan.targets else None
    bench.write_json(json_path, results, metadata, targets)
    table_path.write_text(tables + "\n")
    written = [json_path, table_path]
    if plan.plots:
        written += bench_report.plot_results(results, plan.out_dir, device_name=metadata.get("device", ""))
    print(f"\n{metadata.get('device', '')}, {metadata.get('elapsed_s', 0):.0f} s; "
          f"wrote {', '.join(str(p) for p in written)}")
    if targets is not None:
        print("\n" + bench_report.format_target_checks(targets))
    overhead = bench_report.format_xsa_overhead(results)
    if overhead:
        print("\n" + overhead)
    print("\n" + tables)


def _merge_files(plan: Plan) -> int:
    try:
        runs = [bench.load_results(path) for path in plan.merge]
        results, metadata = bench.merge_runs(runs)
    except (OSError, ValueError, KeyError) as error:
        print(f"rbf_tutorial.bench --merge: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    print(f"rbf_tutorial.bench --merge: {len(plan.merge)} runs, {len({r.cell for r in results})} cells",
          file=sys.stderr)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    _report(results, metadata, plan)
    return 0


def _earlier_run(plan: Plan) -> tuple[list[Result], dict[str, Any]] | None:
    """With --append, the run already in OUT/bench.json (None when there is none yet)."""
    path = plan.out_dir / "bench.json"
    if not plan.append or not path.exists():
        return None
    results, metadata = bench.load_results(path)
    print(f"appending to {path}: {len({r.cell for r in results})} cells already there; a cell measured "
          "again replaces its old numbers", file=sys.stderr)
    return results, metadata


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Run the benchmark from the command line; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    plan = plan_from_args(build_parser(prog).parse_args(argv))
    if plan.merge:
        return _merge_files(plan)
    if not torch.cuda.is_available():
        print("rbf_tutorial.bench: no CUDA GPU is visible (torch.cuda.is_available() is False), and the "
              "benchmark times GPU kernels. Run it on a machine with an NVIDIA GPU and a CUDA build of "
              "PyTorch; `--help` lists the options.", file=sys.stderr)
        return 2
    if not triton_installed():
        print("rbf_tutorial.bench: triton is not installed; it times with triton.testing.do_bench.",
              file=sys.stderr)
        return 2
    try:
        earlier = _earlier_run(plan)
        if earlier:  # refuse to add to another machine's run now, not after the first cell
            bench.merge_runs([earlier, ([], run_metadata(plan.config, argv, 0.0))])
    except (OSError, ValueError, KeyError) as error:
        print(f"rbf_tutorial.bench --append: {plan.out_dir / 'bench.json'}: {error}", file=sys.stderr)
        return 2

    print(f"rbf_tutorial.bench on {torch.cuda.get_device_name()}: {len(plan.cells)} cells x "
          f"{len(plan.methods)} methods, torch {torch.__version__}", file=sys.stderr)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def with_earlier(results: list[Result], complete: bool) -> tuple[list[Result], dict[str, Any]]:
        metadata = {**run_metadata(plan.config, argv, time.perf_counter() - started), "complete": complete}
        return bench.merge_runs([earlier, (results, metadata)]) if earlier else (results, metadata)

    def save_so_far(results_so_far: list[Result]) -> None:
        bench.write_json(plan.out_dir / "bench.json", *with_earlier(results_so_far, complete=False))

    results = bench.run_benchmark(plan.cells, [METHODS[name] for name in plan.methods], plan.config,
                                  after_each_cell=save_so_far)
    _report(*with_earlier(results, complete=True), plan)
    return 0
