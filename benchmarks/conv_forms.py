"""Every convolution formulation at the CIFAR CNN's shapes, each direction, side by side.

Run:  python -m benchmarks.conv_forms [--batch 64 256 --rounds 5]

For each of the CNN's six 3×3 ``SAME`` convolutions and each direction (``fwd`` the value, ``dx``
the input gradient, ``dw`` the kernel gradient), the candidate formulations of
``jaxcnn.conv_forms`` exactly as the autotuner times them (``jaxcnn.layers._timers``; one process,
interleaved rounds, median ms), with GFLOP/s (2·N·H·W·kh·kw·C_in·C_out per direction) and the
time of the default formulation over each one's (> 1: faster than the default).
"""

from __future__ import annotations

import argparse
import sys

SHAPES = ((32, 3, 32), (32, 32, 32), (16, 32, 64), (16, 64, 64), (8, 64, 128), (8, 128, 128))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.conv_forms", description=__doc__.split("\n")[0],
                                allow_abbrev=False)
    p.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    import jax

    from jaxcnn import conv_tuning, layers

    print(f"{conv_tuning.machine_key()}; median of {args.rounds} interleaved rounds\n")
    print("| batch, size, C_in → C_out | direction | " + " | ".join(
        f"{n} ms (GF/s)" for n in ("xla", "rows", "rows_wt", "im2col", "winograd", "winograd4")) + " | default / best |")
    print("|---|---|" + "---:|" * 7)
    pads = ((1, 1), (1, 1))
    for batch in args.batch:
        for size, cin, cout in SHAPES:
            gflop = 2 * batch * size * size * 9 * cin * cout / 1e9
            for direction, names in layers._CANDIDATES.items():
                if direction == "dx" and cin == 3:
                    continue  # the first layer's input gradient is never needed
                names = tuple(names) + (("rows",) if direction != "dw" else ())
                timers = layers._timers(direction, names, (batch, size, size, cin), (3, 3, cin, cout), pads)
                ms = conv_tuning.time_candidates(timers, rounds=args.rounds)
                cells = [f"{ms[n]:.2f} ({gflop / ms[n] * 1e3:.0f})" if n in ms else "" for n in
                         ("xla", "rows", "rows_wt", "im2col", "winograd", "winograd4")]
                best = min(ms, key=ms.get)
                print(f"| {batch}, {size} px, {cin} → {cout} | {direction} | " + " | ".join(cells) +
                      f" | {ms[names[0]] / ms[best]:.2f} ({best}) |", flush=True)
                del timers
        jax.clear_caches()
    return 0


if __name__ == "__main__":
    sys.exit(main())
