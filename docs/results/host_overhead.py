"""Host time at N = 1024 on a CUDA GPU: the kernel's direct launch, Triton's own launch path, and flash.

    python docs/results/host_overhead.py

For D = 64 and 128, causal and not (bf16, batch 4, heads x D = 1024), it times rbf_flash_attention
twice, once as shipped (each problem's launches prepared once, kernels/launch.py, and made through
kernels/direct_launch.py) and once with every launch sent through Triton's ``kernel[grid](...)``
path, and dot-product SDPA with the flash backend.
Columns: eager and CUDA-graph forward time (triton.testing.do_bench / do_bench_cudagraph), eager
forward + backward time, and the host's time per call (each call started on an idle GPU, median),
forward + backward also with autograd's backward on the calling thread.
"""

import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

import rbf_tutorial  # noqa: F401  (chooses compiled or interpreted kernels before triton is used)
from rbf_tutorial.kernels import direct_launch, rbf_flash_attention

DIRECT = direct_launch.PreparedLaunch.__call__


def through_triton(prepared, tensors):
    """A prepared launch made through Triton's own ``kernel[grid](...)`` path instead."""
    prepared._kernel[prepared._grid](*tensors, *prepared._ints, *prepared._floats, **prepared._constexprs,
                                     num_warps=prepared._num_warps, num_stages=prepared._num_stages)


def host_us(step, calls=200):
    """Median host time of one call, each started on an idle GPU.

    Synchronising before every call keeps the GPU's queue empty: a loop that does not would fill it
    when the GPU is the slower of the two, and then time the GPU instead of the host.
    """
    for _ in range(20):
        step()
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def main():
    rows = []
    for head_dim, causal in [(64, False), (64, True), (128, False), (128, True)]:
        heads = 1024 // head_dim
        q, k, v, grad = (torch.randn(4, heads, 1024, head_dim, device="cuda", dtype=torch.bfloat16)
                         for _ in range(4))
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        for name in ("triton-direct", "triton-path", "flash"):
            direct_launch.PreparedLaunch.__call__ = through_triton if name == "triton-path" else DIRECT
            if name == "flash":
                def attend(a, b, c, causal=causal):
                    return F.scaled_dot_product_attention(a, b, c, is_causal=causal)
                backend = torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION)
            else:
                def attend(a, b, c, causal=causal):
                    return rbf_flash_attention(a, b, c, causal=causal)
                backend = contextlib.nullcontext()

            def forward(attend=attend, inputs=(q, k, v)):
                return attend(*inputs)

            def forward_backward(attend=attend, leaves=leaves, grad=grad):
                for t in leaves:
                    t.grad = None
                attend(*leaves).backward(grad)

            with backend:
                forward(), forward_backward()
                torch.cuda.synchronize()
                row = [head_dim, causal, name, do_bench(forward, warmup=10, rep=50),
                       do_bench_cudagraph(forward, rep=50), do_bench(forward_backward, warmup=10, rep=50),
                       host_us(forward), host_us(forward_backward, 200)]
                with torch.autograd.set_multithreading_enabled(False):
                    row.append(host_us(forward_backward, 200))
            rows.append(row)
    direct_launch.PreparedLaunch.__call__ = DIRECT
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| D | causal | method | fwd ms eager | fwd ms graph | fwd+bwd ms eager | host fwd µs | "
          "host fwd+bwd µs | host fwd+bwd µs, backward on the calling thread |")
    print("|---|---|---|---|---|---|---|---|---|")
    for d, causal, name, fwd, fwd_graph, fwd_bwd, host_fwd, host_fb, host_fb_one in rows:
        print(f"| {d} | {'yes' if causal else 'no'} | {name} | {fwd:.4f} | {fwd_graph:.4f} | {fwd_bwd:.4f} | "
              f"{host_fwd:.0f} | {host_fb:.0f} | {host_fb_one:.0f} |")


if __name__ == "__main__":
    main()
