"""Kernel timings that measure the kernel, not the launch: device time per call from CUDA graph replay.

Each row is one op at one shape (`benchmarks.kernel_bench.make_cases`: the text stream's
per-token AdaLN on strided chunks of the (B, T, 6D) embedding, the per-sample form, a
single-stream block's [text; image] input and the per-token gated residual) with every
implementation beside a device-to-device copy of the same number of bytes:

  fused_reordered / fused_original  the Triton kernel through its custom operator, each AdaLN
                                    variant (`kernels.modulation.use_adaln_variant`); `fused`
                                    for the gated residual, which has one;
  eager                             the PyTorch reference, op by op;
  compiled_reference                torch.compile of the reference;
  inline_compiled                   the public op under PREMIER_KERNELS=inline, compiled (what
                                    the model's compiled blocks would do without the kernels).

device_us is a CUDA graph of n calls replayed (no host in it); host_us is n back-to-back calls
from Python, synchronised once, divided by n (what an eager caller pays). Inputs rotate through
enough copies that the working set is ~3x the L2 cache, so the bytes come from DRAM, as they do
in the model. On a CPU there is no device time: host_us only (the interpreter, in the smoke run).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

import kernels
from benchmarks import kernel_bench
from kernels import modulation

OPS = ("adaln_per_token", "adaln_per_sample", "adaln_cat_single_stream", "gated_residual_per_token")
GRAPH_BYTES_CAP = 8 * 2**30
"""Upper bound on the outputs one captured graph may allocate, should the pool not reuse them."""


def device_time_us(calls: list[Callable[[], Any]], out_bytes: int, target_ms: float = 20.0) -> float:
    """Median time per call of a CUDA graph that runs `calls` round-robin, in microseconds."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph: compilation, autotuning, allocator
        for c in calls * 2:
            c()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for c in calls * 2:
        c()
    end.record()
    torch.cuda.synchronize()
    per_call_ms = max(start.elapsed_time(end) / (2 * len(calls)), 1e-4)
    k = len(calls)
    n = max(k, min(int(target_ms / per_call_ms), 2000, GRAPH_BYTES_CAP // max(out_bytes, 1)))
    n = max(k, n // k * k)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n):
            calls[i % k]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / n)
    del graph
    return statistics.median(times) * 1e3


def host_time_us(calls: list[Callable[[], Any]], cuda: bool, n: int, rounds: int) -> float:
    """Median over `rounds` of n back-to-back calls from Python plus one synchronisation, per call."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for c in calls:
        c()
    sync()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(n):
            calls[i % len(calls)]()
        sync()
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times) * 1e6


def _impls(op: str, case: dict[str, Any], backend: str, compiled: dict[str, Callable]) -> dict[str, tuple]:
    """name -> (function of the case's args, the context to run it in)."""
    ref, fused = case["ref"], case["fused"]
    if op not in compiled:
        compiled[op] = torch.compile(ref, fullgraph=True, dynamic=False, backend=backend)
        compiled[op + ":inline"] = torch.compile(fused, fullgraph=True, dynamic=False, backend=backend)

    def fused_in(variant: str | None) -> Callable[[], contextlib.AbstractContextManager]:
        @contextlib.contextmanager
        def ctx() -> Iterator[None]:
            with kernels.use_backend("triton"), modulation.use_adaln_variant(variant or modulation.get_adaln_variant()):
                yield

        return ctx

    out: dict[str, tuple] = {}
    if op.startswith("adaln"):
        for variant in modulation.ADALN_VARIANTS:
            out[f"fused_{variant}"] = (fused, fused_in(variant))
    else:
        out["fused"] = (fused, fused_in(None))
    out["eager"] = (ref, contextlib.nullcontext)
    out["compiled_reference"] = (compiled[op], contextlib.nullcontext)
    out["inline_compiled"] = (compiled[op + ":inline"], lambda: kernels.use_backend("inline"))
    return out


def rotations(bytes_per_call: int, device: torch.device) -> int:
    """Copies of the inputs that make the working set ~3x the L2 cache (1 on a CPU)."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2**20
    return max(1, min(16, math.ceil(3 * l2 / bytes_per_call)))


def measure_row(
    op: str,
    batch: int,
    size: dict[str, int],
    dtype: torch.dtype,
    device: torch.device,
    backend: str,
    compiled: dict[str, Callable],
) -> dict[str, Any]:
    cuda = device.type == "cuda"
    t, l, d = size["text"], size["image"], size["dim"]
    first = kernel_bench.make_cases(batch, t, l, d, dtype, device)[op]
    nbytes = int(first["bytes"])
    k = rotations(nbytes, device)
    cases = [first] + [kernel_bench.make_cases(batch, t, l, d, dtype, device)[op] for _ in range(k - 1)]
    tensors = [a for a in first["args"] if isinstance(a, torch.Tensor)]
    out_bytes = first["ref"](*first["args"]).numel() * torch.finfo(dtype).bits // 8
    n_host, rounds = (50, 5) if cuda else (2, 2)

    def timing(calls: list[Callable[[], Any]]) -> dict[str, Any]:
        dev = device_time_us(calls, out_bytes) if cuda else None
        host = host_time_us(calls, cuda, max(n_host, len(calls)) if cuda else n_host, rounds)
        best = dev if dev is not None else host
        return {"device_us": dev, "host_us": host, "gb_per_s": nbytes / (best * 1e-6) / 1e9}

    src = [torch.empty(nbytes // 2, dtype=torch.uint8, device=device) for _ in range(k)]
    dst = [torch.empty_like(s) for s in src]
    copy = timing([lambda s=s, o=o: o.copy_(s) for s, o in zip(src, dst)])
    del src, dst

    row: dict[str, Any] = {
        "op": op,
        "batch": batch,
        "text_tokens": t,
        "image_tokens": l if op == "adaln_cat_single_stream" else 0,
        "dim": d,
        "dtype": str(dtype).removeprefix("torch."),
        "bytes": nbytes,
        "l2_rotations": k,
        "compile_backend": backend,
        "copy": copy,
        "impls": {},
    }
    with torch.inference_mode():
        expected = first["ref"](*first["args"]).float()
        unsupported = kernels.fused_unsupported(*tensors)
        for name, (fn, ctx) in _impls(op, first, backend, compiled).items():
            if name.startswith("fused") and unsupported:
                row["impls"][name] = {"device_us": None, "host_us": None, "skipped": unsupported}
                continue
            with ctx():
                result = timing([lambda fn=fn, c=c: fn(*c["args"]) for c in cases])
                result["max_abs_error"] = (fn(*first["args"]).float() - expected).abs().max().item()
            best = result["device_us"] if result["device_us"] is not None else result["host_us"]
            base = copy["device_us"] if copy["device_us"] is not None else copy["host_us"]
            result["fraction_of_copy"] = base / best
            row["impls"][name] = result
    basis = "device_us" if cuda else "host_us"
    impls = row["impls"]
    fused = {n: v[basis] for n, v in impls.items() if n.startswith("fused") and v.get(basis)}
    if fused:
        best = min(fused, key=fused.get)
        row["fastest_fused"] = best
        row["fused_speedup_vs_eager"] = impls["eager"][basis] / fused[best]
        row["fused_speedup_vs_compiled"] = impls["compiled_reference"][basis] / fused[best]
        row["fused_fraction_of_copy"] = impls[best]["fraction_of_copy"]
    print(
        f"kernel {op:26s} B={batch}: "
        + " | ".join(f"{n} {v[basis]:.1f} us" for n, v in impls.items() if v.get(basis))
        + f" | copy {copy[basis]:.1f} us ({copy['gb_per_s']:.0f} GB/s)",
        flush=True,
    )
    return row


def copy_bandwidth(device: torch.device, nbytes: int = 2 * 2**30) -> dict[str, Any]:
    """The card's achievable DRAM bandwidth: a large device-to-device copy (bytes read + written)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = device_time_us([lambda: dst.copy_(src)], 0, target_ms=50.0)
    return {"bytes": nbytes, "device_us": us, "gb_per_s": nbytes / (us * 1e-6) / 1e9}
