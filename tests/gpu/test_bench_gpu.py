"""The benchmark's measurement on a GPU: a tiny run end to end, in two parts. Skipped without CUDA.

What the CPU tests replace (do_bench, CUDA-graph capture and replay, peak memory) runs for real here.
Speed is not asserted; that the numbers exist, are positive and come from correct outputs is.
"""

from __future__ import annotations

from rbf_tutorial import bench

METHODS = ["rbf-triton", "rbf-flex", "dot-sdpa-flash", "dot-sdpa-cudnn", "rbf-triton-xsa"]
CAPTURABLE = ("rbf-triton", "dot-sdpa-flash", "rbf-triton-xsa")  # no host sync anywhere in their step


def test_quick_run_gives_eager_and_cuda_graph_times_and_an_accurate_kernel(tmp_path, capsys):
    common = ["--quick", "--n", "1024", "--methods", ",".join(METHODS), "--out", str(tmp_path), "--no-plots"]
    assert bench.main([*common, "--causal", "false"]) == 0
    assert bench.main([*common, "--causal", "true", "--append", "--targets"]) == 0  # the second part
    out = capsys.readouterr().out
    assert "Targets for rbf-triton" in out and "CUDA-graph time: ms" in out
    results, metadata = bench.load_results(tmp_path / "bench.json")
    assert metadata["complete"] is True and len(metadata["parts"]) == 2
    assert len(results) == 4 * len(METHODS)  # D=64, N=1024, causal or not, fwd and fwd+bwd
    for r in results:
        if r.method in CAPTURABLE:
            assert r.ok, (r.method, r.cell, r.note)
            assert r.cuda_graph_ms is not None, (r.method, r.cell, r.cuda_graph_note)
        if r.ok:
            assert r.ms > 0 and r.peak_mib > 0 and r.first_call_s > 0, r
            # a capture either gives a positive time or says why it could not
            assert (r.cuda_graph_ms is not None and r.cuda_graph_ms > 0) or r.cuda_graph_note, r
        if r.method == "rbf-triton":
            assert r.rel_err <= 2.5e-3, (r.cell, r.rel_err)
    flash = [r for r in results if r.method == "dot-sdpa-flash"]
    assert all(r.ratio_to_flash == 1.0 and r.cuda_graph_ratio_to_flash == 1.0 for r in flash)
