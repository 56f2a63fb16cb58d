"""The README's table from measure.py's rows: per dataset and setting, the test accuracy over seeds
(mean ± sample standard deviation, and each seed's), the test split's majority share, the best
epochs, and how many runs stopped early or were warned of answering (nearly) one class.

    python experiments/small_data/table.py experiments/small_data/results.json
"""

import json
import statistics
import sys


ORDER = ("seed_recipe", "warmup", "precise_bn", "momentum_0.9", "combined", "folder_defaults")


def main(path: str) -> None:
    rows = [r for r in json.loads(open(path).read()) if r.get("returncode") == 0]
    print("| data | setting | test accuracy, mean ± sd | per seed (0, 1, 2) | majority share | best epoch "
          "| stopped early | warned | wall s / run |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        present = {r["setting"] for r in rows if r["dataset"] == dataset}
        for setting in [s for s in ORDER if s in present] + sorted(present - set(ORDER)):
            rs = sorted((r for r in rows if (r["dataset"], r["setting"]) == (dataset, setting)),
                        key=lambda r: r["seed"])
            acc = [r["test_accuracy"] for r in rs]
            spread = f" ± {statistics.stdev(acc):.3f}" if len(acc) > 1 else " (1 seed)"
            maj = [r["test_majority_share"] for r in rs]
            maj = maj[:1] if len(set(maj)) == 1 else maj
            print(f"| {dataset} | {setting} | {statistics.mean(acc):.3f}{spread} | "
                  f"{', '.join(f'{a:.3f}' for a in acc)} | {', '.join(f'{m:.3f}' for m in maj)} | "
                  f"{', '.join(str(r['best_epoch']) for r in rs)} | "
                  f"{sum(bool(r['stopped_early']) for r in rs)}/{len(rs)} | "
                  f"{sum(r['warning'] is not None for r in rs)}/{len(rs)} | "
                  f"{statistics.mean(r['wall_s'] for r in rs):.0f} |")


if __name__ == "__main__":
    main(sys.argv[1])
