"""Where one eager gpu10 training step spends its time on a CUDA GPU, per attention variant.

    python docs/results/training_step_profile.py [VARIANTS [DETAILED]]     (comma-separated names)

Each variant gets the model and optimiser ``rbf-tutorial train --preset gpu10`` builds, on one fixed
random batch, and the same step (``rbf_tutorial.train.training_step``): bf16 autocast forward,
backward on the calling thread, gradient clipping, AdamW, schedule. After 25 warm-up steps (the RBF
kernels autotune there) it reports:

- wall ms per step: best of three loops of 30 steps, synchronised at the ends only;
- issue ms: the median time Python takes to hand one step to the GPU, starting from an idle GPU.
  When it is close to the wall time, the host, not the GPU, sets the speed;
- GPU ms: the sum of the step's kernel times under ``torch.profiler`` (5 steps, averaged);
- launches: kernel launches per step (``cudaLaunchKernel`` and ``cuLaunchKernelEx`` calls).

For the DETAILED variants (default dot-rope and rbf-susie-reg) it also prints the profiler's top
device and host operations, and any synchronisation ``torch.cuda.set_sync_debug_mode`` reports.
"""

import sys
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from rbf_tutorial.train import make_config, training_step
from rbf_tutorial.training_state import TrainingState

LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def profile_variant(name: str, detailed: bool) -> tuple[float, float, float, float, float]:
    config = make_config("gpu10", name)
    state = TrainingState.start(config, torch.device("cuda"))
    model = state.model
    model.train()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.model.vocab_size, (config.batch_size, config.model.context + 1),
                           generator=generator).cuda()
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")

    def step() -> None:  # the step of rbf-tutorial train, as one process on one GPU takes it
        training_step(state, model, inputs, targets, autocast=torch.autocast("cuda", dtype=torch.bfloat16),
                      max_norm=max_norm, multithreaded_backward=False)

    for _ in range(25):
        step()
    issue = []
    for _ in range(20):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        issue.append(time.perf_counter() - start)
    walls = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(30):
            step()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - start) / 30)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    events = profiler.key_averages()
    gpu_ms = sum(e.self_device_time_total for e in events
                 if e.device_type == torch.autograd.DeviceType.CUDA) / 5 / 1e3
    launches = sum(e.count for e in events if e.key in LAUNCH_CALLS) / 5
    if detailed:
        print(f"==== {name}: device operations over 5 steps")
        print(events.table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=60))
        print(f"==== {name}: host operations over 5 steps")
        print(events.table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            step()
            torch.cuda.set_sync_debug_mode(0)
        syncs = sorted({str(w.message)[:160] for w in caught if "prototype" not in str(w.message)})
        print(f"==== {name}: synchronising operations in one step: {syncs or 'none'}")
    wall_ms = min(walls) * 1e3
    issue_ms = sorted(issue)[len(issue) // 2] * 1e3
    return wall_ms, issue_ms, gpu_ms, launches, config.tokens_per_step / wall_ms * 1e3


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("training_step_profile.py needs a CUDA GPU")
    default = ["dot-rope", "rbf-rope", "rbf-susie", "rbf-susie-reg"]
    variants = sys.argv[1].split(",") if len(sys.argv) > 1 else default
    detailed = set(sys.argv[2].split(",")) if len(sys.argv) > 2 else {"dot-rope", "rbf-susie-reg"}
    rows = []
    for name in variants:
        rows.append((name, *profile_variant(name, name in detailed)))
        torch.cuda.empty_cache()
    print(f"{'variant':22s} {'wall ms':>8s} {'issue ms':>9s} {'GPU ms':>8s} {'launches':>9s} "
          f"{'tokens/s':>10s}")
    for name, wall, issue, gpu, launches, tokens_per_s in rows:
        print(f"{name:22s} {wall:8.2f} {issue:9.2f} {gpu:8.2f} {launches:9.0f} {tokens_per_s:10,.0f}")


if __name__ == "__main__":
    main()
