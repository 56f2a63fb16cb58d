"""The speed suite: the seed's CIFAR CNN trained and run by jaxcnn beside Keras 3 (TensorFlow and
JAX backends) and PyTorch (eager and ``torch.compile``, when installed), in one run.

Run:  python -m benchmarks.suite [--windows 3 --min_window_s 3 --frameworks ...]

Every framework runs in worker processes of its own (its threads, its allocator, its compiled
code), one per task as a training run has one batch size, all started before timing begins, one
compiling at a time. Each worker builds the
identical model (the seed's question-4 CNN, logits out, Keras' initializers and BatchNorm
settings), Adam (learning rate 1e-3) and softmax cross-entropy, puts random data in memory, and
compiles and warms up every task; the compile time is reported apart. Then the driver asks for
one timed window per framework per task, round after round (frameworks interleaved, so a noisy
minute hits them all; each round starts with the next framework, and a pause of ``--pause_s``
before every window lets the previous framework's spinning OpenMP threads go to sleep), and
the table gives the median images/s of ``--windows`` windows of at least ``--min_window_s``
seconds each. With ``--fresh`` every window runs in a new worker that compiles, times at once and
exits: on a VM that takes idle memory back, a worker waiting through the other frameworks' windows
comes back to page faults (measured: ``benchmarks/README.md``), which a training run never sees.

Tasks: ``train64`` and ``train256`` (one optimizer step on a batch already in memory),
``infer256`` (the forward pass in inference mode). ResNet50 at 224x224 (``--resnet``, Keras
and jaxcnn; random weights, uint8 images caffe-preprocessed inside the step, a 5-class head as
the fine-tuning experiment builds it): ``resnet_infer8`` (the forward pass, inference mode),
``resnet_frozen8`` (fine-tuning phase 1: the backbone frozen, its BatchNorm in inference mode,
only the head trained; Keras: ``base.trainable = False``), ``resnet_train8`` (phase 2 with
nothing frozen). The jaxcnn variants:

* ``jaxcnn``: ``jax.jit(make_train_step(), donate_argnums=0)`` on one device, batches placed
  on the device once (uint8 images, scaled to [0, 1] inside the step as ``fit`` does).
* ``jaxcnn-Ndev``: the same step with the batch split over ``N`` CPU devices (a ``data`` mesh,
  ``jax_num_cpu_devices``): one XLA device per core, the data-parallel step of ``fit``.
* ``jaxcnn-bf16``: bfloat16 compute, float32 parameters (``CifarCNN(dtype=bfloat16)``).
* ``-1thread``: XLA's CPU ops without Eigen's thread pool; ``-release``: without
  ``keep_host_memory()`` (which every other jaxcnn worker applies first, as the CLIs do: glibc's
  default, the step's buffers handed back to the kernel and faulted in again every step);
  ``-xla``: ``JAXCNN_KERNELS=xla``, every convolution on XLA's path instead of the project's oneDNN
  kernels (``jaxcnn.kernels``; the plain ``jaxcnn`` worker runs the default, ``auto``: oneDNN where it
  is built). Each worker prints the convolution path it ran.

PyTorch runs eager in channels-last layout (``torch``, its fastest on these CPUs) and in its default
NCHW layout (``torch-nchw``).

Extra tasks of jaxcnn alone (``--loop``): ``epoch64``, ``train_epoch`` over a ``TrainFeed`` as
``fit`` runs it (the batch gather on the device, the loss and accuracy sums, the progress bar),
``augment64`` the same with on-device augmentation, and the time of one checkpoint save. Each
epoch runs beside 20 bare ``train64`` steps, in pairs (A B B A ...): the pairs' time ratio is the
loop's overhead, far steadier on a noisy machine than windows minutes apart.

The fp32 GEMM rate (a 2048^3 ``jnp.dot``, and NumPy's BLAS; the faster; the best of one
measurement per round) gives each framework's
share of it: model FLOPs per image (2 per multiply-add of the convolutions and dense layers;
a train step counts 3x the forward: forward, input and weight gradients) x images/s / rate.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

from benchmarks.scaling import _cpu  # the CPU's model name

TASKS = ("train64", "train256", "infer256")
RESNET_TASKS = ("resnet_infer8", "resnet_frozen8", "resnet_train8")
RESNET_SIZE, RESNET_CLASSES = 224, 5
LOOP_TASKS = ("epoch64", "augment64")
FRAMEWORKS = ("keras-tf", "keras-jax", "torch", "torch-nchw", "torch-compile", "jaxcnn", "jaxcnn-xla", "jaxcnn-2dev")
WIDTHS, DENSE, CLASSES = (32, 64, 128), 128, 10
VARIANT = r"jaxcnn(?:-(\d+)dev)?(-bf16)?(-1thread)?(-release)?(-xla)?"  # the jaxcnn workers' names


def forward_flops_per_image(widths=WIDTHS, dense=DENSE, classes=CLASSES, size=32) -> int:
    """2 x the multiply-adds of the convolutions and dense layers of one 32x32x3 image."""
    macs, cin, s = 0, 3, size
    for w in widths:
        macs += s * s * 9 * (cin * w + w * w)  # two 3x3 'same' convs at this resolution
        cin, s = w, s // 2
    macs += s * s * cin * dense + dense * classes
    return 2 * macs


def resnet50_forward_flops() -> float:
    """FLOPs of one 224x224 image through jaxcnn's ResNet50 forward, as XLA counts them (its
    cost analysis of the lowered program, no compilation)."""
    import jax
    import jax.numpy as jnp

    from jaxcnn.models.resnet import ResNet50

    net = ResNet50()
    shape = jax.ShapeDtypeStruct((1, RESNET_SIZE, RESNET_SIZE, 3), jnp.float32)
    v = jax.eval_shape(lambda k: net.init(k, jnp.zeros(shape.shape), train=False), jax.random.key(0))
    return float(jax.jit(lambda v, x: net.apply(v, x, train=False)).lower(v, shape).cost_analysis()["flops"])


def task_flops(task: str, cifar: float, resnet: float) -> float:
    """FLOPs per image of a task: a full train step counts 3x the forward (forward, input and
    weight gradients); a frozen-backbone step counts the forward alone (the head is negligible)."""
    fwd = resnet if task.startswith("resnet") else cifar
    return fwd * (3 if task.startswith(("train", "resnet_train")) else 1)


# ------------------------------------------------------------------------------------------ workers

def _batches(rng, sizes):
    import numpy as np

    return {b: (rng.integers(0, 256, (b, 32, 32, 3), dtype=np.uint8), rng.integers(0, CLASSES, b).astype(np.int32))
            for b in sizes}


def _batch_of(task: str) -> int:
    """The batch size at the end of a task's name: ``train256`` -> 256, ``resnet_train8`` -> 8."""
    return int(re.search(r"\d+$", task).group())


def _resnet_batch(rng, b):
    import numpy as np

    return (rng.integers(0, 256, (b, RESNET_SIZE, RESNET_SIZE, 3), dtype=np.uint8),
            rng.integers(0, RESNET_CLASSES, b).astype(np.int32))


def _sizes(tasks):
    return sorted({_batch_of(t) for t in tasks if not t.startswith("resnet")})


def _timed(run_n, min_s: float, per_call: int) -> float:
    """Images/s of ``run_n(n)`` (n calls, synchronised at the end) over at least ``min_s`` s, after
    one untimed call: a framework's memory idle while the others had their windows may have been
    paged out (this VM's kernel reclaims idle pages: jaxcnn's step at batch 256 measured 238 img/s
    in back-to-back windows, 184-192 after 15 s idle, 132 in windows between other frameworks'),
    and a training process does not idle between steps."""
    run_n(1)
    n = 2
    while True:
        t = time.perf_counter()
        run_n(n)
        dt = time.perf_counter() - t
        if dt >= min_s:
            return n * per_call / dt
        n = max(n + 1, int(n * min_s * 1.2 / max(dt, 1e-3)))


def _keras_worker(backend: str, tasks):
    os.environ["KERAS_BACKEND"] = backend
    import keras
    import numpy as np

    from jaxcnn.reference import seed_keras_cifar_cnn

    keras.utils.set_random_seed(0)
    model = seed_keras_cifar_cnn(classifier_activation=None)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    data = _batches(np.random.default_rng(0), _sizes(tasks))
    data = {b: (keras.ops.convert_to_tensor(x.astype(np.float32) / 255.0), keras.ops.convert_to_tensor(y))
            for b, (x, y) in data.items()}  # on the framework's device once, as jaxcnn's batches are

    def run(task):
        b = _batch_of(task)
        if task.startswith("resnet"):
            return _keras_resnet(keras, task, b), b
        x, y = data[b]
        if task.startswith("train"):
            return lambda n: [model.train_on_batch(x, y) for _ in range(n)][-1], b
        return lambda n: [model.predict_on_batch(x) for _ in range(n)][-1], b

    return run


def _keras_resnet(keras, task: str, b: int):
    """Keras' ResNet50 for one ResNet task: the whole network (``resnet_infer``), or the
    fine-tuning model (no top, average pooling, a Dense head; the base frozen or not)."""
    import numpy as np

    x, y = _resnet_batch(np.random.default_rng(0), b)
    x = keras.ops.convert_to_tensor(keras.applications.resnet50.preprocess_input(x.astype(np.float32)))
    y = keras.ops.convert_to_tensor(y)
    shape = (RESNET_SIZE, RESNET_SIZE, 3)
    if task.startswith("resnet_infer"):
        net = keras.applications.ResNet50(weights=None, input_shape=shape)
        return lambda n: [net.predict_on_batch(x) for _ in range(n)][-1]
    base = keras.applications.ResNet50(weights=None, include_top=False, pooling="avg", input_shape=shape)
    base.trainable = not task.startswith("resnet_frozen")
    net = keras.Sequential([keras.Input(shape), base, keras.layers.Dense(RESNET_CLASSES)])
    net.compile(optimizer=keras.optimizers.Adam(1e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return lambda n: [net.train_on_batch(x, y) for _ in range(n)][-1]


def _torch_worker(compiled: bool, tasks, channels_last: bool = True):
    import numpy as np
    import torch
    from torch import nn

    torch.manual_seed(0)

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01),
                nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01),
                nn.MaxPool2d(2), nn.Dropout(0.25)]

    layers, cin = [], 3
    for w in WIDTHS:
        layers += block(cin, w)
        cin = w
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin * 16, DENSE), nn.ReLU(),
                          nn.BatchNorm1d(DENSE, eps=1e-3, momentum=0.01), nn.Dropout(0.5), nn.Linear(DENSE, CLASSES))
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    def train_step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss

    def infer(x):
        with torch.no_grad():
            return model(x)

    if compiled:
        train_step, infer = torch.compile(train_step), torch.compile(infer)
    data = {}
    for b, (x, y) in _batches(np.random.default_rng(0), _sizes(tasks)).items():
        xt = torch.from_numpy(x.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous(memory_format=layout)
        data[b] = (xt, torch.from_numpy(y.astype(np.int64)))

    def run(task):
        b = _batch_of(task)
        x, y = data[b]
        if task.startswith("train"):
            def go(n):
                model.train()
                for _ in range(n):
                    loss = train_step(x, y)
                return float(loss)
        else:
            def go(n):
                model.eval()
                for _ in range(n):
                    out = infer(x)
                return float(out[0, 0])
        return go, b

    return run


def _jaxcnn_worker(devices: int, precision: str, tasks):
    import jax

    if devices > 1:
        jax.config.update("jax_num_cpu_devices", devices)
    import jax.numpy as jnp
    import numpy as np

    from jaxcnn.models import CifarCNN
    from jaxcnn.train import TrainState, adam, make_mesh, make_train_step, replicate, shard_batch

    dtype = jnp.bfloat16 if precision == "bfloat16" else jnp.float32
    model = CifarCNN(dtype=dtype) if precision != "float32" else CifarCNN()
    mesh = make_mesh()
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.key(0))
    state = replicate(TrainState.create(apply_fn=model.apply, variables=variables, tx=adam(1e-3),
                                        key=jax.random.key(1)), mesh)
    step = jax.jit(make_train_step(), donate_argnums=0)
    forward = jax.jit(lambda v, x: model.apply(v, x.astype(jnp.float32) / 255.0, train=False))
    data = {b: shard_batch({"image": x, "label": y}, mesh)
            for b, (x, y) in _batches(np.random.default_rng(0), _sizes(tasks)).items()}
    box = {"state": state}

    def run(task):
        b = _batch_of(task)
        if task.startswith("resnet"):
            return _jaxcnn_resnet(task, b, mesh), b
        batch = data[b]
        if task.startswith("train"):
            go = _steps(step, box, batch)
        elif task.startswith("infer"):
            def go(n):
                v = {"params": box["state"].params, "batch_stats": box["state"].batch_stats}
                for _ in range(n):
                    out = forward(v, batch["image"])
                return float(out[0, 0])
        else:
            return _loop_task(task, box, model, mesh, b), b
        return go, b

    run.box = box  # the train state, for the checkpoint timing
    return run


def _jaxcnn_resnet(task: str, b: int, mesh):
    """jaxcnn's ResNet50 for one ResNet task, built as the fine-tuning experiment builds it:
    ``Classifier(ResNet50(include_top=False, pooling="avg"))``, ``freeze.backbone()`` or
    nothing frozen, ``adam(labels=...)`` and ``make_train_step(labels=...)`` with caffe
    preprocessing inside the step."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxcnn import freeze
    from jaxcnn.models.resnet import Classifier, ResNet50
    from jaxcnn.preprocess import caffe_preprocess
    from jaxcnn.train import TrainState, adam, make_train_step, replicate, shard_batch

    x, y = _resnet_batch(np.random.default_rng(0), b)
    batch = shard_batch({"image": x, "label": y}, mesh)
    if task.startswith("resnet_infer"):
        net = ResNet50()
        variables = jax.jit(lambda k: net.init(k, jnp.zeros((1, RESNET_SIZE, RESNET_SIZE, 3)), train=False))(
            jax.random.key(0))
        variables = replicate(variables, mesh)
        forward = jax.jit(lambda v, x: net.apply(v, caffe_preprocess(x), train=False))

        def go(n):
            for _ in range(n):
                out = forward(variables, batch["image"])
            return float(out[0, 0])

        return go
    model = Classifier(ResNet50(include_top=False, pooling="avg"), num_classes=RESNET_CLASSES)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, RESNET_SIZE, RESNET_SIZE, 3)), train=False))(
        jax.random.key(0))
    rule = freeze.backbone() if task.startswith("resnet_frozen") else freeze.nothing()
    labels = freeze.label_tree(variables["params"], rule)
    frozen_bn = freeze.frozen_layer_names(labels, under="backbone")
    state = replicate(TrainState.create(apply_fn=functools.partial(model.apply, frozen_bn=frozen_bn),
                                        variables=variables, tx=adam(1e-3, labels=labels), key=jax.random.key(1)),
                      mesh)
    step = jax.jit(make_train_step(labels=labels, preprocess=caffe_preprocess), donate_argnums=0)
    return _steps(step, {"state": state}, batch)


def _steps(step, box, batch):
    """``go(n)``: ``n`` train steps on ``batch`` from ``box["state"]`` (kept there), synchronised."""
    def go(n):
        s = box["state"]
        for _ in range(n):
            s, m = step(s, batch)
        box["state"] = s
        return float(m["loss"])

    return go


def _loop_task(task, box, model, mesh, b):
    """``train_epoch`` as ``fit`` runs it, over a feed of 20-step epochs (``augment``: with random
    flips, shifts and rotations on the device)."""
    import functools

    import jax
    import numpy as np

    from jaxcnn.data import augment
    from jaxcnn.data.core import Split
    from jaxcnn.train import TrainFeed, make_train_step, train_epoch

    rng = np.random.default_rng(1)
    split = Split(rng.integers(0, 256, (b * 20, 32, 32, 3), dtype=np.uint8), rng.integers(0, CLASSES, b * 20)
                  .astype(np.int32))
    feed = TrainFeed(split, b, mesh, seed=0)
    aug = functools.partial(augment.random_augment, rotation=15.0) if task.startswith("augment") else None
    step = jax.jit(make_train_step(augment_fn=aug), donate_argnums=0)
    counter = {"epoch": 0}

    def go(n):  # n epochs of 20 steps each (n x 20 batches)
        s = box["state"]
        for _ in range(n):
            counter["epoch"] += 1
            out = train_epoch(s, step, feed, counter["epoch"], 10 ** 9, progress=True)
            s = out.state
        box["state"] = s
        return 0.0

    return go


def worker(args) -> None:
    name, tasks = args.worker, args.tasks.split(",")
    if name.startswith("keras"):
        run = _keras_worker("tensorflow" if name == "keras-tf" else "jax", tasks)
    elif name.startswith("torch"):
        run = _torch_worker(name == "torch-compile", tasks, channels_last=name != "torch-nchw")
    else:
        m = re.fullmatch(VARIANT, name)
        devices = int(m.group(1) or 1)
        if not m.group(4):  # as the CLIs do
            from jaxcnn.train.cpu import keep_host_memory

            keep_host_memory()
        run = _jaxcnn_worker(devices, "bfloat16" if m.group(2) else "float32", tasks)
    compile_s, runners = {}, {}
    for task in tasks:
        t = time.perf_counter()
        go, b = run(task)
        go(1)
        go(1)
        compile_s[task] = time.perf_counter() - t
        per_call = b * 20 if task in LOOP_TASKS else b
        runners[task] = (go, per_call)
    print(json.dumps({"ready": True, "compile_s": compile_s, "versions": _versions(name)}), flush=True)
    for line in sys.stdin:
        task = line.strip()
        if task == "gemm":
            print(json.dumps({"gemm_flops": _gemm_rate()}), flush=True)
            continue
        if task == "checkpoint":
            print(json.dumps({"checkpoint_s": _checkpoint_time(run.box)}), flush=True)
            continue
        go, per_call = runners[task]
        if task in LOOP_TASKS:  # paired with the bare step, window by window
            rate, ratio = _paired(go, runners["train64"][0], args.min_window_s)
            print(json.dumps({"task": task, "images_per_s": rate, "ratio": ratio}), flush=True)
            continue
        print(json.dumps({"task": task, "images_per_s": _timed(go, args.min_window_s, per_call)}), flush=True)


def _paired(loop, bare, min_s: float, steps: int = 20) -> tuple[float, float]:
    """``loop`` (one call: one epoch of ``steps`` steps) against ``bare`` (``steps`` bare steps),
    in pairs, alternately first (A B B A ...), for at least ``2 * min_s`` seconds: the loop's
    images/s and the median of the pairs' time ratios bare / loop (1.0: no overhead). Pairs
    seconds apart see the same load, so their ratio cancels most of this VM's drift."""
    ratios, loop_s, n, t_end = [], 0.0, 0, time.perf_counter() + 2 * min_s
    while time.perf_counter() < t_end or len(ratios) < 3:
        times = {}
        for name in (("bare", "loop") if len(ratios) % 2 == 0 else ("loop", "bare")):
            t = time.perf_counter()
            bare(steps) if name == "bare" else loop(1)
            times[name] = time.perf_counter() - t
        ratios.append(times["bare"] / times["loop"])
        loop_s += times["loop"]
        n += 1
    return n * steps * 64 / loop_s, statistics.median(ratios)


def _checkpoint_time(box) -> float:
    """Median seconds of one ``Checkpoints.save`` of the CIFAR CNN's train state (3 saves)."""
    import tempfile

    from jaxcnn.checkpoint import Checkpoints
    from jaxcnn.train import state_to_tree

    times = []
    with tempfile.TemporaryDirectory() as d, Checkpoints(d) as ckpts:
        for epoch in range(1, 4):
            t = time.perf_counter()
            ckpts.save(epoch, state_to_tree(box["state"]), {"epoch": epoch}, best=False)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def _gemm_rate() -> float:
    """fp32 FLOP/s of a 2048^3 matrix product: the faster of jax.numpy and NumPy's BLAS."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = 2048
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    dot = jax.jit(jnp.dot)
    ja = jax.device_put(a, jax.devices()[0])
    rates = []
    for f, sync in ((lambda: dot(ja, ja), jax.block_until_ready), (lambda: a @ a, lambda x: x)):
        sync(f())
        best = 0.0
        for _ in range(5):
            t = time.perf_counter()
            sync(f())
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
        rates.append(best)
    return max(rates)


def _versions(name: str) -> str:
    if name.startswith("keras"):
        import keras

        if name == "keras-tf":
            import tensorflow as tf

            return f"keras {keras.__version__}, tensorflow {tf.__version__}"
        import jax

        return f"keras {keras.__version__}, jax {jax.__version__}"
    if name.startswith("torch"):
        import torch

        return f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    import jax

    from jaxcnn import kernels

    path, why = kernels.choose("float32")
    return f"jax {jax.__version__}, {len(jax.devices())} device(s), convolutions: {path}" + (f" ({why})" if why else "")


# ------------------------------------------------------------------------------------------- driver

def _available(name: str) -> str | None:
    """None, or why ``name`` cannot run here."""
    import importlib.util

    need = {"keras-tf": ("keras", "tensorflow"), "keras-jax": ("keras",), "torch": ("torch",),
            "torch-nchw": ("torch",), "torch-compile": ("torch",)}.get(name, ())
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    return f"not installed: {', '.join(missing)} (pip install -e '.[bench]')" if missing else None


def _read(proc, name) -> dict:
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {name} worker ended without an answer (run it alone: python -m "
                               f"benchmarks.suite --worker {name} --tasks ...)")
        if line.startswith("{"):
            return json.loads(line)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.suite", description=__doc__.split("\n")[0],
                                allow_abbrev=False)
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                   help=f"comma-separated, from {', '.join(FRAMEWORKS)} (default: all; a missing one is skipped)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    p.add_argument("--windows", type=int, default=3, help="timed windows per framework and task (3)")
    p.add_argument("--min_window_s", type=float, default=3.0, help="seconds per window, at least (3)")
    p.add_argument("--pause_s", type=float, default=1.0,
                   help="idle seconds before each window, for the previous framework's spinning threads (1)")
    p.add_argument("--resnet", action="store_true",
                   help=f"also ResNet50 at 224x224 ({', '.join(RESNET_TASKS)}; Keras and jaxcnn only)")
    p.add_argument("--loop", action="store_true",
                   help="also jaxcnn's train_epoch against the bare step, with augmentation, and a checkpoint save")
    p.add_argument("--fresh", action="store_true",
                   help="every window in a new worker process that compiles, runs its window at once and exits: "
                        "no worker idles between its windows (on a VM that reclaims idle memory, what a training "
                        "run sees); a compile per window")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    names = [n.strip() for n in args.frameworks.split(",") if n.strip()]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for n in names:
        if n not in FRAMEWORKS and not re.fullmatch(VARIANT, n):
            raise SystemExit(f"--frameworks: {n!r} is not one of {', '.join(FRAMEWORKS)} "
                             f"(or jaxcnn[-<N>dev][-bf16][-1thread][-release][-xlawgrad][-untuned])")
    for t in tasks:
        if t not in TASKS + RESNET_TASKS:
            raise SystemExit(f"--tasks: {t!r} is not one of {', '.join(TASKS + RESNET_TASKS)}")
    if args.resnet:
        tasks += [t for t in RESNET_TASKS if t not in tasks]
    if args.loop and "train64" not in tasks:
        raise SystemExit("--loop: the loop is compared with the bare step, train64: keep it in --tasks")
    if args.loop and args.fresh:
        raise SystemExit("--loop and --fresh: the loop tasks share a worker with train64; run them without --fresh")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": root}
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)  # TensorFlow's CPU default (oneDNN on), as a Keras user has it
    workers, notes = {}, []
    for name in names:
        why = _available(name)
        if why:
            notes.append(f"{name}: skipped, {why}")
            continue
        wt = [t for t in tasks if not (t.startswith("resnet") and name.startswith("torch"))]  # no torchvision
        wt += list(LOOP_TASKS) if args.loop and name == "jaxcnn" else []
        wenv = env
        if name.endswith("-1thread"):  # XLA's CPU ops without Eigen's thread pool: one thread per device
            wenv = {**env, "XLA_FLAGS": (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()}
        if name.endswith("-xla"):  # every convolution on XLA's path
            wenv = {**wenv, "JAXCNN_KERNELS": "xla"}
        # a process per task (the loop tasks beside train64, which they are paired with), as a training
        # run has one batch size: a process alternating sizes lets its allocator's free blocks misfit
        groups = [[t] + ([u for u in wt if u in LOOP_TASKS] if t == "train64" else []) for t in wt
                  if t not in LOOP_TASKS]
        workers[name] = {"procs": {}, "tasks": wt, "results": {t: [] for t in wt}, "compile_s": {}}
        if args.fresh:  # started per window below
            workers[name].update(env=wenv, versions="")
            print(f"{name}: one process per window", file=sys.stderr, flush=True)
            continue
        for group in groups:
            proc = subprocess.Popen([sys.executable, "-m", "benchmarks.suite", "--worker", name, "--tasks",
                                     ",".join(group), "--min_window_s", str(args.min_window_s)], cwd=root, env=wenv,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            # compile one worker at a time: a compiling worker would slow the others' start
            ready = _read(proc, name)
            workers[name]["compile_s"].update(ready["compile_s"])
            workers[name]["versions"] = ready["versions"]
            for t in group:
                workers[name]["procs"][t] = proc
        print(f"{name}: ready ({workers[name]['versions']})", file=sys.stderr, flush=True)

    def fresh(name, task, gemm=False):
        """One window of ``task`` in a new worker of ``name`` (and the GEMM rate, if asked), then it exits."""
        w = workers[name]
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.suite", "--worker", name, "--tasks", task,
                                 "--min_window_s", str(args.min_window_s)], cwd=root, env=w["env"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            ready = _read(proc, name)
            w["compile_s"].setdefault(task, ready["compile_s"][task])
            w["versions"] = ready["versions"]
            answers = []
            for line in [task] + (["gemm"] if gemm else []):
                proc.stdin.write(line + "\n")
                proc.stdin.flush()
                answers.append(_read(proc, name))
        finally:
            proc.stdin.close()
            proc.wait(timeout=120)
        return answers

    def ask(name, line, task=None):
        procs = workers[name]["procs"]
        w = procs.get(task or line) or procs.get("train64") or next(iter(procs.values()))
        w.stdin.write(line + "\n")
        w.stdin.flush()
        return _read(w, name)

    gemm_worker = next((n for n in workers if n.startswith("jaxcnn")), None)
    gemms = []
    all_tasks = tasks + (list(LOOP_TASKS) if args.loop and "jaxcnn" in workers else [])
    names = list(workers)
    for r in range(args.windows):
        order = names[r % len(names):] + names[:r % len(names)]  # each round starts with another framework
        for task in all_tasks:
            for name in order:
                w = workers[name]
                if task in w["tasks"]:
                    # OpenMP threads (TensorFlow's oneDNN, PyTorch) spin for a while after their work:
                    # a pause lets them sleep before the next framework's window starts
                    time.sleep(args.pause_s)
                    if args.fresh:
                        answer, *gemm = fresh(name, task, gemm=name == gemm_worker and task == all_tasks[0])
                        gemms += [g["gemm_flops"] for g in gemm]
                    else:
                        answer = ask(name, task)
                    w["results"][task].append(answer["images_per_s"])
                    if "ratio" in answer:
                        w.setdefault("ratios", {}).setdefault(task, []).append(answer["ratio"])
        if gemm_worker and not args.fresh:  # the GEMM rate once per round too; the table uses the best
            gemms.append(ask(gemm_worker, "gemm")["gemm_flops"])
        print(f"round {r + 1}/{args.windows} done", file=sys.stderr, flush=True)
    gemm = max(gemms) if gemms else None
    ckpt = ask("jaxcnn", "checkpoint")["checkpoint_s"] if args.loop and "jaxcnn" in workers else None
    for proc in {p for w in workers.values() for p in w["procs"].values()}:
        proc.stdin.close()
        proc.wait(timeout=120)
    _report(workers, tasks, args, gemm, ckpt, notes)
    return 0


def _report(workers, tasks, args, gemm, ckpt, notes) -> None:
    import jax

    med = {n: {t: statistics.median(v) for t, v in w["results"].items() if v} for n, w in workers.items()}
    ref = med.get("keras-tf", {})
    cifar = forward_flops_per_image()
    resnet = resnet50_forward_flops() if any(t.startswith("resnet") for t in tasks) else 0.0
    print(f"\nMedian images/s of {args.windows} windows of >= {args.min_window_s:g} s, frameworks interleaved, "
          f"{'a fresh process per window, ' if args.fresh else ''}"
          f"random data in memory, Adam; (x Keras-TF); [share of the fp32 GEMM rate"
          f"{f', {gemm / 1e9:.0f} GFLOP/s' if gemm else ''}]")
    print(f"CPU: {_cpu()}, {os.cpu_count()} cores; jax {jax.__version__}; " +
          "; ".join(f"{n}: {w['versions']}" for n, w in workers.items()))
    groups = [(f"The seed's CIFAR CNN ({cifar / 1e6:.1f} MFLOP forward per image)",
               [t for t in tasks if not t.startswith("resnet")])]
    if resnet:
        groups.append((f"ResNet50, 224x224, batch 8 ({resnet / 1e9:.2f} GFLOP forward per image, XLA's count); "
                       "frozen: fine-tuning phase 1, train: phase 2", [t for t in tasks if t.startswith("resnet")]))
    for title, group in groups:
        if not group:
            continue
        print(f"\n{title}\n")
        print("| | " + " | ".join(group) + " | compile s (" + group[0] + ") |")
        print("|---|" + "---:|" * (len(group) + 1))
        for name in workers:
            if not any(t in med[name] for t in group):
                continue
            cells = []
            for t in group:
                v = med[name].get(t)
                if v is None:
                    cells.append("—")
                    continue
                c = f"{v:,.0f}" if v >= 10 else f"{v:.2f}"
                if t in ref:
                    c += f" ({v / ref[t]:.2f})"
                if gemm:
                    c += f" [{v * task_flops(t, cifar, resnet) / gemm:.0%}]"
                cells.append(c)
            print(f"| {name} | " + " | ".join(cells) + f" | {workers[name]['compile_s'].get(group[0], 0):.1f} |")
    if args.loop and "jaxcnn" in med:
        m, ratios = med["jaxcnn"], workers["jaxcnn"].get("ratios", {})
        bare = m.get("train64")
        print("\njaxcnn's loop (batch 64, 20-step epochs of train_epoch with its progress bar), each epoch "
              "paired with 20 bare steps around it:")
        for t in LOOP_TASKS:
            if t in ratios:
                r = sorted(ratios[t])
                print(f"  {t}: {m[t]:,.0f} images/s; bare step time / loop time {statistics.median(r):.3f} "
                      f"(windows: {', '.join(f'{x:.3f}' for x in r)}), i.e. {1 / statistics.median(r) - 1:+.1%} time")
        if ckpt is not None:
            print(f"  one checkpoint save of the train state: {ckpt * 1e3:.0f} ms "
                  f"({ckpt * (bare or 1) / 45000:.2%} of a 45,000-image epoch at the bare step's speed)")
    for n in notes:
        print(n)


if __name__ == "__main__":
    sys.exit(main())
