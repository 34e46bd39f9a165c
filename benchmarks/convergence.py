"""Convergence on scikit-learn's digits with launch/train.py: what normalization buys.

(a) No normalization vs BatchNorm at a low and a high learning rate, one process:
    loss curves. (b) Tiny per-rank batches (2 and 4) on 4 ranks: local BatchNorm,
    SyncBatchNorm and GroupNorm, against one process with the same global batch and
    plain BatchNorm; final test accuracy as mean ± std over seeds, and curves. The
    4-rank runs use torchrun and Gloo; on this 2-core machine they are slow but exact.

    python benchmarks/convergence.py            # writes results/convergence.json and .png
    python benchmarks/convergence.py --quick    # one epoch, one seed, 2 ranks of 8 samples
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import make_parser, save_figure, write_json  # noqa: E402

ROOT = Path(__file__).parents[1]
METHODS = {  # label: (norm, ranks or None for one process with the whole global batch)
    "SyncBatchNorm": ("syncbn", None),
    "local BatchNorm": ("bn", None),
    "GroupNorm": ("gn", None),
    "1 process, same global batch": ("bn", 1),
}


def train(norm: str, ranks: int, batch: int, lr: float, epochs: int, seed: int) -> list[dict]:
    """Per-epoch metrics of one launch/train.py run."""
    with tempfile.TemporaryDirectory() as tmp:
        history = Path(tmp) / "history.json"
        options = ["--norm", norm, "--batch-size", str(batch), "--lr", str(lr), "--epochs", str(epochs)]
        options += ["--seed", str(seed), "--history", str(history)]
        if ranks == 1:
            command = [sys.executable, str(ROOT / "launch" / "train.py"), *options]
        else:
            command = ["bash", str(ROOT / "launch" / "torchrun.sh"), str(ranks), *options]
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        return json.loads(history.read_text())


def main() -> None:
    parser = make_parser(__doc__, "one epoch, one seed, 2 ranks of 8 samples")
    args = parser.parse_args()
    ranks, seeds, epochs, lr = (2, [0], 1, 0.05) if args.quick else (4, [0, 1, 2], 4, 0.05)
    lr_epochs, rates = (1, (0.02, 0.2)) if args.quick else (8, (0.02, 0.2))
    per_rank = (8,) if args.quick else (2, 4)

    # (study, method, norm, ranks, batch per rank, lr, epochs, seed, the study's per-rank batch)
    jobs = [("lr", "lr", norm, 1, 32, rate, lr_epochs, 0, 32) for norm in ("none", "bn") for rate in rates]
    for setting in per_rank:
        for label, (norm, fixed) in METHODS.items():
            world = fixed or ranks
            batch = setting * ranks // world
            jobs += [("small batch", label, norm, world, batch, lr, epochs, seed, setting) for seed in seeds]
    runs = []
    for study, label, norm, world, batch, rate, n_epochs, seed, setting in tqdm(jobs, desc="runs", file=sys.stderr):
        history = train(norm, world, batch, rate, n_epochs, seed)
        runs.append(
            {
                "study": study,
                "method": label,
                "norm": norm,
                "ranks": world,
                "batch_per_rank": batch,
                "setting": setting,
                "lr": rate,
                "seed": seed,
                "history": history,
            }
        )

    summary = summarize(runs, per_rank)
    print(f"\nFinal test accuracy on {ranks} ranks, mean ± std over {len(seeds)} seed(s), {epochs} epochs, lr {lr}:")
    print("| method | " + " | ".join(f"{b} per rank (global {b * ranks})" for b in per_rank) + " |")
    print("|---" * (1 + len(per_rank)) + "|")
    for label in METHODS:
        cells = [f"{summary[str(b)][label]['mean']:.4f} ± {summary[str(b)][label]['std']:.4f}" for b in per_rank]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("\nNo normalization vs BatchNorm, one process, batch 32, final loss / test accuracy:")
    for run in (r for r in runs if r["study"] == "lr"):
        last = run["history"][-1]
        print(f"  norm={run['norm']:4s} lr={run['lr']:<5} loss {last['loss']:.4f}  test acc {last['test_acc']:.4f}")
    plot(runs, summary, per_rank, args.results / "convergence.png")
    config = {"ranks": ranks, "seeds": seeds, "epochs": epochs, "lr": lr}
    config["lr_study"] = {"epochs": lr_epochs, "rates": rates, "batch": 32}
    path = write_json(args.results / "convergence.json", {"config": config, "summary": summary, "runs": runs})
    print(f"\nwrote {path} and convergence.png")


def summarize(runs: list[dict], per_rank: tuple[int, ...]) -> dict:
    summary: dict = {}
    for batch in per_rank:
        summary[str(batch)] = {}
        for label in METHODS:
            finals = [
                r["history"][-1]["test_acc"]
                for r in runs
                if r["study"] == "small batch" and r["method"] == label and r["setting"] == batch
            ]
            spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
            summary[str(batch)][label] = {"mean": statistics.fmean(finals), "std": spread, "n": len(finals)}
    return summary


def plot(runs: list[dict], summary: dict, per_rank: tuple[int, ...], path: Path) -> None:
    fig, axes = plt.subplots(1, 2 + len(per_rank), figsize=(5 * (2 + len(per_rank)), 4))
    for run in (r for r in runs if r["study"] == "lr"):
        epochs = [h["epoch"] for h in run["history"]]
        axes[0].plot(epochs, [h["loss"] for h in run["history"]], "o-", label=f"{run['norm']}, lr {run['lr']}")
    axes[0].set(
        xlabel="epoch", ylabel="training loss", yscale="log", title="No norm vs BatchNorm (1 process, batch 32)"
    )
    labels = list(METHODS)
    width = 0.8 / len(per_rank)
    for i, batch in enumerate(per_rank):
        means = [summary[str(batch)][label]["mean"] for label in labels]
        stds = [summary[str(batch)][label]["std"] for label in labels]
        positions = [k + i * width for k in range(len(labels))]
        axes[1].bar(positions, means, width, yerr=stds, capsize=3, label=f"{batch} per rank")
    axes[1].set_xticks([k + width * (len(per_rank) - 1) / 2 for k in range(len(labels))])
    axes[1].set_xticklabels([label.replace(", ", ",\n") for label in labels], fontsize=7)
    axes[1].set(ylabel="final test accuracy", ylim=(0, 1), title="Tiny per-rank batches (mean ± std)")
    for axis, batch in zip(axes[2:], per_rank, strict=True):
        for label in labels:
            chosen = [r for r in runs if r["study"] == "small batch" and r["method"] == label and r["setting"] == batch]
            if chosen:
                epochs = [h["epoch"] for h in chosen[0]["history"]]
                mean = [statistics.fmean(r["history"][e]["test_acc"] for r in chosen) for e in range(len(epochs))]
                axis.plot(epochs, mean, "o-", label=label)
        axis.set(xlabel="epoch", ylabel="test accuracy (mean over seeds)", title=f"{batch} samples per rank")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
