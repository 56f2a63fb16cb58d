"""The issue-21 measurement: the seed's recipe against warm-up, precise BatchNorm and BatchNorm
momentum 0.9 on small real data, over seeds, through the CLI. Writes one JSON row per run to
``--out`` (after every run, so a stopped measurement keeps what it did).

    python experiments/small_data/measure.py --digits /tmp/digits --runs /tmp/small_data_runs \\
        --out experiments/small_data/results.json

Each run is ``python -m jaxcnn.experiments.cifar10 ... --no_progress --workdir RUNS/<name>``;
its ``summary.json`` gives the row. Results and commands: ``experiments/small_data/README.md``.
"""

import argparse
import json
import pathlib
import subprocess
import sys
import time

# Every setting explicit (--dataset folder has defaults of its own); the last of a repeated flag wins.
SEED_RECIPE = ["--bn_momentum", "0.99", "--warmup_epochs", "0", "--precise_bn", "0"]
SETTINGS = {  # name -> CLI flags
    "seed_recipe": SEED_RECIPE,
    "warmup": SEED_RECIPE + ["--warmup_epochs", "5"],
    "precise_bn": SEED_RECIPE + ["--precise_bn", "20"],
    "momentum_0.9": SEED_RECIPE + ["--bn_momentum", "0.9"],
    "combined": SEED_RECIPE + ["--warmup_epochs", "5", "--precise_bn", "20", "--bn_momentum", "0.9"],
    "folder_defaults": [],  # whatever --dataset folder chooses now (jaxcnn.experiments.configs.FOLDER_DEFAULTS)
}
DATASETS = {  # name -> the CLI's data flags
    "digits": lambda a: ["--dataset", "folder", "--data_dir", a.digits, "--epochs", str(a.epochs)],
    "offline_smoke": lambda a: ["--dataset", "offline", "--preset", "smoke", "--epochs", str(a.epochs)],
    "offline_demo": lambda a: ["--dataset", "offline", "--preset", "demo", "--epochs", "5"],  # the preset's 5
}


def one(args, dataset: str, setting: str, seed: int) -> dict:
    name = f"{dataset}-{setting}-seed{seed}"
    workdir = pathlib.Path(args.runs) / name
    cmd = [sys.executable, "-m", "jaxcnn.experiments.cifar10", *DATASETS[dataset](args), *SETTINGS[setting],
           "--seed", str(seed), "--no_progress", "--overwrite", "--workdir", str(workdir)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    row = {"dataset": dataset, "setting": setting, "seed": seed, "command": " ".join(cmd[1:]),
           "returncode": done.returncode, "wall_s": time.perf_counter() - t0}
    if done.returncode != 0:
        row["error"] = done.stderr[-2000:]
        return row
    s = json.loads((workdir / "summary.json").read_text())
    h = json.loads((workdir / "history.json").read_text())
    row.update({k: s.get(k) for k in ("test_accuracy", "test_majority_share", "best_epoch", "stopped_early",
                                      "stop_epoch", "best_val_accuracy", "warning", "num_train", "num_test")})
    row["val_accuracy_by_epoch"] = [r["val_accuracy"] for r in h]
    row["epoch_time_s"] = [r["epoch_time_s"] for r in h]
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--digits", required=True)
    p.add_argument("--runs", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--plan", nargs="+", default=["digits:seed_recipe,warmup,precise_bn,momentum_0.9",
                                                 "offline_smoke:seed_recipe,warmup,precise_bn,momentum_0.9",
                                                 "digits:combined", "offline_smoke:combined"])
    args = p.parse_args()
    out = pathlib.Path(args.out)
    rows = json.loads(out.read_text()) if out.exists() else []
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
                      f"stopped early {row.get('stopped_early')}, {row['wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
