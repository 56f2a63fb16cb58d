"""Training throughput against the number of devices and processes (data parallelism by sharding).

Run:  python -m benchmarks.scaling [--batch 64 --steps 20 --rounds 3]

Each configuration runs in processes of its own (the device count is fixed when JAX starts):
one process with 1, 2 or 4 devices (fake CPU devices here, ``--xla_force_host_platform_device_count``),
and 2 processes x 2 devices joined by ``jax.distributed`` over the loopback address (gloo). Every
worker trains the seed's CifarCNN with ``jaxcnn.train.TrainFeed`` batches and the jitted,
donated train step of ``fit``, compiles and warms up, then times ``--steps`` steps per round;
the configurations take turns round by round and the table gives the median images/s and the
ratio to one device. The measured table and its hardware are in ``benchmarks/README.md``.

On a CPU, fake devices share the same cores: the ratio measures what sharding costs, not a
speed-up (with real devices, the ideal is the device count).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

CONFIGS = [("1 process x 1 device", 1, 1), ("1 process x 2 devices", 1, 2), ("1 process x 4 devices", 1, 4),
           ("2 processes x 2 devices", 2, 2)]


def worker(args) -> None:
    """One process of one configuration: prints one JSON line per round (process 0)."""
    import jax
    import jax.numpy as jnp

    from jaxcnn.data import load_dataset
    from jaxcnn.models import CifarCNN
    from jaxcnn.train import TrainFeed, TrainState, adam, make_mesh, make_train_step
    from jaxcnn.train import distributed
    from jaxcnn.train.sharding import replicate

    if args.processes > 1:
        distributed.initialize(f"127.0.0.1:{args.port}", args.processes, args.process_id)
    procs = distributed.Processes()
    data = load_dataset("offline", num_train=args.batch * (args.steps + 2), num_val=8, num_test=8)
    model = CifarCNN()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    mesh = make_mesh()
    state = replicate(TrainState.create(apply_fn=model.apply, variables=variables, tx=adam(1e-3),
                                        key=jax.random.key(1)), mesh)
    feed = TrainFeed(data.train, args.batch, mesh, seed=0,
                     processes=procs)
    step = jax.jit(make_train_step(), donate_argnums=0)
    t = time.perf_counter()
    for batch in list(feed.epoch(1))[:2]:  # compile and warm up
        state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    for r in range(args.rounds):
        t = time.perf_counter()
        for i, batch in enumerate(feed.epoch(r + 2)):
            if i == args.steps:
                break
            state, m = step(state, batch)
        jax.block_until_ready((state.params, m))
        dt = time.perf_counter() - t
        if procs.primary:
            print(json.dumps({"round": r, "images_per_s": args.steps * args.batch / dt, "compile_s": compile_s}),
                  flush=True)
        if r + 1 < args.rounds:  # wait for the driver's turn signal: one configuration runs at a time
            sys.stdin.readline()


def _result(proc) -> dict:
    """The worker's next JSON line (gloo prints its connection notes on stdout too)."""
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("a benchmark worker ended without a result")
        if line.startswith("{"):
            return json.loads(line)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: The instruction sets a speed table depends on (x86 flags of /proc/cpuinfo).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def _cpu() -> str:
    """The CPU's model name and the instruction sets of ``ISA_FLAGS`` it has, e.g.
    ``Intel(R) Xeon(R) Processor [avx2 fma avx512f avx512_bf16]``: every table names its CPU kind."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ISA_FLAGS if f in flags]
    return f"{name} [{' '.join(isa) or 'no AVX2'}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n")[0],
                                allow_abbrev=False)
    p.add_argument("--batch", type=int, default=64, help="global batch (64)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per round (20)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--process_id", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workers = {}
    for name, n_proc, n_dev in CONFIGS:  # start every configuration; each waits for its turn after a round
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={n_dev}"}
        port = _free_port()
        workers[name] = [subprocess.Popen(
            [sys.executable, "-m", "benchmarks.scaling", "--worker", "--processes", str(n_proc), "--process_id",
             str(i), "--port", str(port), "--batch", str(args.batch), "--steps", str(args.steps), "--rounds",
             str(args.rounds)], cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True) for i in range(n_proc)]
        workers[name].append([_result(workers[name][0])])  # round 0 runs once compiled: one at a time
    for r in range(1, args.rounds):  # then the configurations take turns, round by round
        for name, *_ in CONFIGS:
            *procs, results = workers[name]
            for proc in procs:
                proc.stdin.write("go\n")
                proc.stdin.flush()
            results.append(_result(procs[0]))
    for name, *_ in CONFIGS:
        for proc in workers[name][:-1]:
            proc.wait(timeout=600)
    import jax

    print(f"CifarCNN (the seed's model), Adam, global batch {args.batch}, median of {args.rounds} rounds of "
          f"{args.steps} steps; CPU {_cpu()}, {os.cpu_count()} cores, jax {jax.__version__}\n")
    print("| configuration | images/s | vs 1 device | compile (s) |\n|---|---:|---:|---:|")
    base = None
    for name, *_ in CONFIGS:
        rows = workers[name][-1]
        ips = statistics.median(r["images_per_s"] for r in rows)
        base = base or ips
        print(f"| {name} | {ips:,.0f} | {ips / base:.2f} | {rows[0]['compile_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
