"""The issue-28 ablation: the training recipe's ingredients, each alone on top of today's
``--dataset folder`` defaults, and combinations, over seeds, through the CLI as a user runs it.
Writes one JSON row per run to ``--out`` after every run (a stopped measurement keeps what it did
and a rerun skips what is there); ``--table`` prints the README's table from those rows.

    python experiments/recipe/measure.py --data digits=/tmp/digits --runs /tmp/recipe_runs \\
        --out experiments/recipe/results.json --plan digits:base,label_smoothing,mixup
    python experiments/recipe/measure.py --out experiments/recipe/results.json --table

A setting is ingredient names joined by ``+`` (``label_smoothing+cosine``); ``seed_recipe`` is the
seed's own recipe (no precise BatchNorm), ``base`` the folder defaults as they are. Each run is
``python -m jaxcnn.experiments.cifar10 <data flags> <setting flags> --seed S --no_progress
--overwrite --workdir RUNS/<name>``; its ``summary.json`` gives the row, which holds the command.
"""

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time

INGREDIENTS = {  # name -> CLI flags added to the folder defaults (the last of a repeated flag wins)
    "base": [],
    "seed_recipe": ["--precise_bn", "0"],
    "label_smoothing": ["--label_smoothing", "0.1"],
    "mixup": ["--mixup", "0.2"],
    "cutmix": ["--cutmix", "1.0"],
    "cosine": ["--lr_schedule", "cosine", "--warmup_epochs", "1"],
    "weight_decay": ["--weight_decay", "0.05"],
    "ema": ["--ema", "0.99"],
    "tta": ["--tta"],
}
DATASETS = {  # name -> the CLI's data flags (a folder's path comes from --data NAME=PATH)
    "digits": lambda a: ["--dataset", "folder", "--data_dir", a.data["digits"], "--epochs", str(a.epochs)],
    "photos": lambda a: ["--dataset", "folder", "--data_dir", a.data["photos"], "--image_size", "64",
                         "--epochs", str(a.epochs)],
    # the offline set as the smoke preset sizes it (256 / 64 / 100 images, a tiny model), with the
    # folder default's precise BatchNorm made explicit (the offline data keeps the seed's recipe)
    "offline_smoke": lambda a: ["--dataset", "offline", "--preset", "smoke", "--epochs", str(a.epochs),
                                "--precise_bn", "20"],
}


def flags(setting: str) -> list:
    return [f for name in setting.split("+") for f in INGREDIENTS[name]]


def cpu() -> str:
    """The CPU as the rows record it: its model name and whether it has AVX-512 (the kernels oneDNN and
    XLA pick differ, and so do a run's roundings: the same command gives another run on another CPU)."""
    info = pathlib.Path("/proc/cpuinfo").read_text() if pathlib.Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    return f"{model}, {'AVX-512' if 'avx512f' in flags else 'AVX2, no AVX-512' if 'avx2' in flags else 'no AVX2'}"


def one(args, dataset: str, setting: str, seed: int) -> dict:
    workdir = pathlib.Path(args.runs) / f"{dataset}-{setting}-seed{seed}"
    cmd = [sys.executable, "-m", "jaxcnn.experiments.cifar10", *DATASETS[dataset](args), *flags(setting),
           "--seed", str(seed), "--no_progress", "--overwrite", "--workdir", str(workdir)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    row = {"dataset": dataset, "setting": setting, "seed": seed, "command": " ".join(["python", *cmd[1:]]),
           "returncode": done.returncode, "wall_s": time.perf_counter() - t0, "cpu": cpu()}
    if done.returncode != 0:
        row["error"] = done.stderr[-2000:]
        return row
    s = json.loads((workdir / "summary.json").read_text())
    h = json.loads((workdir / "history.json").read_text())
    row.update({k: s.get(k) for k in ("test_accuracy", "test_loss", "test_majority_share", "best_epoch",
                                      "stopped_early", "stop_epoch", "best_val_accuracy", "warning", "num_train",
                                      "num_test", "device")})
    row["val_accuracy_by_epoch"] = [r["val_accuracy"] for r in h]
    return row


def table(rows: list) -> None:
    """Per dataset and setting: test accuracy mean ± sample sd over the seeds, each seed's, the mean
    difference from ``base`` at the same seeds, the majority share, best epochs, early stops, wall
    time, the CPU (AVX-512 or AVX2)."""
    rows = [r for r in rows if r.get("returncode") == 0]
    print("| data | setting | test accuracy, mean ± sd | per seed | vs base | majority share | best epoch "
          "| stopped early | wall s / run | CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == dataset]
        base = {r["seed"]: r["test_accuracy"] for r in mine if r["setting"] == "base"}
        for setting in [s for s in INGREDIENTS if any(r["setting"] == s for r in mine)] + \
                sorted({r["setting"] for r in mine} - set(INGREDIENTS)):
            rs = sorted((r for r in mine if r["setting"] == setting), key=lambda r: r["seed"])
            acc = [r["test_accuracy"] for r in rs]
            spread = f" ± {statistics.stdev(acc):.3f}" if len(acc) > 1 else " (1 seed)"
            paired = [a - base[r["seed"]] for a, r in zip(acc, rs) if r["seed"] in base]  # (the same seeds')
            vs = f"{statistics.mean(paired):+.3f}" if paired and setting != "base" else ""
            maj = sorted({round(r["test_majority_share"], 3) for r in rs})
            per_seed = [f"{a:.3f} (s{r['seed']})" for a, r in zip(acc, rs)]
            cs = [r.get("cpu", "?").split(", ", 1)[-1].split(",")[0] for r in rs]  # AVX-512 / AVX2
            where = cs[0] if len(set(cs)) == 1 else ", ".join(f"{c} (s{r['seed']})" for c, r in zip(cs, rs))
            print(f"| {dataset} | {setting} | {statistics.mean(acc):.3f}{spread} | "
                  f"{', '.join(per_seed)} | {vs} | "
                  f"{', '.join(f'{m:.3f}' for m in maj)} | {', '.join(str(r['best_epoch']) for r in rs)} | "
                  f"{sum(bool(r['stopped_early']) for r in rs)}/{len(rs)} | "
                  f"{statistics.mean(r['wall_s'] for r in rs):.0f} | {where} |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", nargs="*", default=[], metavar="NAME=PATH", help="the folders: digits=..., photos=...")
    p.add_argument("--runs", help="where the run folders go")
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--plan", nargs="*", default=[], metavar="DATASET:SETTING,SETTING")
    p.add_argument("--table", action="store_true")
    args = p.parse_args()
    args.data = dict(item.split("=", 1) for item in args.data)
    out = pathlib.Path(args.out)
    rows = json.loads(out.read_text()) if out.exists() else []
    if args.table:
        return table(rows)
    done = {(r["dataset"], r["setting"], r["seed"]) for r in rows if r.get("returncode") == 0}
    for item in args.plan:
        dataset, settings = item.split(":")
        for seed in args.seeds:
            for setting in settings.split(","):
                if (dataset, setting, seed) in done:
                    continue
                row = one(args, dataset, setting, seed)
                rows.append(row)
                out.write_text(json.dumps(rows, indent=1) + "\n")
                print(f"{dataset} {setting} seed {seed}: test {row.get('test_accuracy')} "
                      f"(majority {row.get('test_majority_share')}), best epoch {row.get('best_epoch')}, "
                      f"rc {row['returncode']}, {row['wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
