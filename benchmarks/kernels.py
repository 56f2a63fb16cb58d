"""Per-direction convolution speed: GF/s of the value, the input gradient and the kernel gradient
for each of the seed CNN's convolutions, on XLA's path, on the project's oneDNN kernels (through
XLA's FFI, ``jaxcnn.kernels``) and in PyTorch (channels-last, where installed).

Run:  python -m benchmarks.kernels [--batch 64 256 --rounds 5 --calls 10]

One process; every shape and direction runs its candidates interleaved round by round (each round
``--calls`` jitted calls), and the table reports the median round. A direction's work is
``2 * N * H_out * W_out * kh * kw * C_in * C_out`` flops, the same for all three.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

#: The seed CNN's convolutions: (size, C_in, C_out), 3x3 SAME.
SHAPES = ((32, 3, 32), (32, 32, 32), (16, 32, 64), (16, 64, 64), (8, 64, 128), (8, 128, 128))
DIRECTIONS = ("fwd", "bwd_data", "bwd_weights")


def _jax_fns(backend):
    import jax

    from jaxcnn.kernels import onednn, xla

    spec = dict(strides=(1, 1), pads=((1, 1), (1, 1)), dilations=(1, 1))
    if backend == "onednn":
        conv = functools.partial(onednn.conv2d, **spec)
    else:
        conv = functools.partial(xla.fwd, **spec)
    fwd = jax.jit(conv)
    dx = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    dw = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
    return {"fwd": lambda x, w, g: fwd(x, w), "bwd_data": dx, "bwd_weights": dw}


def _torch_fns():
    import torch
    import torch.nn.functional as F

    def t(a, perm):
        return torch.from_numpy(a).permute(*perm).contiguous(memory_format=torch.channels_last)

    def fwd(x, w, g):
        with torch.no_grad():
            return F.conv2d(x, w, padding=1)

    def dx(x, w, g):
        return torch.nn.grad.conv2d_input(x.shape, w, g, padding=1)

    def dw(x, w, g):
        return torch.nn.grad.conv2d_weight(x, w.shape, g, padding=1)

    return {"fwd": fwd, "bwd_data": dx, "bwd_weights": dw}, t


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n")[0],
                                allow_abbrev=False)
    p.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--no_torch", action="store_true")
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from jaxcnn.kernels import onednn

    if onednn.load() is None:
        raise SystemExit(f"the oneDNN kernels are not available: {onednn.unavailable_reason()}")
    fns = {"xla": _jax_fns("xla"), "onednn": _jax_fns("onednn")}
    torch_fns = None
    if not args.no_torch:
        try:
            import torch

            torch.set_num_threads(os.cpu_count() or 1)
            torch_fns, to_torch = _torch_fns()
        except ImportError:
            print("(PyTorch not installed: no torch column)")
    names = list(fns) + (["torch"] if torch_fns else [])
    print(f"jax {jax.__version__}; oneDNN {'.'.join(map(str, onednn.load().version()))}, "
          f"{os.environ.get('JAXCNN_ONEDNN_THREADS', os.cpu_count())} threads; median of {args.rounds} rounds "
          f"x {args.calls} calls; GF/s\n")
    print("| batch | shape (px, C_in -> C_out) | direction | oneDNN impl | " + " | ".join(names)
          + " | oneDNN / XLA |")
    print("|---|---|---|---|" + "---|" * (len(names) + 1))
    rng = np.random.default_rng(0)
    for n in args.batch:
        for size, cin, cout in SHAPES:
            x = rng.standard_normal((n, size, size, cin), np.float32)
            w = (rng.standard_normal((3, 3, cin, cout)) * 0.1).astype(np.float32)
            g = rng.standard_normal((n, size, size, cout), np.float32)
            jx, jw, jg = map(jax.numpy.asarray, (x, w, g))
            flops = 2 * n * size * size * 9 * cin * cout
            impls = onednn.impl_names(x.shape, w.shape)
            if torch_fns:
                tx, tw, tg = to_torch(x, (0, 3, 1, 2)), to_torch(w, (3, 2, 0, 1)), to_torch(g, (0, 3, 1, 2))
            for d in DIRECTIONS:
                calls = {k: functools.partial(lambda f: jax.block_until_ready(f(jx, jw, jg)), fns[k][d]) for k in fns}
                if torch_fns:
                    calls["torch"] = functools.partial(lambda f: f(tx, tw, tg), torch_fns[d])
                for c in calls.values():
                    c()  # compile / warm up
                times = {k: [] for k in calls}
                for _ in range(args.rounds):
                    for k, c in calls.items():
                        t0 = time.perf_counter()
                        for _ in range(args.calls):
                            c()
                        times[k].append((time.perf_counter() - t0) / args.calls)
                gf = {k: flops / statistics.median(v) / 1e9 for k, v in times.items()}
                print(f"| {n} | {size}, {cin} -> {cout} | {d} | {impls.get(d, '')} | "
                      + " | ".join(f"{gf[k]:.0f}" for k in names) + f" | {gf['onednn'] / gf['xla']:.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
