"""The benchmark's logic on a CPU: command line, FLOP count, error helper, references, report.

No timings are asserted: the timer and the memory meter are replaced where a run is needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch

from rbf_tutorial import bench, rbf_attention
from rbf_tutorial.reference import rbf_attention_reference

NO_GPU_ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # so these also hold on a GPU machine


def _run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rbf_tutorial.bench", *args],
        capture_output=True, text=True, env=NO_GPU_ENV, timeout=300,
    )


# --- command line ---------------------------------------------------------------------------


def test_help_works_without_a_gpu():
    completed = _run_module("--help")
    assert completed.returncode == 0, completed.stderr
    for option in ("--quick", "--methods", "--check-targets", "--out"):
        assert option in completed.stdout


def test_without_a_gpu_it_exits_2_with_a_message_and_no_traceback():
    completed = _run_module("--quick")
    assert completed.returncode == 2
    assert "no CUDA GPU is visible" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_main_returns_2_in_process_without_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--quick"]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err


def _plan(*args: str) -> bench.Plan:
    return bench.plan_from_args(bench.build_parser().parse_args(list(args)))


def test_default_plan_is_the_full_grid():
    plan = _plan()
    assert len(plan.cells) == 2 * 3 * 2 * 2
    assert {c.head_dim for c in plan.cells} == {64, 128}
    assert {c.seq_len for c in plan.cells} == {1024, 4096, 16384}
    assert {c.causal for c in plan.cells} == {False, True}
    assert {c.mode for c in plan.cells} == {"fwd", "fwd+bwd"}
    assert plan.methods == bench.DEFAULT_METHODS
    assert (plan.config.warmup_ms, plan.config.rep_ms) == (25.0, 100.0)
    assert plan.config.dtype == torch.bfloat16 and plan.config.batch == 4
    assert plan.config.heads(64) == 16 and plan.config.heads(128) == 8
    assert plan.check_targets is False and plan.plots is True


def test_quick_plan_is_small_and_explicit_options_win():
    quick = _plan("--quick")
    assert len(quick.cells) == 1 * 2 * 2 * 2
    assert {c.head_dim for c in quick.cells} == {64}
    assert {c.seq_len for c in quick.cells} == {1024, 4096}
    assert quick.config.rep_ms < 100

    custom = _plan("--quick", "--d", "128", "--n", "256,512", "--causal", "true", "--modes", "fwd",
                   "--rep", "7", "--check-targets", "--no-plots")
    assert [(c.head_dim, c.seq_len, c.causal, c.mode) for c in custom.cells] == [
        (128, 256, True, "fwd"), (128, 512, True, "fwd")
    ]
    assert custom.config.rep_ms == 7.0
    assert custom.check_targets and not custom.plots


def test_methods_keep_table_order_and_always_include_flash():
    plan = _plan("--methods", "dot-sdpa-cudnn,rbf-triton")
    assert plan.methods == ("rbf-triton", "dot-sdpa-flash", "dot-sdpa-cudnn")


@pytest.mark.parametrize(
    "args",
    [
        ["--methods", "rbf-magic"], ["--n", "0"], ["--d", "sixty-four"], ["--modes", "bwd"],
        ["--causal", "maybe"],
    ],
)
def test_bad_arguments_exit_2(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.build_parser().parse_args(args)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


# --- numbers --------------------------------------------------------------------------------


def test_flop_formula():
    # 4 * B * H * N * N * D for B=4, H=16, N=1024, D=64
    forward = 4 * 4 * 16 * 1024 * 1024 * 64
    assert forward == 17_179_869_184
    kwargs = dict(batch=4, heads=16, n_queries=1024, n_keys=1024, head_dim=64)
    assert bench.attention_flops(**kwargs, causal=False, mode="fwd") == forward
    assert bench.attention_flops(**kwargs, causal=True, mode="fwd") == forward / 2
    assert bench.attention_flops(**kwargs, causal=False, mode="fwd+bwd") == forward * 3.5
    assert bench.attention_flops(**kwargs, causal=True, mode="fwd+bwd") == forward * 3.5 / 2
    # H * D is fixed, so D=128 with 8 heads does the same work.
    wide_heads = {**kwargs, "heads": 8, "head_dim": 128}
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
    # a budget of a few query rows forces many chunks, including a ragged last one
    chunk_bytes = 2 * 3 * n_keys * 4 * 5
    out = bench.chunked_reference(bench.rbf_attention_fp32, q, k, v, causal, max_chunk_bytes=chunk_bytes)
    expected = rbf_attention_reference(q, k, v, causal=causal)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_chunked_dot_reference_matches_sdpa(causal):
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 21, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    out = bench.chunked_reference(bench.dot_attention_fp32, q, k, v, causal, max_chunk_bytes=2 * 21 * 4 * 4)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_reference_runs_with_full_float32_matmuls_and_restores_the_setting():
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this PyTorch has no per-backend fp32_precision setting")
    previous = matmul.fp32_precision
    seen = []

    def attend(q, k, v, causal):
        seen.append(matmul.fp32_precision)
        return bench.dot_attention_fp32(q, k, v, causal)

    matmul.fp32_precision = "tf32"  # as a user who allows TF32 would have it
    try:
        q = torch.randn(1, 1, 4, 8)
        bench.chunked_reference(attend, q, q, q, False)
        assert seen == ["ieee"] and matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = previous


# --- report ---------------------------------------------------------------------------------


def _synthetic_results(head_dims=(64, 128), seq_lens=(1024, 4096, 16384)) -> list[bench.Result]:
    """A full grid with made-up numbers: triton at 0.9x flash, flex at 1.6x, naive OOM at 16k."""
    factors = {"rbf-triton": 0.9, "rbf-flex": 1.6, "rbf-sdpa-bias": 2.5, "rbf-sdpa-padded": 1.8,
               "rbf-naive": 7.0, "dot-sdpa-flash": 1.0, "dot-sdpa-cudnn": 0.65}
    results = []
    for cell in bench.grid(head_dims, seq_lens, (False, True), bench.MODES):
        flash_ms = 14.0 * (cell.seq_len / 16384) ** 2 * (3.5 if cell.mode == "fwd+bwd" else 1.0)
        for method, factor in factors.items():
            result = bench.Result(cell.head_dim, cell.seq_len, cell.causal, cell.mode, method, "ok",
                                  batch=4, heads=1024 // cell.head_dim, flops=1e12)
            if method == "rbf-naive" and cell.seq_len == 16384:
                result.status = "OOM"
            elif method == "dot-sdpa-cudnn" and cell.head_dim == 128:
                result.status = "unavailable"
            else:
                result.ms = flash_ms * factor
                result.ratio_to_flash = factor
                result.tflops = 1e12 / (result.ms * 1e-3) / 1e12
                result.peak_mib = 17.0 * factor
                result.rel_err = 2e-3 if method.startswith("rbf") else 1.5e-3
            results.append(result)
    return results


def test_tables_show_every_measure_and_fit_the_budget():
    results = _synthetic_results()
    text = bench.format_tables(results, list(bench.DEFAULT_METHODS))
    assert len(text) <= 12_000, len(text)  # the device returns the last 12,000 characters of output
    for title in ("Time", "TFLOP/s", "Peak memory", "Relative error"):
        assert title in text
    for name in bench.DEFAULT_METHODS:
        method = bench.METHODS[name]
        assert method.label in text and method.name in text  # column header and legend
    assert "0.90x" in text and "1.60x" in text and "OOM" in text and "n/a" in text
    lines = text.splitlines()
    header = next(line for line in lines if line.strip().startswith("D") and "mode" in line)
    first_row = lines[lines.index(header) + 2]
    assert first_row.split()[:4] == ["64", "1024", "no", "fwd"]
    # the error table merges the two modes: one row per (D, N, causal)
    error_table = text.split("Relative error")[1]
    assert sum(1 for line in error_table.splitlines() if " | " in line) == 1 + 2 * 3 * 2


def test_target_checks_report_met_and_missed_cells():
    results = _synthetic_results()
    checks = {c.target.split()[0] + str(i): c for i, c in enumerate(bench.check_targets(results))}
    assert all(c.met for c in checks.values()), bench.format_target_checks(checks.values())

    slow = next(r for r in results if r.method == "rbf-triton" and r.seq_len == 4096 and r.mode == "fwd")
    slow.ratio_to_flash, slow.ms = 1.3, 99.0
    checks = bench.check_targets(results)
    text = bench.format_target_checks(checks)
    assert checks[0].met is False and len(checks[0].misses) == 1
    assert checks[2].met is False  # 99 ms is also slower than flex
    assert "MISSED" in text and "1.30x" in text and "MET" in text

    for r in results:
        if r.method == "rbf-triton":
            r.status = "unavailable"
    text = bench.format_target_checks(bench.check_targets(results), max_misses_shown=2)
    assert "... and 6 more" in text and "... and 22 more" in text  # 8 cells at N < 4096, 24 in all

    only_flash = [r for r in results if r.method == "dot-sdpa-flash"]
    assert all(c.met is None for c in bench.check_targets(only_flash))


# --- a whole run on the CPU, with the timer and the memory meter replaced --------------------


def _fake_rbf_one_percent_off() -> bench.Method:
    """A method whose output is the reference scaled by 1.01: its relative error is exactly 1e-2."""
    def load():
        return lambda q, k, v, causal: 1.01 * rbf_attention(q, k, v, causal=causal, backend="matmul")

    return bench.Method("rbf-fake", "fake", "rbf", load)


def test_smoke_run_on_cpu(monkeypatch, tmp_path):
    calls = []

    def fake_time(step, *, config, grad_to_none):
        step()  # the real thing calls it; this keeps the wiring honest
        calls.append(grad_to_none)
        return 2.0

    monkeypatch.setattr(bench, "time_ms", fake_time)
    monkeypatch.setattr(bench, "peak_memory_bytes", lambda step, *, config: 3 * 2**20)
    config = bench.BenchConfig(batch=1, model_dim=32, dtype=torch.float32, device="cpu")
    cells = bench.grid((16,), (8, 33), (False, True), bench.MODES)
    methods = [*bench.METHODS.values(), _fake_rbf_one_percent_off()]
    log = []
    results = bench.run_benchmark(cells, methods, config, log=log.append)

    assert len(results) == len(cells) * len(methods)
    assert sum(line.startswith("[") for line in log) == len(cells)
    assert {r.status for r in results} <= {"ok", "OOM", "unavailable", "error"}
    by_method = {}
    for r in results:
        by_method.setdefault(r.method, []).append(r)
    for r in by_method["dot-sdpa-flash"]:
        assert r.ok and r.ratio_to_flash == 1.0 and r.peak_mib == 3.0
        assert r.rel_err < 1e-5
        assert r.tflops == pytest.approx(r.flops / 2e-3 / 1e12)
    assert all(r.status == "unavailable" for r in by_method["dot-sdpa-cudnn"])  # no cuDNN on a CPU
    for r in by_method["rbf-fake"]:
        assert r.ok and r.rel_err == pytest.approx(1e-2, rel=1e-4)
    for r in by_method["rbf-naive"]:
        assert r.ok and r.rel_err < 1e-5, r.note
    # forward+backward cells clear q, k, v gradients between timed calls; forward cells have none
    assert any(g is not None and len(g) == 3 for g in calls) and any(g is None for g in calls)

    checks = bench.check_targets(results, method="rbf-fake")
    assert checks[3].met is False  # 1e-2 error misses 2.5e-3

    text = bench.format_tables(results, [m.name for m in methods])
    assert "fake" in text and "2.00 1.00x" in text

    metadata = {"command": "test"}
    bench.write_json(tmp_path / "bench.json", results, metadata)
    loaded = json.loads((tmp_path / "bench.json").read_text())
    assert len(loaded["results"]) == len(results) and loaded["metadata"] == metadata
    written = bench.plot_results(results, tmp_path)
    assert [p.name for p in written] == ["time_ratio.png", "peak_memory.png"]
    assert all(p.stat().st_size > 1000 for p in written)


def test_main_wiring_prints_the_table_last(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Fake GPU")
    properties = types.SimpleNamespace(name="Fake GPU", total_memory=80 * 2**30, major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *args: properties)
    synthetic = _synthetic_results((64,), (1024,))
    def fake_run(cells, methods, config, *, after_each_cell):
        after_each_cell(synthetic[:7])  # a partial save, as after the first cell
        assert json.loads((tmp_path / "bench.json").read_text())["metadata"]["complete"] is False
        return synthetic

    monkeypatch.setattr(bench, "run_benchmark", fake_run)

    status = bench.main(["--quick", "--check-targets", "--out", str(tmp_path), "--no-plots"])
    assert status == 0
    out = capsys.readouterr().out
    assert "Must targets" in out
    assert out.index("Must targets") < out.index("Time: ms")
    # the last line printed is the error table's last row
    assert out.rstrip().splitlines()[-1].split()[:4] == ["64", "1024", "yes", "|"]
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["metadata"]["device"] == "Fake GPU" and saved["metadata"]["complete"] is True
    assert len(saved["results"]) == len(synthetic)
    assert [t["met"] for t in saved["targets"]] == [None, True, True, True, True]  # no N >= 4096 cell
    assert saved["metadata"]["command"].startswith("python -m rbf_tutorial.bench --quick")
    assert (tmp_path / "table.txt").read_text().strip() in out


def test_xsa_overhead_divides_by_the_plain_kernel_in_the_same_cell():
    results = [r for r in _synthetic_results() if r.method == "rbf-triton"]
    extra = []
    for r in results:
        for name, factor in (("rbf-triton-xsa", 1.02), ("rbf-triton-xsa-unfused", 1.5)):
            extra.append(bench.Result(r.head_dim, r.seq_len, r.causal, r.mode, name, status="ok",
                                      ms=r.ms * factor))
    text = bench.format_xsa_overhead(results + extra)
    rows = [line for line in text.splitlines() if line[:4].strip().isdigit()]
    assert len(rows) == len(results)
    assert all(" ".join(row.split("|")[1:]).split() == ["1.02x", "1.50x"] for row in rows)
    assert bench.format_xsa_overhead(results) == ""
