"""The ops against their baselines at AlexNet's and VGG16's pool boundaries, with the machine's own
ceilings measured in the same run. Prints a table, writes JSON (``--json``).

    python bench/bench_kernels.py                       # CPU, small batches
    python bench/bench_kernels.py --json out.json
    python bench/bench_kernels.py --device cuda --batch 64 --precisions fp32,tf32,bf16
    python bench/bench_kernels.py --device cuda --batch 64 --rows fused --point-seeds 2304   # the GPU check's

Rows (each timed interleaved with its baselines, same inputs, medians of ``--rounds``; every native
result is checked against the reference first, so a wrong kernel cannot post a number):
  * max_pool2d_switches, unpool_relu, deconv2d, unpool_relu_deconv2d: native vs ``deconvcuda.reference``
    (the pure-PyTorch twin) and vs PyTorch's own chain (``torch``: max_pool2d_with_indices,
    max_pool2d's backward + relu, conv_transpose2d; the fused op's chain is the three of them);
  * fused vs dense: ``unpool_relu_deconv2d`` against native ``unpool_relu`` + ``deconv2d`` (oneDNN /
    cuDNN): the ratio says which path is faster at that shape, device and dtype. ``--rows fused`` times
    these rows only (no pools, no reference or PyTorch baselines). ``--point-seeds P`` adds the
    windows that point projections run the fused op on (AlexNet conv5 and VGG16 conv5_3 / conv3_3
    seeds), recorded from real projections on the CPU, with P projections in a batch.
Ceilings: copy bandwidth (``copy_`` of a 256 MiB tensor into another: bytes read + written per second) and matmul
FLOP/s (a large square ``mm`` in the dtype), both measured here. GB/s counts each input and output
once; GFLOP/s of the fused op counts the multiply-adds it does (one filter tap per routed unpooled
value) and, as "dense GFLOP/s", those of the dense transposed convolution it replaces.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import deconvcuda  # noqa: E402
from deconvcuda import ops, reference  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Boundary:
    """conv (C_in -> C_out, k x k, stride, padding) -> relu -> max pool (pk, ps) over [N, C_in, S, S]."""
    name: str
    c_in: int
    c_out: int
    kernel: int
    stride: int
    padding: int
    size: int
    pool_kernel: int
    pool_stride: int
    cpu_batch: int

    def conv_out(self) -> int:
        return (self.size + 2 * self.padding - self.kernel) // self.stride + 1

    def pooled(self) -> int:
        return (self.conv_out() - self.pool_kernel) // self.pool_stride + 1


BOUNDARIES = [
    Boundary("alexnet conv1>pool1", 3, 64, 11, 4, 2, 224, 3, 2, 4),
    Boundary("alexnet conv2>pool2", 64, 192, 5, 1, 2, 27, 3, 2, 4),
    Boundary("alexnet conv5>pool5", 256, 256, 3, 1, 1, 13, 3, 2, 16),
    Boundary("vgg16 conv1_2>pool1", 64, 64, 3, 1, 1, 224, 2, 2, 1),
    Boundary("vgg16 conv2_2>pool2", 128, 128, 3, 1, 1, 112, 2, 2, 1),
    Boundary("vgg16 conv3_3>pool3", 256, 256, 3, 1, 1, 56, 2, 2, 1),
    Boundary("vgg16 conv4_3>pool4", 512, 512, 3, 1, 1, 28, 2, 2, 2),
    Boundary("vgg16 conv5_3>pool5", 512, 512, 3, 1, 1, 14, 2, 2, 4),
]
# unpool_relu / max_pool2d_switches shapes of issue 7 (AlexNet's pool1 over 96 maps, as in the paper)
POOL_SHAPES = [("alexnet pool1", 96, 55, 3, 2, 16), ("alexnet pool5", 256, 13, 3, 2, 64),
               ("vgg16 pool4", 512, 28, 2, 2, 8), ("vgg16 pool1", 64, 224, 2, 2, 2)]

PRECISIONS = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
              "fp64": torch.float64}


@contextlib.contextmanager
def precision(name: str):
    """TF32 on for "tf32" only (cuDNN convolutions and matmuls); everything else in full precision."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


#: The clock: wall time, or (``--cpu-time``) this process's CPU time, which on a machine shared with
#: other work counts only the cycles this process got (with one thread it is the op's own time).
CLOCK = time.perf_counter


def time_interleaved(functions: Dict[str, Callable[[], object]], device: str, rounds: int,
                     warmup: int = 1, reduce: Callable[[List[float]], float] = statistics.median) -> Dict[str, float]:
    """Median (or ``reduce``) seconds of each function, the functions run in turn each round (so
    that load on a shared machine falls on all of them alike)."""
    for _ in range(warmup):
        for fn in functions.values():
            fn()
        sync(device)
    samples: Dict[str, List[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, fn in functions.items():
            sync(device)
            start = CLOCK()
            fn()
            sync(device)
            samples[name].append(CLOCK() - start)
    return {name: reduce(values) for name, values in samples.items()}


def ceilings(device: str, dtype: torch.dtype, rounds: int) -> Dict[str, float]:
    """Copy bandwidth (GB/s, read + write) and matmul throughput (GFLOP/s) of this device, now."""
    big = torch.empty(64 * 2**20, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(big)  # allocated once: the copy times the memory, not page faults
    # ceilings are the best the machine did, not the typical: the fastest round
    copy_s = time_interleaved({"copy": lambda: target.copy_(big)}, device, rounds, reduce=min)["copy"]
    n = 8192 if device.startswith("cuda") else 3072
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    mm_s = time_interleaved({"mm": lambda: a @ b}, device, rounds, reduce=min)["mm"]
    return {"copy_GBps": 2 * big.numel() * 4 / copy_s / 1e9, "matmul_GFLOPps": 2 * n**3 / mm_s / 1e9}


def check(actual: torch.Tensor, expected: torch.Tensor, what: str, rel: float) -> None:
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rel, atol=rel * max(scale, 1e-30),
                               msg=lambda m: f"{what}: native result does not match the reference\n{m}")


def boundary_inputs(b: Boundary, n: int, device: str, dtype: torch.dtype, generator: torch.Generator):
    """A real forward: x -> conv -> relu -> max pool; grad random at the pool output (half of it
    rectified away by the reverse relu, as for a random seed)."""
    x = torch.randn(n, b.c_in, b.size, b.size, generator=generator).to(device, dtype)
    weight = (torch.randn(b.c_out, b.c_in, b.kernel, b.kernel, generator=generator)
              * (2 / (b.c_in * b.kernel**2)) ** 0.5).to(device, dtype)
    pre_pool = torch.relu(F.conv2d(x, weight, None, b.stride, b.padding))
    pooled, switches = ops.max_pool2d_switches(pre_pool, b.pool_kernel, b.pool_stride)
    _, indices = F.max_pool2d_with_indices(pre_pool, b.pool_kernel, b.pool_stride)
    grad = torch.randn(pooled.shape, generator=generator).to(device, dtype)
    return x, weight, pre_pool, pooled, switches, indices, grad


#: (model, layer, image size): point projections whose fused calls --point-seeds records
POINT_SEED_PROJECTIONS = [("alexnet", "features.11", 224), ("vgg16", "features.29", 224), ("vgg16", "features.15", 224)]


@dataclasses.dataclass(frozen=True)
class Window:
    """One unpool_relu_deconv2d call of a point projection: grad [P, C_out, *pooled], weight, and the
    op's size and geometry arguments after weight (input_size, kernel_size, ..., output_size)."""
    name: str
    grad_shape: tuple
    weight_shape: tuple
    args: tuple


def point_seed_windows() -> List[Window]:
    """The distinct fused calls of one point projection of each of POINT_SEED_PROJECTIONS, recorded
    where the engine makes them (deconvcuda.dispatch.Dispatcher), on the CPU with random weights:
    window shapes depend on the layers' geometry and the image size only."""
    from deconvcuda import dispatch

    windows: Dict[tuple, Window] = {}
    recorded = dispatch.Dispatcher.unpool_relu_deconv2d

    for model_name, layer, size in POINT_SEED_PROJECTIONS:
        def record(self, grad, switches, weight, *args, **kwargs):
            sizes = tuple(tuple(a) if isinstance(a, (list, tuple)) else a for a in args[:10])
            key = (tuple(grad.shape[1:]), tuple(weight.shape), sizes)
            name = (f"{model_name} {layer} point {weight.shape[0]}>{weight.shape[1] * sizes[8]} "
                    f"{grad.shape[2]}x{grad.shape[3]}>{sizes[9][0]}x{sizes[9][1]}")
            windows.setdefault(key, Window(name, tuple(grad.shape[1:]), tuple(weight.shape), sizes))
            return recorded(self, grad, switches, weight, *args, **kwargs)

        dispatch.Dispatcher.unpool_relu_deconv2d = record
        try:
            torch.manual_seed(0)
            model = deconvcuda.models.build(model_name)
            image = torch.randn(1, 3, size, size)
            deconvcuda.project(model, image, layer, neurons=torch.tensor([[0, 0, 3, 3]]))
        finally:
            dispatch.Dispatcher.unpool_relu_deconv2d = recorded
    return list(windows.values())


def window_inputs(w: Window, batch: int, device: str, dtype: torch.dtype, generator: torch.Generator):
    """grad, switches and weight for window ``w`` with ``batch`` projections: the switches of a max
    pool over a random rectified map of the window's pool input."""
    input_size, kernel, stride, padding, dilation = w.args[:5]
    pooled = tuple(w.grad_shape[1:])
    pre_pool = torch.relu(torch.randn(batch, w.grad_shape[0], *input_size, generator=generator)).to(device, dtype)
    _, switches = ops.max_pool2d_switches(pre_pool, kernel, stride, padding, dilation)
    if tuple(switches.shape[2:]) != pooled:  # the window's pool rounds up
        _, switches = ops.max_pool2d_switches(pre_pool, kernel, stride, padding, dilation, ceil_mode=True)
    grad = torch.randn(batch, *w.grad_shape, generator=generator).to(device, dtype)
    fan_in = w.weight_shape[1] * w.weight_shape[2] * w.weight_shape[3]
    weight = (torch.randn(*w.weight_shape, generator=generator) * (2 / fan_in) ** 0.5).to(device, dtype)
    return grad, switches, weight


def fused_vs_dense_row(name: str, grad, switches, weight, args: tuple, prec: str, device: str, rounds: int,
                       rel: float, ceiling: Dict[str, float]) -> dict:
    """The fused op against unpool_relu + deconv2d on one call, both checked against the reference
    first (computed without TF32)."""
    input_size, kernel, stride, padding, dilation, conv_stride, conv_padding, conv_dilation, groups, output_size \
        = args
    pool = (kernel, stride, padding, dilation)

    def dense():
        return ops.deconv2d(ops.unpool_relu(grad, switches, input_size, *pool), weight, conv_stride, conv_padding,
                            conv_dilation, groups, output_size)

    with precision("fp32" if prec == "tf32" else prec):
        expected = reference.unpool_relu_deconv2d(grad, switches, weight, *args)
    check(ops.unpool_relu_deconv2d(grad, switches, weight, *args), expected, name, rel)
    check(dense(), expected, f"{name} (dense)", rel)
    unpooled = ops.unpool_relu(grad, switches, input_size, *pool)
    routed = int((unpooled != 0).sum().item())
    taps = weight.shape[1] * weight.shape[2] * weight.shape[3]
    dense_flops = 2 * unpooled.numel() * taps
    times = time_interleaved({"native": lambda: ops.unpool_relu_deconv2d(grad, switches, weight, *args),
                              "dense": dense}, device, rounds)
    size = grad.element_size()
    r = row("unpool_relu_deconv2d", f"{name} N={grad.shape[0]}", prec, times,
            bytes=(grad.numel() * (size + 1) + weight.numel() * size + expected.numel() * size),
            flops=2 * routed * taps, ceiling=ceiling)
    r["dense_GFLOPps"] = dense_flops / times["native"] / 1e9
    r["routed_fraction"] = routed / max(1, unpooled.numel())
    return r


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(args) -> dict:
    device = args.device
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    rows: List[dict] = []
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": device,
              "machine": cpu_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "threads": torch.get_num_threads(), "clock": "cpu time" if CLOCK is time.process_time else "wall",
              "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None, "ceilings": {}, "rows": rows}
    if device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name()
    windows = point_seed_windows() if args.point_seeds else []
    for prec in args.precisions:
        dtype = PRECISIONS[prec]
        with precision(prec):
            ceiling = ceilings(device, dtype, max(3, args.rounds))
            result["ceilings"][prec] = ceiling
            rel = 1e-4 if dtype in (torch.float32, torch.float64) and prec != "tf32" else 2e-2
            if prec == "tf32":
                rel = 5e-3
            size = dtype.itemsize
            for name, c, s, k, st, cpu_n in (POOL_SHAPES if args.rows == "all" else []):
                n = args.batch or cpu_n
                x = torch.relu(torch.randn(n, c, s, s, generator=generator)).to(device, dtype)
                out, switches = ops.max_pool2d_switches(x, k, st)
                ref_out, ref_sw = reference.max_pool2d_switches(x, k, st)
                assert torch.equal(out, ref_out) and torch.equal(switches, ref_sw), f"{name}: switches differ"
                _, indices = F.max_pool2d_with_indices(x, k, st)
                grad = torch.randn(out.shape, generator=generator).to(device, dtype)
                check(ops.unpool_relu(grad, switches, (s, s), k, st),
                      reference.unpool_relu(grad, switches, (s, s), k, st), name, rel)
                shape = f"{name} [{n},{c},{s},{s}] k{k}s{st}"
                times = time_interleaved({
                    "native": lambda: ops.max_pool2d_switches(x, k, st),
                    "reference": lambda: reference.max_pool2d_switches(x, k, st),
                    "torch": lambda: F.max_pool2d_with_indices(x, k, st)}, device, args.rounds)
                rows.append(row("max_pool2d_switches", shape, prec, times,
                                bytes=x.numel() * size + out.numel() * (size + 1), flops=0, ceiling=ceiling))
                times = time_interleaved({
                    "native": lambda: ops.unpool_relu(grad, switches, (s, s), k, st),
                    "reference": lambda: reference.unpool_relu(grad, switches, (s, s), k, st),
                    "torch": lambda: torch.relu(torch.ops.aten.max_pool2d_with_indices_backward(
                        grad, x, [k, k], [st, st], [0, 0], [1, 1], False, indices))}, device, args.rounds)
                rows.append(row("unpool_relu", shape, prec, times,
                                bytes=grad.numel() * (size + 1) + x.numel() * size, flops=0, ceiling=ceiling))
            for b in BOUNDARIES:
                n = args.batch or b.cpu_batch
                x, weight, pre_pool, pooled, switches, indices, grad = boundary_inputs(b, n, device, dtype, generator)
                hw = (b.conv_out(), b.conv_out())
                out_size = (b.size, b.size)
                pool = (b.pool_kernel, b.pool_stride)
                conv = dict(conv_stride=b.stride, conv_padding=b.padding, output_size=out_size)
                if args.rows == "fused":
                    fused_args = (hw, (b.pool_kernel,) * 2, (b.pool_stride,) * 2, (0, 0), (1, 1), (b.stride,) * 2,
                                  (b.padding,) * 2, (1, 1), 1, out_size)
                    r = fused_vs_dense_row(f"{b.name} {b.c_out}>{b.c_in} @{b.conv_out()}", grad, switches, weight,
                                           fused_args, prec, device, args.rounds, rel, ceiling)
                    rows.append(r)
                    if args.verbose:
                        print(format_row(r), flush=True)
                    continue
                unpooled = ops.unpool_relu(grad, switches, hw, *pool)
                fused = ops.unpool_relu_deconv2d(grad, switches, weight, hw, *pool, **conv)
                with precision("fp32" if prec == "tf32" else prec):
                    expected = reference.unpool_relu_deconv2d(grad, switches, weight, hw, *pool, **conv)
                check(fused, expected, b.name, rel)
                shape = f"{b.name} N={n} {b.c_out}>{b.c_in} @{b.conv_out()}"
                dense_flops = 2 * n * b.c_out * b.c_in * b.kernel**2 * b.conv_out() ** 2
                routed = int((unpooled != 0).sum().item())  # values the gather multiplies by a filter tap
                gather_flops = 2 * routed * b.c_in * b.kernel**2
                times = time_interleaved({
                    "native": lambda: ops.deconv2d(unpooled, weight, b.stride, b.padding, output_size=out_size),
                    "reference": lambda: reference.deconv2d(unpooled, weight, b.stride, b.padding,
                                                            output_size=out_size)}, device, args.rounds)
                rows.append(row("deconv2d", shape, prec, times, bytes=(unpooled.numel() + weight.numel()
                                                                        + x.numel()) * size,
                                flops=dense_flops, ceiling=ceiling))
                times = time_interleaved({
                    "native": lambda: ops.unpool_relu_deconv2d(grad, switches, weight, hw, *pool, **conv),
                    "dense": lambda: ops.deconv2d(ops.unpool_relu(grad, switches, hw, *pool), weight, b.stride,
                                                  b.padding, output_size=out_size),
                    "reference": lambda: reference.unpool_relu_deconv2d(grad, switches, weight, hw, *pool, **conv),
                    "torch": lambda: F.conv_transpose2d(torch.relu(torch.ops.aten.max_pool2d_with_indices_backward(
                        grad, pre_pool, [b.pool_kernel] * 2, [b.pool_stride] * 2, [0, 0], [1, 1], False, indices)),
                        weight, None, b.stride, b.padding,
                        output_padding=b.size - ((b.conv_out() - 1) * b.stride - 2 * b.padding + b.kernel)),
                }, device, args.rounds)
                r = row("unpool_relu_deconv2d", shape, prec, times,
                        bytes=(grad.numel() * (size + 1) + weight.numel() + x.numel()) * size,
                        flops=gather_flops, ceiling=ceiling)
                r["dense_GFLOPps"] = dense_flops / times["native"] / 1e9
                r["routed_fraction"] = routed / max(1, unpooled.numel())
                rows.append(r)
                if args.verbose:
                    print(format_row(r), flush=True)
            for w in windows:
                grad, switches, weight = window_inputs(w, args.point_seeds, device, dtype, generator)
                r = fused_vs_dense_row(w.name, grad, switches, weight, w.args, prec, device, args.rounds, rel, ceiling)
                rows.append(r)
                if args.verbose:
                    print(format_row(r), flush=True)
            # The dense transposed convolutions can beat the matmul (oneDNN's convolutions, on some
            # CPUs): the FLOP ceiling is the best rate this run saw from either.
            best_dense = max((r["GFLOPps"] for r in rows if r["op"] == "deconv2d" and r["precision"] == prec),
                             default=0.0)
            ceiling["flop_GFLOPps"] = max(ceiling["matmul_GFLOPps"], best_dense)
            for r in rows:
                if r["precision"] == prec and r["ceiling"] == "matmul":
                    r["fraction_of_ceiling"] = r["GFLOPps"] / ceiling["flop_GFLOPps"]
                    r["ceiling"] = "max(matmul, best deconv2d)"
    return result


def row(op: str, shape: str, prec: str, times: Dict[str, float], *, bytes: int, flops: int,
        ceiling: Dict[str, float]) -> dict:
    native = times["native"]
    r = {"op": op, "shape": shape, "precision": prec, **{f"{k}_ms": v * 1e3 for k, v in times.items()},
         "GBps": bytes / native / 1e9, "GFLOPps": flops / native / 1e9}
    for baseline in ("reference", "torch", "dense"):
        if baseline in times:
            r[f"vs_{baseline}"] = times[baseline] / native
    if flops:
        r["fraction_of_ceiling"] = r["GFLOPps"] / ceiling["matmul_GFLOPps"]
        r["ceiling"] = "matmul"
    else:
        r["fraction_of_ceiling"] = r["GBps"] / ceiling["copy_GBps"]
        r["ceiling"] = "copy"
    return r


COLUMNS = [("op", "{:<21}"), ("shape", "{:<40}"), ("precision", "{:<5}"), ("native_ms", "{:>9.2f}"),
           ("reference_ms", "{:>9.2f}"), ("vs_reference", "{:>7.2f}"), ("torch_ms", "{:>9.2f}"),
           ("vs_torch", "{:>7.2f}"), ("dense_ms", "{:>9.2f}"), ("vs_dense", "{:>7.2f}"), ("GBps", "{:>7.1f}"),
           ("GFLOPps", "{:>8.1f}"), ("fraction_of_ceiling", "{:>6.2f}")]
HEADERS = ["op", "shape", "prec", "native ms", "ref ms", "x ref", "torch ms", "x torch", "dense ms", "x dense",
           "GB/s", "GFLOP/s", "of max"]


def format_row(r: dict) -> str:
    cells = []
    for (key, fmt), header in zip(COLUMNS, HEADERS):
        width = len(fmt.format(0.0 if "f}" in fmt else ""))
        cells.append(fmt.format(r[key]) if key in r else " " * (width - 1) + "-")
    return " ".join(cells)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: small, per shape, for the CPU)")
    parser.add_argument("--precisions", default="fp32", help="comma-separated: fp32, tf32, bf16, fp16, fp64")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", default=None, help="run only the boundaries whose name contains this")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with this process's CPU time instead of wall time (a loaded machine; use --threads 1)")
    parser.add_argument("--rows", choices=("all", "fused"), default="all",
                        help="fused: only unpool_relu_deconv2d against unpool_relu + deconv2d (native both)")
    parser.add_argument("--point-seeds", type=int, default=0, metavar="P",
                        help="also the point projections' fused calls, P projections a batch (0: none)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    args.precisions = args.precisions.split(",")
    if args.only:
        global BOUNDARIES, POOL_SHAPES
        BOUNDARIES = [b for b in BOUNDARIES if args.only in b.name]
        POOL_SHAPES = [p for p in POOL_SHAPES if args.only in p[0]]
    result = run(args)
    print(f"{result['date']}  {result['device']} {result.get('gpu', result['machine'])}  torch {result['torch']}  "
          f"threads {result['threads']}  clock {result['clock']}  load average {result['load_average']}")
    for prec, c in result["ceilings"].items():
        print(f"ceilings {prec}: copy {c['copy_GBps']:.1f} GB/s, matmul {c['matmul_GFLOPps']:.1f} GFLOP/s, "
              f"FLOP ceiling (best of matmul and the dense deconv2d rows) {c['flop_GFLOPps']:.1f} GFLOP/s")
    widths = [len(fmt.format(0.0 if "f}" in fmt else "")) for _, fmt in COLUMNS]
    print(" ".join(h.rjust(w) if i > 2 else h.ljust(w) for i, (h, w) in enumerate(zip(HEADERS, widths))))
    for r in result["rows"]:
        print(format_row(r))
    print("x ref / x torch / x dense: the baseline's time over native's (> 1: native is faster). "
          "dense = native unpool_relu + deconv2d; where x dense < 1 the dense path is faster at that shape. "
          "of max: GB/s over copy bandwidth (memory-bound ops) or GFLOP/s over the FLOP ceiling (the "
          "convolutions; the fused op counts the multiply-adds it does).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
