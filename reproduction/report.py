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
        "(5 epochs, lr 1e-3) on 800 generated questions \"Which kind of thing is a <word>?\" in the paper's ceval "
        "multiple-choice prompt, answered by a letter. The options (animal, colour, fruit, tool) come in a fixed "
        "order, and the category shows in the word's suffix (-ox, -el, -ap, -ik). It is then fine-tuned on a "
        "*domain* of 400 questions \"On the star chart, what is the place named <word>?\" with the options metal, "
        "river, city, star. The domain uses the same four suffixes with a deranged mapping (-ox is an animal, "
        "option A, in the general task, but a city, option C, in the domain). A model that learns the domain through "
        "the shortcut \"suffix → letter\" therefore forgets the general task: tuning interferes with what the model "
        "knew, which is the situation the paper's deviation constraint addresses. Each method runs over a grid: "
        f"raw SFT (with `track_deviation`) at lr {sft_lrs}; SFT using DPO and MinorSFT at twice those learning "
        f"rates (the paper's best settings are at 2x SFT's) × β {betas}; {seeds} seeds each "
        f"({runs} runs, batch 16, warm-up 0.1, linear decay, 1 epoch = 25 steps). Accuracy is read from the "
        "next-token scores of A-D on held-out question sets of 200 new words each: `domain_mc` and `general_mc` "
        "(retention). Values are mean ± std (population) over the seeds. A method's *best setting* is the one with "
        "the highest mean of the two accuracies, mirroring the paper's average over its evaluation sets. This is a "
        "toy: it checks the direction of the paper's claims on a task a 643k-parameter model learns in seconds, "
        "not their size on Qwen2-7B.",
        "",
        f"Before domain tuning the general model scores domain {general['domain_mc']:.3f}, general "
        f"{general['general_mc']:.3f} (chance is 0.25).",
        "",
        "| method | lr | β | domain acc | general acc | final deviation | final loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for (method, lr, beta), v in sorted(settings.items(), key=lambda kv: (list(METHODS).index(kv[0][0]), kv[0][1], kv[0][2] or 0)):
        mark = " **(best)**" if best[method] == (method, lr, beta) else ""
        lines.append(f"| {METHODS[method]}{mark} | {lr:g} | {'—' if beta is None else f'{beta:g}'} | "
                     f"{_mean_std(v['acc_domain_mc'])} | {_mean_std(v['acc_general_mc'])} | "
                     f"{_mean_std(v['final_deviation'])} | {_mean_std(v['final_loss'])} |")  # fmt: skip

    lines += ["", "![Fig. 1](figures/reproduction_fig1_deviation.png)",
              "![Fig. 2a](figures/reproduction_fig2a_lr_beta.png)",
              "![Fig. 2b](figures/reproduction_fig2b_best_accuracy.png)", "", "## The paper's claims at this scale", ""]  # fmt: skip

    # Claim 1: at 2x the learning rate, the reference methods deviate less than raw SFT
    rows, agree = [], True
    for lr in sorted({k[1] for k in settings if k[0] == "sft"}):
        sft = statistics.mean(settings[("sft", lr, None)]["final_deviation"])
        for method in ("sft_dpo", "minorsft"):
            for beta in sorted({k[2] for k in settings if k[0] == method}):
                other = statistics.mean(settings[(method, 2 * lr, beta)]["final_deviation"])
                agree &= other < sft
                rows.append(f"raw SFT lr {lr:g}: {sft:.3f} vs {METHODS[method]} lr {2 * lr:g} β {beta:g}: {other:.3f}")
    lines += [f"1. **Fig. 1, the reference methods at 2x the learning rate deviate less than raw SFT: "
              f"{'agrees' if agree else 'does not agree everywhere'}.** Final deviation (mean over seeds): "
              + "; ".join(rows) + "."]  # fmt: skip

    # Claim 2: MinorSFT >= SFT using DPO and >= raw SFT at each method's best setting; a tie is no evidence
    parts, fails, ties = [], 0, 0
    for e in EVALS + ("mean",):
        acc = {m: (score(settings[best[m]]) if e == "mean" else statistics.mean(settings[best[m]][f"acc_{e}"])) for m in METHODS}
        if acc["minorsft"] < max(acc["sft_dpo"], acc["sft"]):
            fails, verdict = fails + 1, "fails"
        elif acc["minorsft"] == max(acc["sft_dpo"], acc["sft"]):
            ties, verdict = ties + 1, "tie"
        else:
            verdict = "holds"
        parts.append(f"{e}: " + ", ".join(f"{METHODS[m]} {acc[m]:.3f}" for m in METHODS) + f" ({verdict})")
    claim2 = "does not agree" if fails else ("inconclusive (ties)" if ties else "agrees")
    lines += [f"2. **Fig. 2, MinorSFT ≥ SFT using DPO and ≥ raw SFT at each method's best setting: {claim2}.** "
              + "; ".join(parts) + ". Seed-to-seed spreads are in the table; differences smaller than them are not "
              "evidence either way."]  # fmt: skip

    # Claim 3: accuracy rises with the learning rate up to a threshold, then falls
    parts, claim3 = [], True
    for method in METHODS:
        lrs = sorted({k[1] for k in settings if k[0] == method})
        curve = [max(score(settings[k]) for k in settings if k[0] == method and k[1] == lr) for lr in lrs]
        peak = curve.index(max(curve))
        flat = max(curve) == min(curve)
        shaped = 0 < peak < len(curve) - 1 and not flat
        claim3 &= shaped
        parts.append(f"{METHODS[method]}: " + " → ".join(f"{lr:g}: {c:.3f}" for lr, c in zip(lrs, curve))
                     + (" (flat)" if flat else " (peak inside)" if shaped else " (peak at an end of the grid)"))  # fmt: skip
    lines += [f"3. **Each method improves with the learning rate up to a threshold, then degrades: "
              f"{'agrees' if claim3 else 'does not agree everywhere'}.** Mean accuracy of the best β at each "
              "learning rate: " + "; ".join(parts) + ".", ""]  # fmt: skip

    lines += ["All runs: `results.md` of the grid, reproduced here.", ""]
    with open(os.path.join(grid_dir, "results.md"), encoding="utf-8") as f:
        lines.append(f.read())
    path = os.path.join(docs_dir, "reproduction.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    print(f"[repro] wrote {path}")
    return path
