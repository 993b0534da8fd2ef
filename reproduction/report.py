"""docs/reproduction.md from a finished reproduction grid: tables, figures, and a verdict on each claim."""

import csv
import os
import platform
import shutil
import statistics
import time


METHODS = {"sft": "raw SFT", "sft_dpo": "SFT using DPO", "minorsft": "MinorSFT"}
EVALS = ("domain_mc", "general_mc")


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.pstdev(values):.3f}"


def load_settings(grid_dir: str) -> dict[tuple, dict[str, list[float]]]:
    """(method, lr, β) → lists over seeds of each measured value."""
    with open(os.path.join(grid_dir, "results.csv"), encoding="utf-8") as f:
        rows = [row for row in csv.DictReader(f) if row["status"] == "done"]

    settings: dict[tuple, dict[str, list[float]]] = {}
    for row in rows:
        beta = float(row["pref_beta"]) if row.get("pref_beta") else None
        values = settings.setdefault((row["method"], float(row["learning_rate"]), beta), {})
        for key in ("final_loss", "final_deviation") + tuple(f"acc_{e}" for e in EVALS):
            values.setdefault(key, []).append(float(row[key]))
    return settings


def _seed_means(values: dict[str, list[float]]) -> list[float]:
    """Each seed's mean accuracy over the eval sets (the lists are in seed order)."""
    return [statistics.mean(accs) for accs in zip(*(values[f"acc_{e}"] for e in EVALS))]


def score(values: dict[str, list[float]]) -> float:
    return statistics.mean(statistics.mean(values[f"acc_{e}"]) for e in EVALS)


def write_report(grid_dir: str, docs_dir: str, general: dict[str, float], minutes: float) -> str:
    settings = load_settings(grid_dir)
    figures = os.path.join(docs_dir, "figures")
    os.makedirs(figures, exist_ok=True)
    for name in ("fig1_deviation.png", "fig2a_lr_beta.png", "fig2b_best_accuracy.png"):
        shutil.copy(os.path.join(grid_dir, name), os.path.join(figures, f"reproduction_{name}"))

    best = {m: max((k for k in settings if k[0] == m), key=lambda k: score(settings[k])) for m in METHODS}
    sft_lrs = " / ".join(f"{k[1]:g}" for k in sorted(k for k in settings if k[0] == "sft"))
    betas = " / ".join(f"{b:g}" for b in sorted({k[2] for k in settings if k[2] is not None}))
    seeds = len(next(iter(settings.values()))["final_loss"])
    runs = sum(len(v["final_loss"]) for v in settings.values())
    lines = [
        "# Small-scale reproduction of arXiv 2408.10642",
        "",
        "Command (offline, on this project's 2-core CPU machine): `.venv/bin/python reproduction/reproduce.py`",
        f"(total {minutes:.0f} minutes; {platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}).",
        "",
        "**Setup.** A tiny Qwen2 model (hidden 128, 4 layers, 643k parameters) first gets a *general* ability: SFT "
        '(5 epochs, lr 1e-3) on 800 generated questions "Which kind of thing is a <word>?" in the paper\'s ceval '
        "multiple-choice prompt, answered by a letter. The options (animal, colour, fruit, tool) come in a fixed "
        "order, and the category shows in the word's suffix (-ox, -el, -ap, -ik). It is then fine-tuned on a "
        '*domain* of 64 questions "On the star chart, what is the place named <word>?" with the options metal, '
        "river, city, star and their own suffixes (-um, -ar, -os, -is). Nothing in the data forces forgetting: "
        "whether the general ability survives depends on how far tuning moves the model, which is what the "
        "paper's methods limit. "
        "Each method runs over a grid: "
        f"raw SFT (Eq. 5: `sft_loss_reduction: sample`, with `track_deviation`) at lr {sft_lrs}; SFT using DPO "
        "and MinorSFT at twice those learning "
        f"rates (the paper's best settings are at 2x SFT's) × β {betas}; {seeds} seeds each "
        f"({runs} runs, batch 16, warm-up 0.1, linear decay, 1 epoch = 4 steps). Accuracy is read from the "
        "next-token scores of A-D on held-out question sets of 200 new words each: `domain_mc` and `general_mc` "
        "(retention). Values are mean ± std (population) over the seeds. A method's *best setting* is the one with "
        "the highest mean of the two accuracies, mirroring the paper's average over its evaluation sets. Every "
        "answer here is one letter plus the end-of-turn token, so all answers have the same length and Eq. 5's "
        "sample mean equals stock SFT's token mean: the SFT rows are the same as with `sft_loss_reduction: token`. "
        "This is a "
        "toy: it checks the direction of the paper's claims on a task a 643k-parameter model learns in seconds, "
        "not their size on Qwen2-7B.",
        "",
        f"Before domain tuning the general model scores domain {general['domain_mc']:.3f}, general "
        f"{general['general_mc']:.3f} (chance is 0.25).",
        "",
        "| method | lr | β | domain acc | general acc | final deviation | final loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for (method, lr, beta), v in sorted(
        settings.items(), key=lambda kv: (list(METHODS).index(kv[0][0]), kv[0][1], kv[0][2] or 0)
    ):
        mark = " **(best)**" if best[method] == (method, lr, beta) else ""
        lines.append(
            f"| {METHODS[method]}{mark} | {lr:g} | {'—' if beta is None else f'{beta:g}'} | "
            f"{_mean_std(v['acc_domain_mc'])} | {_mean_std(v['acc_general_mc'])} | "
            f"{_mean_std(v['final_deviation'])} | {_mean_std(v['final_loss'])} |"
        )

    lines += [
        "",
        "![Fig. 1](figures/reproduction_fig1_deviation.png)",
        "![Fig. 2a](figures/reproduction_fig2a_lr_beta.png)",
        "![Fig. 2b](figures/reproduction_fig2b_best_accuracy.png)",
        "",
        "## The paper's claims at this scale",
        "",
    ]

    # Claim 1: at 2x the learning rate, the reference methods deviate less than raw SFT. Eq. 8 is signed; a run
    # that collapsed ends below the reference (negative), so "less" compares the size |m_θ|.
    lines += [
        "### 1. Fig. 1: at 2x the learning rate, SFT using DPO and MinorSFT deviate less than raw SFT",
        "",
        "Final `deviation` (Eq. 8), mean over seeds. A negative value means the model ended up giving the domain "
        "answers *less* probability than the reference did, which happens here only in runs that collapsed. "
        '"Less" therefore compares sizes, |deviation|.',
        "",
        "| raw SFT lr | raw SFT | reference-method lr | "
        + " | ".join(
            f"{METHODS[m]} β {b:g}"
            for m in ("sft_dpo", "minorsft")
            for b in sorted({k[2] for k in settings if k[0] == m})
        )
        + " |",
    ]
    lines.append("|---" * (3 + sum(len({k[2] for k in settings if k[0] == m}) for m in ("sft_dpo", "minorsft"))) + "|")
    less = more = 0
    for lr in sorted({k[1] for k in settings if k[0] == "sft"}):
        sft = statistics.mean(settings[("sft", lr, None)]["final_deviation"])
        cells = []
        for method in ("sft_dpo", "minorsft"):
            for beta in sorted({k[2] for k in settings if k[0] == method}):
                other = statistics.mean(settings[(method, 2 * lr, beta)]["final_deviation"])
                smaller = abs(other) < abs(sft)
                less, more = less + smaller, more + (not smaller)
                cells.append(f"{other:.3f} ({'less' if smaller else 'more'})")
        lines.append(f"| {lr:g} | {sft:.3f} | {2 * lr:g} | " + " | ".join(cells) + " |")
    claim1 = (
        "agrees" if more == 0 else ("does not agree" if less == 0 else f"mixed: less in {less} of {less + more} pairs")
    )
    lines += ["", f"**Verdict: {claim1}.**", ""]

    # Claim 2: MinorSFT >= SFT using DPO and >= raw SFT at each method's best setting; a tie is no evidence
    lines += [
        "### 2. Fig. 2: at each method's best setting, MinorSFT ≥ SFT using DPO and ≥ raw SFT",
        "",
        "| eval set | "
        + " | ".join(
            f"{METHODS[m]} ({best[m][1]:g}" + (f", β {best[m][2]:g})" if best[m][2] else ")") for m in METHODS
        )
        + " |",
        "|---" * (1 + len(METHODS)) + "|",
    ]
    fails = ties = 0
    for e in EVALS + ("mean",):
        acc = {
            m: (score(settings[best[m]]) if e == "mean" else statistics.mean(settings[best[m]][f"acc_{e}"]))
            for m in METHODS
        }
        spread = {
            m: statistics.pstdev(_seed_means(settings[best[m]]) if e == "mean" else settings[best[m]][f"acc_{e}"])
            for m in METHODS
        }
        others = max(acc["sft_dpo"], acc["sft"])
        fails, ties = fails + (acc["minorsft"] < others), ties + (acc["minorsft"] == others)
        lines.append(f"| {e} | " + " | ".join(f"{acc[m]:.3f} ± {spread[m]:.3f}" for m in METHODS) + " |")
    claim2 = "does not agree" if fails else ("inconclusive: the best settings tie" if ties else "agrees")
    lines += ["", f"**Verdict: {claim2}.** Differences smaller than the seed spread are not evidence either way.", ""]

    # Claim 3: accuracy rises with the learning rate up to a threshold, then falls
    lines += [
        "### 3. Each method improves with the learning rate up to a threshold, then degrades",
        "",
        "Mean of the two accuracies at each learning rate (the better β):",
        "",
    ]
    shapes = []
    for method in METHODS:
        lrs = sorted({k[1] for k in settings if k[0] == method})
        curve = [max(score(settings[k]) for k in settings if k[0] == method and k[1] == lr) for lr in lrs]
        top = max(curve)
        first, last = curve.index(top), len(curve) - 1 - curve[::-1].index(top)
        rises, falls = first > 0, last < len(curve) - 1
        shape = (
            "rises, peaks, then degrades"
            if rises and falls
            else "already at its best at the lowest learning rate, then degrades: no rise seen"
            if falls
            else "still rising at the highest learning rate"
            if rises
            else "flat"
        )
        shapes.append(rises and falls)
        lines.append(
            f"- {METHODS[method]}: " + " → ".join(f"{lr:g}: {c:.3f}" for lr, c in zip(lrs, curve)) + f" ({shape})."
        )
    claim3 = "agrees" if all(shapes) else ("does not agree" if not any(shapes) else "agrees for some methods only")
    lines += ["", f"**Verdict: {claim3}.**", ""]

    lines += [
        "Why SFT using DPO and MinorSFT can coincide, and more on how this task was chosen: "
        "[`reproduction/README.md`](../reproduction/README.md).",
        "",
        "All runs: `results.md` of the grid, reproduced here.",
        "",
    ]
    with open(os.path.join(grid_dir, "results.md"), encoding="utf-8") as f:
        lines.append(f.read())
    path = os.path.join(docs_dir, "reproduction.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    print(f"[repro] wrote {path}")
    return path
