"""The benchmark's logic on a CPU: registry, command line, references, targets, tables, JSON.

No timings are asserted: the timers and the memory meter are replaced where a run is needed. What
only a GPU can do (do_bench, CUDA-graph capture) is exercised by tests/gpu/test_bench_gpu.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from rbf_tutorial import bench, bench_cli, bench_reference, bench_report
from rbf_tutorial.backends import matmul_attention
from rbf_tutorial.reference import rbf_attention_reference

NO_GPU_ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # so these also hold on a GPU machine
SHOWN = ["rbf-triton", "rbf-flex", "dot-sdpa-flash", "dot-sdpa-cudnn"]  # what chapter 03 shows


def _run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rbf_tutorial.bench", *args],
                          capture_output=True, text=True, env=NO_GPU_ENV, timeout=300)


# --- the method registry --------------------------------------------------------------------


def test_method_names_are_stable_and_every_family_has_a_reference():
    assert list(bench.METHODS) == [
        "rbf-triton", "rbf-flex", "rbf-sdpa-bias", "rbf-sdpa-padded", "rbf-naive", "dot-sdpa-flash",
        "dot-sdpa-cudnn", "rbf-triton-xsa", "rbf-triton-xsa-unfused",
    ]
    assert bench.FLASH in bench.DEFAULT_METHODS
    assert "rbf-triton-xsa" not in bench.DEFAULT_METHODS  # named in --methods only
    labels = [m.label for m in bench.METHODS.values()]
    assert len(set(labels)) == len(labels)
    for method in bench.METHODS.values():
        family = bench_reference.EXCLUSIVE_OF.get(method.family, method.family)
        assert family in bench_reference.REFERENCES, method.name


def test_flex_peer_is_the_backends_route_itself(monkeypatch):
    """No wrapper of the benchmark's own: the timed call is rbf_tutorial.backends.flex_attention."""
    calls = []
    monkeypatch.setattr("rbf_tutorial.backends.flex_attention",
                        lambda q, k, v, *, causal: calls.append(causal) or q)
    fn = bench.METHODS["rbf-flex"].load()
    q = torch.randn(1, 1, 3, 4)
    assert fn(q, q, q, True) is q and calls == [True]


# --- command line ---------------------------------------------------------------------------


def test_help_works_without_a_gpu_and_states_the_target_thresholds():
    completed = _run_module("--help")
    assert completed.returncode == 0, completed.stderr
    for option in ("--quick", "--methods", "--targets", "--out", "--no-plots"):
        assert option in completed.stdout
    assert "--check-targets" not in completed.stdout
    help_text = " ".join(completed.stdout.split())  # argparse wraps lines
    for threshold in ("2.5e-3", "1.1x dot-sdpa-flash", "N >= 4096", "1.0x dot-sdpa-flash", "rbf-flex",
                      "N = 1024, eager forward <= 1.1x", "eager forward+backward <= 1.3x"):
        assert threshold in help_text, threshold


def test_without_a_gpu_it_exits_2_with_a_message_and_no_traceback():
    completed = _run_module("--quick")
    assert completed.returncode == 2
    assert "no CUDA GPU is visible" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_main_returns_2_in_process_without_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--quick"]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err


def _plan(*args: str) -> bench_cli.Plan:
    return bench_cli.plan_from_args(bench_cli.build_parser().parse_args(list(args)))


def test_default_plan_is_the_full_grid():
    plan = _plan()
    assert len(plan.cells) == 2 * 3 * 2 * 2
    assert {c.head_dim for c in plan.cells} == {64, 128}
    assert {c.seq_len for c in plan.cells} == {1024, 4096, 16384}
    assert {c.causal for c in plan.cells} == {False, True}
    assert {c.mode for c in plan.cells} == {"fwd", "fwd+bwd"}
    assert plan.methods == bench.DEFAULT_METHODS
    assert plan.config.dtype == torch.bfloat16 and plan.config.batch == 4
    assert plan.config.heads(64) == 16 and plan.config.heads(128) == 8
    assert plan.targets is False and plan.plots is True


def test_quick_plan_is_small_and_explicit_options_win():
    quick, full = _plan("--quick"), _plan()
    assert {(c.head_dim, c.seq_len) for c in quick.cells} == {(64, 1024), (64, 4096)}
    assert quick.config.rep_ms < full.config.rep_ms

    custom = _plan("--quick", "--d", "128", "--n", "256,512", "--causal", "true", "--modes", "fwd",
                   "--rep", "7", "--targets", "--no-plots")
    assert [dataclasses.astuple(c) for c in custom.cells] == [
        (128, 256, True, "fwd"), (128, 512, True, "fwd")]
    assert custom.config.rep_ms == 7.0
    assert custom.targets and not custom.plots


def test_methods_keep_table_order_and_always_include_flash():
    assert _plan("--methods", "dot-sdpa-cudnn,rbf-triton").methods == (
        "rbf-triton", "dot-sdpa-flash", "dot-sdpa-cudnn")


@pytest.mark.parametrize("args", [
    ["--methods", "rbf-magic"], ["--methods", ","], ["--n", "0"], ["--d", "sixty-four"], ["--modes", "bwd"],
    ["--causal", "maybe"], ["--check-targets"],
])
def test_bad_arguments_exit_2(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_cli.build_parser().parse_args(args)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


# --- numbers --------------------------------------------------------------------------------


def test_flop_formula():
    forward = 4 * 4 * 16 * 1024 * 1024 * 64  # 4 B H N N D for B=4, H=16, N=1024, D=64
    kwargs = dict(batch=4, heads=16, n_queries=1024, n_keys=1024, head_dim=64)
    assert bench.attention_flops(**kwargs, causal=False, mode="fwd") == forward
    assert bench.attention_flops(**kwargs, causal=True, mode="fwd") == forward / 2
    assert bench.attention_flops(**kwargs, causal=False, mode="fwd+bwd") == forward * 3.5
    wide_heads = {**kwargs, "heads": 8, "head_dim": 128}  # H * D fixed: the same work
    assert bench.attention_flops(**wide_heads, causal=False, mode="fwd") == forward
    with pytest.raises(ValueError, match="mode"):
        bench.attention_flops(**kwargs, causal=False, mode="bwd")


def test_relative_error_by_hand():
    reference = torch.tensor([[3.0, 4.0]])  # norm 5
    out = torch.tensor([[3.0, 4.5]], dtype=torch.bfloat16)  # difference (0, 0.5): norm 0.5
    assert bench.relative_error(out, reference) == pytest.approx(0.1, rel=1e-12)
    assert bench.relative_error(reference, reference) == 0.0
    with pytest.raises(ValueError, match="shape"):
        bench.relative_error(out, reference.T)
    with pytest.raises(ValueError, match="zero norm"):
        bench.relative_error(out, torch.zeros(1, 2))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_queries, n_keys", [(37, 37), (13, 29)])
def test_chunked_rbf_reference_matches_float64(causal, n_queries, n_keys):
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, n_queries, 8, generator=generator)
    k = torch.randn(2, 3, n_keys, 8, generator=generator)
    v = torch.randn(2, 3, n_keys, 5, generator=generator)
    chunk_bytes = 2 * 3 * n_keys * 4 * 5  # a few query rows: many chunks, a ragged last one
    out = bench_reference.chunked_reference(bench_reference.rbf_attention_fp32, q, k, v, causal,
                                            max_chunk_bytes=chunk_bytes)
    torch.testing.assert_close(out.double(), rbf_attention_reference(q, k, v, causal=causal),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_chunked_dot_reference_matches_sdpa(causal):
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 21, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    out = bench_reference.chunked_reference(bench_reference.dot_attention_fp32, q, k, v, causal,
                                            max_chunk_bytes=2 * 21 * 4 * 4)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_reference_runs_with_full_float32_matmuls_and_restores_the_setting():
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this PyTorch has no per-backend fp32_precision setting")
    previous, seen = matmul.fp32_precision, []

    def attend(q, k, v, causal):
        seen.append(matmul.fp32_precision)
        return bench_reference.dot_attention_fp32(q, k, v, causal)

    matmul.fp32_precision = "tf32"  # as a user who allows TF32 would have it
    try:
        q = torch.randn(1, 1, 4, 8)
        bench_reference.chunked_reference(attend, q, q, q, False)
        assert seen == ["ieee"] and matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = previous


def test_replay_check_rejects_an_unwritten_or_less_accurate_output():
    generator = torch.Generator().manual_seed(3)
    reference = torch.randn(2, 3, 5, 4, generator=generator)
    check = bench._replay_checker(reference, eager_error=1e-3)
    check(reference * (1 + 1e-3))  # as accurate as the eager call: accepted
    with pytest.raises(RuntimeError, match="unwritten"):
        check(torch.full_like(reference, float("nan")))  # the capture recorded nothing
    with pytest.raises(RuntimeError, match="error"):
        check(reference * 1.01)  # ten times eager's error: not the same computation
    bench._replay_checker(None, None)(reference)  # no reference: only the NaN test applies


# --- synthetic runs for the report ----------------------------------------------------------

FACTORS = {"rbf-triton": 0.9, "rbf-flex": 1.6, "rbf-sdpa-bias": 2.5, "rbf-sdpa-padded": 1.8,
           "rbf-naive": 7.0, "dot-sdpa-flash": 1.0, "dot-sdpa-cudnn": 0.65}


def _synthetic_results(head_dims=(64, 128), seq_lens=(1024, 4096, 16384), graph=True) -> list[bench.Result]:
    """A full grid with made-up numbers: triton at 0.9x flash, flex at 1.6x, naive OOM at 16k,
    cuDNN unavailable at D=128; CUDA-graph times at 0.8x eager (when ``graph``), none for the SDPA bias
    route (its capture "failed")."""
    results = []
    for cell in bench.grid(head_dims, seq_lens, (False, True), bench.MODES):
        flash_ms = 14.0 * (cell.seq_len / 16384) ** 2 * (3.5 if cell.mode == "fwd+bwd" else 1.0)
        for method, factor in FACTORS.items():
            r = bench.Result(*dataclasses.astuple(cell), method, "ok", 4, 1024 // cell.head_dim, 1e12)
            if method == "rbf-naive" and cell.seq_len == 16384:
                r.status, r.note = "OOM", "OutOfMemoryError: CUDA out of memory"
            elif method == "dot-sdpa-cudnn" and cell.head_dim == 128:
                r.status = "unavailable"
            else:
                r.ms, r.ratio_to_flash, r.peak_mib = flash_ms * factor, factor, 17.0 * factor
                r.rel_err = 2e-3 if method.startswith("rbf") else 1.5e-3
                if graph and method == "rbf-sdpa-bias":
                    r.cuda_graph_note = "RuntimeError: operation not permitted when stream is capturing"
                elif graph:
                    r.cuda_graph_ms, r.cuda_graph_ratio_to_flash = 0.8 * r.ms, factor
            results.append(r)
    return results


def _table(text: str, title: str) -> list[str]:
    """The lines of the table under ``title`` (up to the next blank line)."""
    lines = text.split(title, 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    return lines


def test_tables_show_eager_and_graph_times_with_status_cells_and_fit_the_budget():
    results = _synthetic_results()
    text = bench.format_tables(results, list(bench.DEFAULT_METHODS))
    assert len(text) <= 12_000, len(text)  # the device returns the last 12,000 characters of output
    for name in bench.DEFAULT_METHODS:
        assert bench.METHODS[name].label in text and name in text  # column header and legend
    eager = _table(text, "Eager time")
    graph = _table(text, "CUDA-graph time")
    assert len(eager) == 2 + 24 and len(graph) >= 2 + 24  # header, rule, a row per cell (+ notes)
    first_row = eager[2].split()
    assert first_row[:4] == ["64", "1024", "no", "fwd"]
    assert "0.90x" in first_row and "1.60x" in first_row
    last_eager = eager[-1]  # D=128 N=16384 causal fwd+bwd: naive OOM, cuDNN n/a
    assert "OOM" in last_eager and "n/a" in last_eager
    # flash's eager time at N=1024 fwd is 14*(1/16)^2 = 0.0547 ms; its CUDA-graph time is 0.8 of that
    assert "0.055 1.00x" in eager[2] and "0.044 1.00x" in graph[2]
    assert "n/a" in graph[2]  # the bias route's capture failed ...
    assert any("rbf-sdpa-bias" in line and "not permitted when stream is capturing" in line for line in graph)
    errors = _table(text, "Relative error")
    assert len(errors) == 2 + 2 * 3 * 2  # both modes merged: a row per (D, N, causal)
    assert errors[-1].split()[-3] == "OOM"  # naive at 16k: OOM in both modes
    assert errors[2].split()[-3] == "2.0e-03"  # naive at 1k, measured


def test_tables_without_graph_numbers_say_so_rather_than_showing_dashes():
    text = bench.format_tables(_synthetic_results(graph=False), SHOWN)
    assert "CUDA-graph time: not in this run" in text
    assert "Eager time" in text and "0.90x" in text
    assert bench.format_tables([]) == "No results."


def test_targets_met_on_a_fast_run_and_not_met_with_the_worst_cell_named():
    results = _synthetic_results()
    checks = bench.check_targets(results)
    assert [c.met for c in checks] == [True] * len(bench_report.TARGETS), \
        bench_report.format_target_checks(checks)
    assert all(c.checked > 0 and c.worst for c in checks)

    def kernel(seq_len, mode, causal=False, head_dim=64):
        return next(r for r in results if (r.method, r.seq_len, r.mode, r.causal, r.head_dim)
                    == ("rbf-triton", seq_len, mode, causal, head_dim))

    def set_ratio(kernel_result, ratio):  # the targets divide times, so set the time
        flash = next(r for r in results if r.method == "dot-sdpa-flash" and r.cell == kernel_result.cell)
        kernel_result.ms = ratio * flash.ms

    set_ratio(kernel(4096, "fwd"), 1.05)
    set_ratio(kernel(16384, "fwd+bwd", causal=True), 1.7)  # also slower than flex's 1.6x
    set_ratio(kernel(1024, "fwd+bwd"), 1.5)
    set_ratio(kernel(1024, "fwd+bwd", causal=True), 1.8)
    kernel(16384, "fwd").rel_err = 3e-3
    kernel(16384, "fwd", head_dim=128).peak_mib = 40.0  # 40 / 17 MiB
    checks = bench.check_targets(results)
    error, memory, long_n, flex, short_fwd, short_fwd_bwd = checks
    assert error.met is False and error.worst == "D=64 N=16384 non-causal fwd: 3.00e-03"
    assert memory.met is False and memory.worst == "D=128 N=16384 non-causal fwd: 2.35x"
    assert long_n.met is False and len(long_n.misses) == 2
    assert long_n.worst == "D=64 N=16384 causal fwd+bwd: 1.70x"
    assert flex.met is False and flex.misses == [
        "D=64 N=1024 causal fwd+bwd: 1.12x", "D=64 N=16384 causal fwd+bwd: 1.06x"]
    assert short_fwd.met is True and short_fwd.checked == 4
    assert short_fwd_bwd.met is False and len(short_fwd_bwd.misses) == 2
    assert short_fwd_bwd.worst == "D=64 N=1024 causal fwd+bwd: 1.80x"
    text = bench_report.format_target_checks(checks)
    assert text.count("NOT MET") == 5 and "2.35x" in text and "3.00e-03" in text


def test_a_cell_where_the_kernel_did_not_run_is_not_met_and_a_missing_peer_is_skipped():
    results = _synthetic_results((64,), (1024,))
    broken = next(r for r in results if r.method == "rbf-triton" and r.mode == "fwd" and not r.causal)
    broken.status, broken.ms, broken.ratio_to_flash = "error", None, None
    for r in results:
        if r.method == "rbf-flex":
            r.status = "unavailable"
    checks = bench.check_targets(results)
    assert all(c.met is False for c in checks[:2]) and checks[0].worst == "D=64 N=1024 non-causal fwd: error"
    flex = checks[3]
    assert flex.met is False and flex.checked == 1  # only the broken cell counts: every peer is missing
    assert [c.met for c in bench.check_targets([r for r in results if r.method == "dot-sdpa-flash"])] == \
        [None] * len(bench_report.TARGETS)


def test_xsa_overhead_divides_by_the_plain_kernel_in_the_same_cell():
    plain = [r for r in _synthetic_results() if r.method == "rbf-triton"]
    extra = [bench.Result(*dataclasses.astuple(r.cell), name, "ok", ms=r.ms * factor)
             for r in plain for name, factor in (("rbf-triton-xsa", 1.02), ("rbf-triton-xsa-unfused", 1.5))]
    rows = bench_report.format_xsa_overhead(plain + extra).splitlines()[3:]
    assert len(rows) == len(plain)
    assert all(row.split()[-2:] == ["1.02x", "1.50x"] for row in rows)
    assert bench_report.format_xsa_overhead(plain) == ""


# --- JSON and the recorded runs -------------------------------------------------------------


def test_the_recorded_h100_run_loads_without_cuda_graph_fields():
    path = bench.RECORDED_DIR / "kernel_benchmark_h100.json"
    results, run = bench.load_results(path)
    assert run["device"].startswith("NVIDIA H100")
    assert run["command"].startswith("python -m rbf_tutorial.bench")
    assert len(results) == 24 * 9 and {r.method for r in results} == set(bench.METHODS)
    assert all(r.cuda_graph_ms is None and r.cuda_graph_note == "" for r in results)
    kernel = [r for r in results if r.method == "rbf-triton"]
    assert all(r.ok and r.rel_err < 2.5e-3 and r.ms > 0 for r in kernel)
    text = bench.format_tables([r for r in results if r.method in SHOWN], methods=SHOWN)
    assert "not in this run" in text and "triton" in text
    assert bench_report.time_ratio_figure(results, title="recorded") is not None
    assert len(bench.check_targets(results)) == len(bench_report.TARGETS)


def test_the_recorded_h200_run_has_eager_and_cuda_graph_times_for_every_cell():
    results, run = bench.load_results(bench.RECORDED_DIR / "kernel_benchmark_h200.json")
    assert run["device"] == "NVIDIA H200" and run["triton"] == "3.6.0"
    assert {r.method for r in results} == set(SHOWN)
    assert len(results) == 24 * len(SHOWN) and all(r.ok for r in results)
    assert all(r.ms > 0 and r.cuda_graph_ms is not None and r.cuda_graph_ms > 0 for r in results)
    # What chapter 03b asserts about it, and the verdicts docs/results/kernel-benchmark-h200.md reports.
    kernel = [r for r in results if r.method == "rbf-triton"]
    assert max(r.rel_err for r in kernel) <= 2.5e-3
    misses = {check.target: check.misses for check in bench.check_targets(results)}
    assert len(misses) == len(bench_report.TARGETS)
    flex, = (m for text, m in misses.items() if "FlexAttention" in text)
    assert flex == ["D=64 N=16384 non-causal fwd: 1.01x"]
    short_step, = (m for text, m in misses.items() if "forward+backward <= 1.3x" in text)
    assert len(short_step) == 3
    assert all(not m for text, m in misses.items() if "FlexAttention" not in text
               and "forward+backward <= 1.3x" not in text)


def test_the_packaged_default_recording_is_the_h200_run():
    assert bench.newest_recording().name == "kernel_benchmark_h200.json"


def test_default_recording_is_the_newest_present(monkeypatch, tmp_path):
    for name, date in (("kernel_benchmark_a100.json", "2026-12-01T00:00:00+00:00"),
                       ("kernel_benchmark_h200.json", "2027-01-05T00:00:00+00:00"),
                       ("kernel_benchmark_h100.json", "2026-11-22T20:10:14+00:00")):
        (tmp_path / name).write_text(json.dumps({"metadata": {"date": date, "device": name}, "results": []}))
    monkeypatch.setattr(bench, "RECORDED_DIR", tmp_path)
    assert bench.newest_recording().name == "kernel_benchmark_h200.json"
    assert bench.load_results()[1]["device"] == "kernel_benchmark_h200.json"
    monkeypatch.setattr(bench, "RECORDED_DIR", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="kernel_benchmark"):
        bench.load_results()


def test_json_round_trip_keeps_every_field_and_nan(tmp_path):
    results = _synthetic_results((64,), (1024,))
    results[0].rel_err = float("nan")
    targets = bench.check_targets(results)
    bench.write_json(tmp_path / "bench.json", results, {"command": "test"}, targets)
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # the file written aside was renamed
    text = (tmp_path / "bench.json").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    loaded, metadata = bench.load_results(tmp_path / "bench.json")
    assert metadata == {"command": "test"}
    assert math.isnan(loaded[0].rel_err)
    assert [dataclasses.asdict(r) for r in loaded[1:]] == [dataclasses.asdict(r) for r in results[1:]]
    saved_targets = json.loads(text)["targets"]
    assert [t["met"] for t in saved_targets] == [c.met for c in targets]


# --- a whole run on the CPU, with the timers and the memory meter replaced --------------------


def _fake_rbf_one_percent_off() -> bench.Method:
    """A method whose output is the reference scaled by 1.01: its relative error is exactly 1e-2."""
    return bench.Method("rbf-fake", "fake", "rbf",
                        lambda: lambda q, k, v, causal: 1.01 * matmul_attention(q, k, v, causal=causal))


def test_smoke_run_on_cpu(monkeypatch, tmp_path):
    eager_calls, graph_calls = [], []

    def fake_time(step, *, config, grad_to_none):
        step()  # the real thing calls it; this keeps the wiring honest
        eager_calls.append(grad_to_none)
        return 2.0

    def fake_graph_time(step, *, config, grads, check):
        graph_calls.append(grads)
        if grads is not None:  # as if forward+backward could not be captured
            raise RuntimeError("operation not permitted when stream is capturing")
        check(step())
        return 0.5

    monkeypatch.setattr(bench, "time_ms", fake_time)
    monkeypatch.setattr(bench, "cuda_graph_time_ms", fake_graph_time)
    monkeypatch.setattr(bench, "peak_memory_bytes", lambda step, *, config: 3 * 2**20)
    config = bench.BenchConfig(batch=1, model_dim=32, dtype=torch.float32, device="cpu")
    cells = bench.grid((16,), (33,), (False, True), bench.MODES)
    methods = [*bench.METHODS.values(), _fake_rbf_one_percent_off()]
    log = []
    results = bench.run_benchmark(cells, methods, config, log=log.append)

    assert len(results) == len(cells) * len(methods)
    progress = [line for line in log if line.startswith("[")]
    assert len(progress) == len(cells) and progress[-1].startswith(f"[{len(cells):>2}/{len(cells)}]")
    assert "s in all" in progress[0] and "rbf-triton 2/0.5 ms" in progress[0]
    by_method: dict[str, list[bench.Result]] = {}
    for r in results:
        by_method.setdefault(r.method, []).append(r)
    for r in by_method["dot-sdpa-flash"]:
        assert r.ok and r.ratio_to_flash == 1.0 and r.peak_mib == 3.0 and r.rel_err < 1e-5
        assert r.tflops == pytest.approx(r.flops / 2e-3 / 1e12)
        if r.mode == "fwd":
            assert r.cuda_graph_ms == 0.5 and r.cuda_graph_ratio_to_flash == 1.0
        else:  # a failed capture: no number, the reason, eager numbers intact
            assert r.cuda_graph_ms is None and "stream is capturing" in r.cuda_graph_note and r.ms == 2.0
    assert all(r.status == "unavailable" for r in by_method["dot-sdpa-cudnn"])  # no cuDNN on a CPU
    for name in ("rbf-triton", "rbf-naive", "rbf-sdpa-bias", "rbf-triton-xsa", "rbf-triton-xsa-unfused"):
        assert all(r.ok and r.rel_err < 1e-4 for r in by_method[name]), name
    for r in by_method["rbf-fake"]:
        assert r.ok and r.rel_err == pytest.approx(1e-2, rel=1e-4)
    # forward+backward cells clear q, k, v gradients between timed calls; forward cells have none
    assert any(g is not None and len(g) == 3 for g in eager_calls) and any(g is None for g in eager_calls)
    assert len(graph_calls) == sum(r.ok for r in results)

    assert bench.check_targets(results, method="rbf-fake")[0].met is False  # 1e-2 misses 2.5e-3
    text = bench.format_tables(results, [m.name for m in methods])
    assert "fake" in text and "2.00 1.00x" in text and "0.500 1.00x" in text

    bench.write_json(tmp_path / "bench.json", results, {"command": "test"})
    loaded, _ = bench.load_results(tmp_path / "bench.json")
    assert len(loaded) == len(results)
    written = bench.plot_results(results, tmp_path)
    assert [p.name for p in written] == ["time_ratio.png", "time_ratio_cuda_graph.png", "peak_memory.png"]
    assert all(p.stat().st_size > 1000 for p in written)
    with pytest.raises(ValueError, match="timing"):
        bench.time_ratio_figure(results, timing="host")


def _pretend_there_is_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Fake GPU")
    properties = types.SimpleNamespace(name="Fake GPU", total_memory=80 * 2**30, major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *args: properties)


def test_main_wiring_saves_after_each_cell_and_prints_the_tables_last(monkeypatch, tmp_path, capsys):
    _pretend_there_is_a_gpu(monkeypatch)
    synthetic = _synthetic_results((64,), (1024,))

    def fake_run(cells, methods, config, *, after_each_cell):
        after_each_cell(synthetic[:7])  # a partial save, as after the first cell
        assert json.loads((tmp_path / "bench.json").read_text())["metadata"]["complete"] is False
        return synthetic

    monkeypatch.setattr(bench, "run_benchmark", fake_run)
    assert bench.main(["--quick", "--targets", "--out", str(tmp_path), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "Targets for rbf-triton" in out
    assert out.index("Targets for rbf-triton") < out.index("Eager time") < out.index("CUDA-graph time")
    assert out.rstrip().splitlines()[-1].split()[:3] == ["64", "1024", "yes"]  # the error table's last row
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["metadata"]["device"] == "Fake GPU" and saved["metadata"]["complete"] is True
    assert "cuda_graph_timing" in saved["metadata"]
    assert len(saved["results"]) == len(synthetic) and "cuda_graph_ms" in saved["results"][0]
    # no N >= 4096 cell in this run: that target is not checked; the rest are met
    assert [t["met"] for t in saved["targets"]] == [True, True, None, True, True, True]
    assert saved["metadata"]["command"].startswith("python -m rbf_tutorial.bench --quick")
    assert (tmp_path / "table.txt").read_text().strip() in out


# --- a grid measured in parts: merge_runs, --append, --merge ----------------------------------


def _part(seq_lens, *, command, date, elapsed_s=100.0, complete=True, device="NVIDIA H200", **metadata):
    results = _synthetic_results((64, 128), seq_lens)
    return results, {"command": command, "date": date, "elapsed_s": elapsed_s, "complete": complete,
                     "device": device, "torch": "2.11.0", "triton": "3.6.0", "batch": 4, **metadata}


def _cells_in_order(results):
    return list(dict.fromkeys((r.head_dim, r.seq_len, r.causal, r.mode) for r in results))


def test_merging_parts_gives_one_run_in_grid_order_with_every_part_named():
    first = _part((1024,), command="bench --n 1024", date="2027-01-05T10:00:00+00:00", elapsed_s=120.0)
    second = _part((4096, 16384), command="bench --n 4096,16384 --append", date="2027-01-05T10:05:00+00:00",
                   elapsed_s=300.0, complete=False)
    results, metadata = bench.merge_runs([first, second])
    full = _synthetic_results()
    assert _cells_in_order(results) == _cells_in_order(full)  # D, N, causal, mode: not part by part
    assert [(r.cell, r.method) for r in results] == [(r.cell, r.method) for r in full]
    assert metadata["command"] == "bench --n 1024 ; bench --n 4096,16384 --append"
    assert [p["date"] for p in metadata["parts"]] == [first[1]["date"], second[1]["date"]]
    assert metadata["date"] == "2027-01-05T10:05:00+00:00" and metadata["device"] == "NVIDIA H200"
    assert metadata["elapsed_s"] == 420.0
    assert metadata["complete"] is False  # the second part was cut short
    # a merged run merges again: its parts are flattened, not nested
    third = _part((1024,), command="bench --n 1024 --d 64", date="2027-01-06T09:00:00+00:00")
    again, metadata = bench.merge_runs([(results, metadata), third])
    assert [p["command"] for p in metadata["parts"]] == [
        "bench --n 1024", "bench --n 4096,16384 --append", "bench --n 1024 --d 64"]
    assert len(again) == len(full)  # the 1024 cells were replaced, not added twice


def test_a_cell_measured_again_replaces_the_old_cell_whole():
    old_results, old_metadata = _part((1024,), command="old", date="1")
    new_results, new_metadata = _part((1024,), command="new", date="2")
    cell = bench.Cell(64, 1024, False, "fwd")
    new_results = [r for r in new_results if r.cell != cell or r.method in ("rbf-triton", bench.FLASH)]
    for r in new_results:
        r.ms = 99.0 if r.cell == cell else r.ms
    merged, _ = bench.merge_runs([(old_results, old_metadata), (new_results, new_metadata)])
    in_cell = [r for r in merged if r.cell == cell]
    # only what the newer run measured there: an old rbf-flex time would have been divided by another
    # run's flash time
    assert [(r.method, r.ms) for r in in_cell] == [("rbf-triton", 99.0), (bench.FLASH, 99.0)]
    assert len(merged) == len(old_results) - len(FACTORS) + 2
    assert all(any(r is fresh for fresh in new_results) for r in merged)  # the newer run covers every cell


def test_merging_refuses_runs_from_different_machines_or_nothing():
    h200 = _part((1024,), command="a", date="1")
    h100 = _part((4096,), command="b", date="2", device="NVIDIA H100 80GB HBM3")
    with pytest.raises(ValueError, match="different device: NVIDIA H200, NVIDIA H100"):
        bench.merge_runs([h200, h100])
    newer_torch = _part((4096,), command="b", date="2", torch="2.12.0")
    with pytest.raises(ValueError, match="different torch"):
        bench.merge_runs([h200, newer_torch])
    no_versions = (h100[0], {"command": "c", "date": "3", "elapsed_s": None, "complete": True})
    assert bench.merge_runs([h200, no_versions])[1]["device"] == "NVIDIA H200"  # unstated is no conflict
    with pytest.raises(ValueError, match="runs"):
        bench.merge_runs([])


def test_append_adds_a_part_to_the_saved_run(monkeypatch, tmp_path, capsys):
    _pretend_there_is_a_gpu(monkeypatch)
    parts = {1024: _synthetic_results((64, 128), (1024,)), 4096: _synthetic_results((64, 128), (4096,))}
    saved_mid_run = []

    def fake_run(cells, methods, config, *, after_each_cell):
        results = parts[cells[0].seq_len]
        after_each_cell(results[:len(FACTORS)])  # the first cell
        saved_mid_run.append(json.loads((tmp_path / "bench.json").read_text()))
        return results

    monkeypatch.setattr(bench, "run_benchmark", fake_run)
    assert bench.main(["--n", "1024", "--out", str(tmp_path), "--no-plots"]) == 0
    assert bench.main(["--n", "4096", "--append", "--targets", "--out", str(tmp_path), "--no-plots"]) == 0
    out = capsys.readouterr()
    assert "appending to" in out.err and "8 cells already there" in out.err
    # a cut-off second part would still have kept the first part's cells
    assert len(saved_mid_run[1]["results"]) == len(parts[1024]) + len(FACTORS)
    assert saved_mid_run[1]["metadata"]["complete"] is False
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert len(saved["results"]) == len(parts[1024]) + len(parts[4096])
    assert saved["metadata"]["complete"] is True and len(saved["metadata"]["parts"]) == 2
    assert saved["metadata"]["command"].endswith("--n 4096 --append --targets --out " + str(tmp_path) +
                                                 " --no-plots")
    # the targets judge both parts: the N >= 4096 target is checked now, in 8 cells
    long_n = saved["targets"][2]
    assert long_n["met"] is True and long_n["checked"] == 8
    table = (tmp_path / "table.txt").read_text()
    assert "1024" in table and "4096" in table


def test_append_refuses_another_machines_run_before_measuring(monkeypatch, tmp_path, capsys):
    _pretend_there_is_a_gpu(monkeypatch)
    results, metadata = _part((1024,), command="x", date="1", device="NVIDIA H100 80GB HBM3")
    bench.write_json(tmp_path / "bench.json", results, metadata)
    monkeypatch.setattr(bench, "run_benchmark", lambda *args, **kwargs: pytest.fail("measured anyway"))
    assert bench.main(["--n", "4096", "--append", "--out", str(tmp_path)]) == 2
    assert "different device: NVIDIA H100 80GB HBM3, Fake GPU" in capsys.readouterr().err
    assert bench.load_results(tmp_path / "bench.json")[1]["device"] == "NVIDIA H100 80GB HBM3"  # untouched


def test_without_append_a_run_replaces_the_saved_one(monkeypatch, tmp_path):
    _pretend_there_is_a_gpu(monkeypatch)
    monkeypatch.setattr(bench, "run_benchmark", lambda cells, methods, config, *, after_each_cell:
                        _synthetic_results((64,), (cells[0].seq_len,)))
    bench.main(["--n", "1024", "--out", str(tmp_path), "--no-plots"])
    bench.main(["--n", "4096", "--out", str(tmp_path), "--no-plots"])
    results, metadata = bench.load_results(tmp_path / "bench.json")
    assert {r.seq_len for r in results} == {4096} and "parts" not in metadata


def test_merge_combines_saved_runs_without_a_gpu(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    files = []
    for seq_lens, date in (((1024,), "2027-01-05T10:00"), ((4096, 16384), "2027-01-05T10:05")):
        results, metadata = _part(seq_lens, command=f"bench --n {seq_lens[0]}", date=date)
        files.append(tmp_path / f"part{len(files)}.json")
        bench.write_json(files[-1], results, metadata)
    out_dir = tmp_path / "merged"
    assert bench.main(["--merge", *map(str, files), "--out", str(out_dir), "--targets", "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "Targets for rbf-triton" in printed and printed.count("NOT MET") == 0
    results, metadata = bench.load_results(out_dir / "bench.json")
    assert _cells_in_order(results) == _cells_in_order(_synthetic_results())
    assert metadata["command"] == "bench --n 1024 ; bench --n 4096"
    assert (out_dir / "table.txt").read_text().strip() in printed

    assert bench.main(["--merge", str(tmp_path / "missing.json"), "--out", str(out_dir)]) == 2
    assert "missing.json" in capsys.readouterr().err
    other = tmp_path / "h100.json"
    results, metadata = _part((1024,), command="x", date="3", device="NVIDIA H100")
    bench.write_json(other, results, metadata)
    assert bench.main(["--merge", str(files[0]), str(other), "--out", str(out_dir)]) == 2
    assert "different device" in capsys.readouterr().err


def test_append_and_merge_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        bench_cli.build_parser().parse_args(["--append", "--merge", "a.json"])
    assert "not allowed with" in capsys.readouterr().err
    assert _plan("--merge", "a.json", "b.json").merge == (Path("a.json"), Path("b.json"))
    assert _plan("--append").append and not _plan().append
