"""When does SyncBatchNorm matter? Three studies on a harder digits task (convergence_train).

* ``tiny batch``: 1 and 2 samples per rank on 4 and 8 ranks. SyncBatchNorm, local
  BatchNorm (eval with rank 0's running stats, and with the ranks' average), GroupNorm,
  and one process with plain BatchNorm over the same global batches. At 1 sample per rank
  a BatchNorm1d (a head with Linear–BatchNorm1d) cannot train locally at all: the run
  records the error a user gets, and SyncBatchNorm trains the same model.
* ``non-iid``: 5 ranks of 4 samples, rank r drawing only from classes 2r and 2r+1.
* ``claims``: one process, batch 32: BatchNorm against GroupNorm, LayerNorm, InstanceNorm
  and no normalization for the claims made for BatchNorm: faster convergence (steps to a
  target accuracy), higher usable learning rates (a log-grid sweep with warmup),
  robustness to the initialization's scale (×0.1, ×10) and regularization (the train-test
  gap). Every claim over several seeds, with the spread.

Each run is recorded in results/convergence.json (``study``, ``method``, ``norm``,
``ranks``, ``batch_per_rank``, ``setting``, ``lr``, ``seed``, ``history`` of evaluations
with ``epoch``, ``step``, ``loss`` and ``test_acc``); the tables are printed and plotted
(results/convergence.png). Runs go two at a time, one per core.

    python benchmarks/convergence.py            # about 10 minutes on 2 cores
    python benchmarks/convergence.py --quick    # one seed, one epoch, fewer settings
"""

from __future__ import annotations

import math
import multiprocessing
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import make_parser, save_figure, write_json  # noqa: E402
from convergence_train import Run, train  # noqa: E402

NORM_NAMES = {"bn": "BatchNorm", "gn": "GroupNorm", "ln": "LayerNorm", "in": "InstanceNorm", "none": "no norm"}
TARGET = 0.7  # the test accuracy of "steps to reach"
ONE_PROCESS = "1 process, same global batch"
METHODS = ("SyncBatchNorm", "local BatchNorm", "GroupNorm", ONE_PROCESS)


def plan(quick: bool) -> list[tuple[str, str, int, int, Run]]:
    """(study, method, world, setting, run) for every run: ``world`` and ``setting`` are the
    study's ranks and samples per rank, also on its one-process runs."""
    seeds = [0] if quick else [0, 1, 2]
    epochs = 1 if quick else 4
    jobs = []
    for world, per_rank in [(4, 2)] if quick else [(w, b) for w in (4, 8) for b in (1, 2)]:
        base = Run("syncbn", world, per_rank, 0.05, epochs, 0)
        for seed in seeds:
            jobs += [
                ("tiny batch", "SyncBatchNorm", world, per_rank, replace(base, seed=seed)),
                ("tiny batch", "local BatchNorm", world, per_rank, replace(base, norm="bn-local", seed=seed)),
                # GroupNorm does not depend on how the batch is split: one process.
                ("tiny batch", "GroupNorm", world, per_rank, replace(one_process(base), norm="gn", seed=seed)),
                ("tiny batch", ONE_PROCESS, world, per_rank, replace(one_process(base), norm="bn", seed=seed)),
            ]
    head = Run("bn-local", 4, 1, 0.05, epochs, 0, head="bn1d")
    jobs += [("tiny batch", "local BatchNorm, BatchNorm1d head", 4, 1, head)]
    jobs += [("tiny batch", "SyncBatchNorm, BatchNorm1d head", 4, 1, replace(head, norm="syncbn"))]
    shards = Run("syncbn", 5, 4, 0.05, epochs, 0, sharding="non-iid")
    for seed in seeds:
        jobs += [
            ("non-iid", "SyncBatchNorm", 5, 4, replace(shards, seed=seed)),
            ("non-iid", "local BatchNorm", 5, 4, replace(shards, norm="bn-local", seed=seed)),
            ("non-iid", "GroupNorm", 5, 4, replace(one_process(shards), norm="gn", seed=seed)),
            ("non-iid", ONE_PROCESS, 5, 4, replace(one_process(shards), norm="bn", seed=seed)),
        ]
    norms = ["bn", "none"] if quick else list(NORM_NAMES)
    rates = [0.1, 1.0] if quick else [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
    for norm in norms:
        for seed in seeds:
            claim = Run(norm, 1, 32, 0.1, epochs, seed, evals_per_epoch=4)
            name = NORM_NAMES[norm]
            jobs += [("claims", f"{name}, lr {lr}", 1, 32, replace(claim, lr=lr)) for lr in rates]
            jobs += [("claims", f"{name}, init ×{s}", 1, 32, replace(claim, init_scale=s)) for s in (0.1, 10.0)]
    return jobs


def one_process(run: Run) -> Run:
    """The same global batches in one process (see convergence_train.global_batches)."""
    return replace(run, ranks=1, batch_per_rank=run.ranks * run.batch_per_rank, shards=run.ranks)


def run_all(jobs: list[tuple[str, str, int, int, Run]]) -> list[dict]:
    # Multi-rank runs first: the longest, so that the two workers end together.
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i][4].ranks)
    records: list[dict | None] = [None] * len(jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        futures = {pool.submit(train, jobs[i][4]): i for i in order}
        for future in tqdm(as_completed(futures), total=len(futures), desc="runs", file=sys.stderr):
            i = futures[future]
            study, method, world, setting, _ = jobs[i]
            records[i] = {"study": study, "method": method, "world": world, "setting": setting, **future.result()}
    return records


def final(record: dict, key: str = "test_acc") -> float:
    return record["history"][-1][key] if record["history"] else float("nan")


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def runs_of(runs: list[dict], study: str, method: str, **match) -> list[dict]:
    return [
        r for r in runs if r["study"] == study and r["method"] == method and all(r[k] == v for k, v in match.items())
    ]


def summarize(runs: list[dict]) -> dict:
    summary: dict = {"tiny batch": {}, "non-iid": {}, "claims": {}}
    for r in runs:
        if r["study"] == "claims":
            continue
        cell = summary[r["study"]].setdefault(f"W={r['world']}, {r['setting']} per rank", {})
        cell.setdefault(r["method"], []).append(r)
    for study in ("tiny batch", "non-iid"):
        for cell in summary[study].values():
            for method, chosen in list(cell.items()):
                if chosen[0].get("error"):
                    cell[method] = {"error": chosen[0]["error"]}
                    continue
                row = dict(zip(("mean", "std"), spread([final(r) for r in chosen]), strict=True))
                if method == "local BatchNorm":
                    averaged = spread([final(r, "test_acc_averaged_stats") for r in chosen])
                    row["averaged_stats_mean"], row["averaged_stats_std"] = averaged
                row["n"] = len(chosen)
                cell[method] = row
    summary["claims"] = claims(runs)
    return summary


def claims(runs: list[dict]) -> dict:
    """Per norm: final accuracy per lr, the best and the largest stable lr, steps to TARGET,
    accuracy at init ×0.1 and ×10 (lr 0.1), and the train-test gap at the best lr."""
    out = {}
    for norm, name in NORM_NAMES.items():
        mine = [r for r in runs if r["study"] == "claims" and r["norm"] == norm]
        if not mine:
            continue
        sweep = {}
        for lr in sorted({r["lr"] for r in mine if r["init_scale"] == 1.0}):
            chosen = [r for r in mine if r["lr"] == lr and r["init_scale"] == 1.0]
            # Stable: every seed ends with a finite training loss below chance (ln 10).
            stable = all(
                math.isfinite(r["history"][-1]["loss"]) and r["history"][-1]["loss"] < math.log(10) for r in chosen
            )
            mean, std = spread([final(r) for r in chosen])
            sweep[lr] = {"mean": mean, "std": std, "stable": stable, "runs": chosen}
        best = max(sweep, key=lambda lr: sweep[lr]["mean"])
        stable = [lr for lr, cell in sweep.items() if cell["stable"]]

        def steps_to_target(chosen: list[dict]) -> list[float]:
            return [next((h["step"] for h in r["history"] if h["test_acc"] >= TARGET), math.inf) for r in chosen]

        gaps = [r["history"][-1].get("train_acc", math.nan) - final(r) for r in sweep[best]["runs"]]
        init = {}
        for scale in (0.1, 1.0, 10.0):
            chosen = [r for r in mine if r["lr"] == 0.1 and r["init_scale"] == scale]
            if chosen:
                init[str(scale)] = dict(zip(("mean", "std"), spread([final(r) for r in chosen]), strict=True))
        out[name] = {
            "lr_sweep": {str(lr): {k: v for k, v in cell.items() if k != "runs"} for lr, cell in sweep.items()},
            "best_lr": best,
            "largest_stable_lr": max(stable) if stable else None,
            f"steps_to_{TARGET}_at_best_lr": steps_to_target(sweep[best]["runs"]),
            f"steps_to_{TARGET}_at_lr_0.1": steps_to_target(sweep[0.1]["runs"]) if 0.1 in sweep else None,
            "init_scale_at_lr_0.1": init,
            "train_test_gap_at_best_lr": dict(zip(("mean", "std"), spread(gaps), strict=True)),
        }
    return out


def cell_text(row: dict) -> str:
    return row["error"].split(",")[0] if "error" in row else f"{row['mean']:.3f} ± {row['std']:.3f}"


def report(summary: dict) -> None:
    for study in ("tiny batch", "non-iid"):
        cells = summary[study]
        methods = list(dict.fromkeys(m for cell in cells.values() for m in cell))
        print(f"\n{study}: final test accuracy, mean ± std over seeds")
        print("| method | " + " | ".join(cells) + " |")
        print("|---" * (1 + len(cells)) + "|")
        for method in methods:
            row = [cell_text(cells[c][method]) if method in cells[c] else "" for c in cells]
            print(f"| {method} | " + " | ".join(row) + " |")
            if method == "local BatchNorm":
                averaged = [
                    f"{cells[c][method]['averaged_stats_mean']:.3f} ± {cells[c][method]['averaged_stats_std']:.3f}"
                    for c in cells
                    if method in cells[c]
                ]
                print("| local BatchNorm, running stats averaged over ranks | " + " | ".join(averaged) + " |")
    print(f"\nclaims (one process, batch 32): final test accuracy and steps to {TARGET:.0%} test accuracy")
    print(
        "| norm | best lr | acc at best lr | largest stable lr | steps to target (best lr) | "
        "acc, init ×0.1 | acc, init ×10 | train − test gap |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, c in summary["claims"].items():
        best = c["lr_sweep"][str(c["best_lr"])]
        steps = c[f"steps_to_{TARGET}_at_best_lr"]
        reached = [s for s in steps if math.isfinite(s)]
        steps_text = f"{statistics.fmean(reached):.0f} ({len(reached)}/{len(steps)} seeds)" if reached else "never"
        init = {k: f"{v['mean']:.3f} ± {v['std']:.3f}" for k, v in c["init_scale_at_lr_0.1"].items()}
        gap = c["train_test_gap_at_best_lr"]
        print(
            f"| {name} | {c['best_lr']} | {best['mean']:.3f} ± {best['std']:.3f} | {c['largest_stable_lr']} | "
            f"{steps_text} | {init.get('0.1', '')} | {init.get('10.0', '')} | {gap['mean']:+.3f} ± {gap['std']:.3f} |"
        )
    print("\nlr sweep: final test accuracy (mean ± std; * = unstable in some seed)")
    rates = sorted({float(lr) for c in summary["claims"].values() for lr in c["lr_sweep"]})
    print("| norm | " + " | ".join(f"lr {lr}" for lr in rates) + " |")
    print("|---" * (1 + len(rates)) + "|")
    for name, c in summary["claims"].items():
        cells = [c["lr_sweep"].get(str(lr)) for lr in rates]
        text = [f"{x['mean']:.3f} ± {x['std']:.3f}{'' if x['stable'] else '*'}" if x else "" for x in cells]
        print(f"| {name} | " + " | ".join(text) + " |")


def band(axis, chosen: list[dict], label: str, key: str = "test_acc", x: str = "epoch") -> None:
    """Mean over seeds with a ±1 std band."""
    chosen = [r for r in chosen if r["history"]]
    if not chosen:
        return
    length = min(len(r["history"]) for r in chosen)
    xs = [chosen[0]["history"][i][x] for i in range(length)]
    values = [[r["history"][i][key] for r in chosen] for i in range(length)]
    means = [statistics.fmean(v) for v in values]
    stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
    (line,) = axis.plot(xs, means, "o-", markersize=3, label=label)
    axis.fill_between(
        xs,
        [m - s for m, s in zip(means, stds, strict=True)],
        [m + s for m, s in zip(means, stds, strict=True)],
        color=line.get_color(),
        alpha=0.2,
    )


def plot(runs: list[dict], summary: dict, path: Path) -> None:
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    tiny = [r for r in runs if r["study"] == "tiny batch" and "head" not in r["method"]]
    world, setting = max({(r["world"], r["setting"]) for r in tiny}, key=lambda k: k[0] / k[1])
    for method in METHODS:
        chosen = [r for r in tiny if r["method"] == method and (r["world"], r["setting"]) == (world, setting)]
        band(axes[0, 0], chosen, method)
        if method == "local BatchNorm":
            band(axes[0, 0], chosen, "local BatchNorm, averaged stats", key="test_acc_averaged_stats")
    axes[0, 0].set(title=f"tiny batch: W={world}, {setting} per rank", xlabel="epoch", ylabel="test accuracy")
    cells = summary["tiny batch"]
    width = 0.8 / len(METHODS)
    for k, method in enumerate(METHODS):
        rows = [cells[c].get(method, {}) for c in cells]
        axes[0, 1].bar(
            [i + k * width for i in range(len(cells))],
            [r.get("mean", 0) for r in rows],
            width,
            yerr=[r.get("std", 0) for r in rows],
            capsize=3,
            label=method,
        )
    axes[0, 1].set_xticks([i + 0.4 - width / 2 for i in range(len(cells))], list(cells), fontsize=8)
    axes[0, 1].set(title="tiny batch: final test accuracy", ylim=(0, 1))
    noniid = [r for r in runs if r["study"] == "non-iid"]
    for method in METHODS:
        band(axes[0, 2], [r for r in noniid if r["method"] == method], method)
        if method == "local BatchNorm":
            band(
                axes[0, 2],
                [r for r in noniid if r["method"] == method],
                "local BatchNorm, averaged stats",
                key="test_acc_averaged_stats",
            )
    axes[0, 2].set(title="non-IID: 5 ranks × 4, two classes per rank", xlabel="epoch", ylabel="test accuracy")
    for name, c in summary["claims"].items():
        rates = sorted(float(lr) for lr in c["lr_sweep"])
        axes[1, 0].errorbar(
            rates,
            [c["lr_sweep"][str(lr)]["mean"] for lr in rates],
            yerr=[c["lr_sweep"][str(lr)]["std"] for lr in rates],
            marker="o",
            capsize=3,
            label=name,
        )
    axes[1, 0].set(xscale="log", title="claims: final test accuracy vs lr", xlabel="lr (log)", ylabel="test accuracy")
    claim_runs = [r for r in runs if r["study"] == "claims" and r["init_scale"] == 1.0]
    for norm, name in NORM_NAMES.items():
        if name in summary["claims"]:
            best = summary["claims"][name]["best_lr"]
            band(
                axes[1, 1],
                [r for r in claim_runs if r["norm"] == norm and r["lr"] == best],
                f"{name}, lr {best}",
                x="step",
            )
    axes[1, 1].axhline(TARGET, color="gray", linestyle=":")
    axes[1, 1].set(title="claims: test accuracy vs step, each at its best lr", xlabel="step", ylabel="test accuracy")
    names = list(summary["claims"])
    for k, scale in enumerate(("0.1", "1.0", "10.0")):
        rows = [summary["claims"][n]["init_scale_at_lr_0.1"].get(scale, {}) for n in names]
        axes[1, 2].bar(
            [i + k * 0.27 for i in range(len(names))],
            [r.get("mean", 0) for r in rows],
            0.27,
            yerr=[r.get("std", 0) for r in rows],
            capsize=3,
            label=f"init ×{scale}",
        )
    axes[1, 2].set_xticks([i + 0.27 for i in range(len(names))], names, fontsize=8)
    axes[1, 2].set(title="claims: init scale (lr 0.1)", ylim=(0, 1), ylabel="final test accuracy")
    for axis in axes.flat:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    save_figure(fig, path)
    plt.close(fig)


def main() -> None:
    parser = make_parser(__doc__, "one seed, one epoch, fewer settings (under a minute)")
    args = parser.parse_args()
    runs = run_all(plan(args.quick))
    summary = summarize(runs)
    report(summary)
    plot(runs, summary, args.results / "convergence.png")
    config = {"target_acc": TARGET, "quick": args.quick}
    path = write_json(args.results / "convergence.json", {"config": config, "summary": summary, "runs": runs})
    print(f"\nwrote {path} and convergence.png")


if __name__ == "__main__":
    main()
