"""The paper's figures from finished runs (matplotlib, Agg backend).

- Fig. 1: deviation (Eq. 8) per step of several runs on one chart;
- Fig. 2a: mean accuracy over learning rate × β, one panel per method;
- Fig. 2b: best accuracy per method on each eval set.
"""

import dataclasses
import math
import statistics
import sys

from .runs import Run, log_history, step_values


NO_DEVIATION = "no run logged a deviation: stages sft and sft_go log it with `track_deviation: true`"
NO_RUNS = "no finished run to plot: every run failed or is still to train (a grid lists them in grid_status.json)"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def point_marker(values) -> str | None:
    """The marker "o" where no two finite values are adjacent: such points draw no line (one log, NaNs between)."""
    finite = [isinstance(v, (int, float)) and math.isfinite(v) for v in values]
    return None if any(a and b for a, b in zip(finite, finite[1:])) else "o"


def plot_deviation_curves(runs: dict[str, str], path: str) -> str:
    """Fig. 1: one deviation curve per label → run directory."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, output_dir in runs.items():
        points = step_values(log_history(output_dir), "deviation")
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, label=label, marker=point_marker(values))
    ax.set_xlabel("step")
    ax.set_ylabel("deviation  (1/N) Σ (1/m) log πθ/πref   (Eq. 8)")
    ax.set_title("Deviation from the reference model")
    if ax.lines:
        ax.legend()
    else:  # an empty chart would look like a plotting bug: say why, on it and on the console
        why = NO_DEVIATION if runs else NO_RUNS
        ax.text(0.5, 0.5, why.replace(": ", ":\n"), ha="center", va="center", transform=ax.transAxes)
        print(f"{path}: {why}", file=sys.stderr)
    return _save(fig, path)


def plot_best_accuracy(runs: list[Run], best: dict[str, Run], eval_sets: list[str], path: str) -> str:
    """Fig. 2b: for each eval set, the accuracy of each method's best setting (mean ± std over its seeds)."""
    plt = _pyplot()
    methods = [m for m, run in best.items() if run is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        seeds = [r for r in runs if r.method == method and r.setting == best[method].setting and r.result.get("eval")]
        means = [statistics.mean(r.result["eval"][e] for r in seeds) for e in eval_sets]
        stds = [statistics.pstdev([r.result["eval"][e] for r in seeds]) for e in eval_sets]
        ax.bar([j + i * width for j in range(len(eval_sets))], means, width, yerr=stds, capsize=3, label=method)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(eval_sets))], eval_sets)
    ax.set_ylabel("accuracy")
    ax.set_title("Best setting of each method")
    ax.legend()
    return _save(fig, path)


def learning_rate(run: Run) -> float:
    """A run's learning rate: its config's (YAML may give "2e-5" as a string), else the Trainer's default."""
    value = run.config.get("learning_rate")
    if value is None:
        from transformers import TrainingArguments

        value = next(f.default for f in dataclasses.fields(TrainingArguments) if f.name == "learning_rate")
    return float(value)


def plot_accuracy_heatmaps(runs: list[Run], eval_sets: list[str], path: str) -> str:
    """Fig. 2a: mean accuracy (over eval sets and seeds) on learning rate × β, one panel per method."""
    plt = _pyplot()
    methods = list(dict.fromkeys(r.method for r in runs))
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.6), squeeze=False)
    for ax, method in zip(axes[0], methods):
        done = [r for r in runs if r.method == method and r.result.get("eval")]
        lrs = sorted({learning_rate(r) for r in done})
        betas = sorted(
            {r.config.get("pref_beta") for r in done if r.config.get("stage") != "sft"} or {None}, key=lambda b: b or 0
        )
        grid = [[float("nan")] * len(lrs) for _ in betas]
        for bi, beta in enumerate(betas):
            for li, lr in enumerate(lrs):
                cell = [
                    statistics.mean(r.result["eval"][e] for e in eval_sets)
                    for r in done
                    if learning_rate(r) == lr and (beta is None or r.config.get("pref_beta") == beta)
                ]
                if cell:
                    grid[bi][li] = statistics.mean(cell)
        image = ax.imshow(grid, cmap="viridis", aspect="auto")
        for bi in range(len(betas)):
            for li in range(len(lrs)):
                ax.text(li, bi, f"{grid[bi][li]:.3f}", ha="center", va="center", color="white", fontsize=8)
        ax.set_xticks(range(len(lrs)), [f"{float(lr):g}" for lr in lrs])
        ax.set_yticks(range(len(betas)), ["—" if b is None else f"{b:g}" for b in betas])
        ax.set_xlabel("learning rate")
        ax.set_ylabel("β")
        ax.set_title(method)
        fig.colorbar(image, ax=ax)
    return _save(fig, path)
