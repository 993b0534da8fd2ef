"""docs/reproduction.md from a finished reproduction: tables, figures, and a verdict on each claim.

Every claim compares runs of the same seeds (paired). Accuracy differences get a 95% interval from a bootstrap over
seeds and questions (the questions are shared, so each resample draws the same seeds and questions for both
sides); deviation differences, which have no questions, a paired t interval over seeds. A claim "agrees" or
"does not agree" only where the interval excludes zero; otherwise it is "inconclusive".
"""

import json
import math
import os
import platform
import shutil
import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import yaml
from scipy import stats


METHODS = {"sft": "raw SFT", "sft_dpo": "SFT using DPO", "minorsft": "MinorSFT"}
EVALS = ("domain_mc", "general_mc")
BOOTSTRAP_SAMPLES = 10_000
COEF_KEYS = ("coef", "coef_std", "coef_below_0.01")
#: "Final" deviation: the mean over the last quarter of the logged steps (one step's batch of 8 swings it widely)
FINAL_SHARE = 0.25


@dataclass
class RunResult:
    """One finished grid run: its setting, seed, logged values and per-question hits."""

    method: str
    lr: float
    beta: Optional[float]
    seed: int
    deviation: float
    loss: float
    accuracy: dict[str, float]
    hits: np.ndarray  # 0/1 per question, the eval sets one after the other
    coef: dict[str, float] = field(default_factory=dict)  # means over the training steps of COEF_KEYS

    @property
    def setting(self) -> tuple:
        return (self.method, self.lr, self.beta)

    @property
    def score(self) -> float:
        """Mean accuracy over the eval sets (the paper averages its evaluation sets)."""
        return statistics.mean(self.accuracy[e] for e in EVALS)


def load_runs(grid_dir: str) -> list[RunResult]:
    """The finished runs of a grid, from each run's ``grid_status.json`` and ``trainer_state.json``.

    Only the runs that the grid's own ``grid_status.json`` lists as finished are read: another directory under
    ``runs/`` (a run of an earlier grid file) is not part of this grid's design.
    """
    with open(os.path.join(grid_dir, "grid_status.json"), encoding="utf-8") as f:
        names = sorted(state["name"] for state in json.load(f)["runs"] if state["status"] in ("done", "skipped"))
    runs = []
    for name in names:
        path = os.path.join(grid_dir, "runs", name)
        with open(os.path.join(path, "grid_status.json"), encoding="utf-8") as f:
            status = json.load(f)
        with open(os.path.join(path, "grid_config.yaml"), encoding="utf-8") as f:
            config = yaml.safe_load(f)
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
            steps = [e for e in json.load(f)["log_history"] if "loss" in e]
        method = name.split("-")[0]
        runs.append(
            RunResult(
                method=method,
                lr=float(config["learning_rate"]),
                beta=float(config["pref_beta"]) if method in ("sft_dpo", "minorsft") else None,
                seed=int(config["seed"]),
                deviation=statistics.mean(e["deviation"] for e in steps[-max(1, round(FINAL_SHARE * len(steps))) :]),
                loss=status["loss"],
                accuracy=status["eval"],
                hits=np.array([int(c) for e in EVALS for c in status["eval_hits"][e]], dtype=np.int8),
                coef={k: statistics.mean(e[k] for e in steps) for k in COEF_KEYS if all(k in e for e in steps)},
            )
        )
    return runs


def by_setting(runs: list[RunResult]) -> dict[tuple, list[RunResult]]:
    """Setting → its runs, in seed order (so two settings pair by index)."""
    settings: dict[tuple, list[RunResult]] = {}
    for run in runs:
        settings.setdefault(run.setting, []).append(run)
    return {key: sorted(value, key=lambda r: r.seed) for key, value in settings.items()}


def best_settings(runs: list[RunResult]) -> dict[str, tuple]:
    """Each method's setting with the highest mean score over its seeds."""
    settings = by_setting(runs)
    return {
        method: max(
            (k for k in settings if k[0] == method), key=lambda k: statistics.mean(r.score for r in settings[k])
        )
        for method in dict.fromkeys(r.method for r in runs)
    }


@dataclass
class Difference:
    """A paired difference b − a: its mean, 95% interval and the seed spread it is read against."""

    mean: float
    low: float
    high: float
    spread: float  # the larger of the two sides' std over seeds

    @property
    def verdict(self) -> str:
        return "positive" if self.low > 0 else "negative" if self.high < 0 else "inconclusive"

    @property
    def below_spread(self) -> bool:
        return abs(self.mean) < self.spread

    def __str__(self) -> str:
        note = " (< seed spread)" if self.below_spread else ""
        interval = "no interval" if math.isnan(self.low) else f"{self.low:+.3f}, {self.high:+.3f}"
        return f"{self.mean:+.3f} [{interval}]{note}"


def _paired(a: list[RunResult], b: list[RunResult]) -> None:
    if [r.seed for r in a] != [r.seed for r in b]:
        raise ValueError(f"unpaired runs: seeds {[r.seed for r in a]} vs {[r.seed for r in b]}")


def accuracy_difference(a: list[RunResult], b: list[RunResult], seed: int = 0) -> Difference:
    """The paired difference b − a in mean accuracy: a bootstrap over seeds and questions, the same draws for both sides."""
    _paired(a, b)
    if len(a) < 2:
        raise ValueError("a paired comparison over seeds needs at least 2 seeds")
    diff = np.stack([rb.hits for rb in b]).astype(float) - np.stack([ra.hits for ra in a])  # seeds × questions
    n_seeds, n_questions = diff.shape
    rng = np.random.default_rng(seed)
    seed_counts = rng.multinomial(n_seeds, [1 / n_seeds] * n_seeds, size=BOOTSTRAP_SAMPLES)
    question_counts = rng.multinomial(n_questions, [1 / n_questions] * n_questions, size=BOOTSTRAP_SAMPLES)
    resampled = np.einsum("bs,sq,bq->b", seed_counts, diff, question_counts) / (n_seeds * n_questions)
    low, high = np.percentile(resampled, [2.5, 97.5])
    spread = max(_std([r.score for r in a]), _std([r.score for r in b]))
    return Difference(float(diff.mean()), float(low), float(high), spread)


def value_difference(a: list[RunResult], b: list[RunResult], value) -> Difference:
    """The paired difference b − a of ``value(run)`` (no questions): a paired t interval over the seeds.

    Fewer than 2 seeds, or differences without any spread, give no interval (NaN bounds: inconclusive).
    """
    _paired(a, b)
    va, vb = [value(r) for r in a], [value(r) for r in b]
    diff = np.array(vb) - np.array(va)
    spread = max(_std(va), _std(vb))
    sem = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else 0.0
    if not sem > 1e-12 * max(1.0, abs(diff.mean())):  # rounding alone
        return Difference(float(diff.mean()), float("nan"), float("nan"), spread)
    half = stats.t.ppf(0.975, len(diff) - 1) * sem
    return Difference(float(diff.mean()), float(diff.mean() - half), float(diff.mean() + half), spread)


def _std(values: list[float]) -> float:
    """Population std; NaN (not an error, as ``statistics.pstdev`` on 3.11) where a diverged run logged NaN or inf."""
    return float(np.std(np.asarray(values, dtype=float)))


def _ms(values: list[float]) -> str:
    return f"{float(np.mean(np.asarray(values, dtype=float))):.3f} ± {_std(values):.3f}"


def _label(setting: tuple) -> str:
    method, lr, beta = setting
    return f"{METHODS.get(method, method)} (lr {lr:g}" + (f", β {beta:g})" if beta is not None else ")")


def _claim(verdicts: list[str], wanted: str) -> str:
    """'agrees' when every comparison's interval is on the claimed side, 'does not agree' when any is on the other."""
    opposite = "negative" if wanted == "positive" else "positive"
    if verdicts and all(v == wanted for v in verdicts):
        return "agrees"
    if any(v == opposite for v in verdicts):
        return "does not agree"
    return "inconclusive"


def write_report(methods_dir: str, token_dir: str, docs_dir: str, summary: dict) -> str:
    runs = load_runs(methods_dir)
    settings = by_setting(runs)
    best = best_settings(runs)
    token_runs = sorted(load_runs(token_dir), key=lambda r: r.seed)
    if not token_runs:
        raise ValueError(f"no finished token-mean run in {token_dir}: run reproduce.py (without --report-only) first")
    design, general, lengths = summary["design"], summary["general"], summary["answer_lengths"]
    figures = os.path.join(docs_dir, "figures")
    os.makedirs(figures, exist_ok=True)
    for name in ("fig1_deviation.png", "fig2a_lr_beta.png", "fig2b_best_accuracy.png"):
        shutil.copy(os.path.join(methods_dir, name), os.path.join(figures, f"reproduction_{name}"))

    seeds = sorted({r.seed for r in runs})
    questions = design["eval_questions"]
    steps = design["domain_samples"] // design["batch_size"]
    length_text = "; ".join(
        f"{name} {v['min']} / {v['median']:g} / {v['max']}"
        for name, v in (("domain", lengths["domain"]), ("general", lengths["general"]))
    )
    lines = [
        "# Small-scale reproduction of arXiv 2408.10642",
        "",
        "Command (offline, on this project's 2-core CPU machine): `.venv/bin/python reproduction/reproduce.py`",
        f"(total {summary['minutes']:.0f} minutes; {platform.machine()}, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}). Design and why: [`reproduction/README.md`](../reproduction/README.md).",
        "",
        "**Setup.** A tiny Qwen2 model (hidden 128, 4 layers) first gets a *general* ability: SFT "
        f"({design['general_epochs']:g} epochs, lr {design['general_lr']:g}) on {design['general_samples']} generated "
        "questions "
        '"Which kind of thing is a <word>?" in the paper\'s ceval multiple-choice prompt. The options (animal, '
        "colour, fruit, tool) come in a fixed order and the category shows in the word's suffix. Each answer is the "
        "letter; for half of the samples a rationale follows: the first k words of a sentence about the category, "
        "k uniform in 1..18, so the answer length m varies from sample to sample. It is then fine-tuned on a "
        "*domain* of "
        f'{design["domain_samples"]} questions "On the star chart, what is the place named <word>?" (metal, river, '
        "city, star, with their own suffixes and rationales). Answer tokens, with the end-of-turn token "
        f"(min / median / max): {length_text}. Nothing in the data forces forgetting: whether the general ability "
        "survives depends on how far tuning moves the model, which is what the paper's methods limit.",
        "",
        "**Grid.** Raw SFT with Eq. 5 (`sft_loss_reduction: sample`, with `track_deviation`) at lr "
        + " / ".join(f"{lr:g}" for lr in design["sft_lrs"])
        + "; SFT using DPO and MinorSFT at twice those learning rates (the paper's best settings are at 2x SFT's) "
        "× β " + " / ".join(f"{b:g}" for b in design["betas"]) + f"; {len(seeds)} seeds each (seeds "
        f"{', '.join(map(str, seeds))}: the data order), {len(runs)} runs, batch {design['batch_size']}, "
        f"{steps} optimizer steps, warm-up 0.1, linear decay, the reference log-probs precomputed once "
        "(`precompute_ref_logps`). Then raw SFT with the token mean (`sft_loss_reduction: token`) at raw SFT's best "
        f"lr, same seeds ({len(token_runs)} runs). Accuracy is read from the next-token scores of A-D on held-out "
        f"sets of {questions} new words each: `domain_mc` and `general_mc` (retention), so one question moves an "
        f"accuracy by {1 / questions:.3f}. A method's *best setting* has the highest mean of the two accuracies "
        "over its seeds, mirroring the paper's average over its evaluation sets.",
        "",
        "**Statistics.** Every comparison pairs runs of the same seed. A difference is given as mean [95% interval]: "
        "for accuracies a bootstrap over seeds and questions (10,000 resamples, the same seeds and questions for "
        "both sides), for deviations a paired t interval over seeds. A claim *agrees* or *does not agree* only where "
        'the interval excludes zero, otherwise it is *inconclusive*. "(< seed spread)" marks a difference smaller '
        "than the larger std over seeds of the two sides. Choosing each method's best setting on the same held-out "
        "sets favours the best settings a little (the intervals do not correct for that selection). This is a toy: "
        "it checks the direction of the paper's claims on a task a tiny model learns in seconds, not their size on "
        "Qwen2-7B.",
        "",
        f"Before domain tuning the general model scores domain {general['domain_mc']:.3f}, general "
        f"{general['general_mc']:.3f} (chance is 0.25).",
        "",
        "| method | lr | β | domain acc | general acc | final deviation | 2σ(−βr) mean | 2σ(−βr) std | coef < 0.01 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ordered = sorted(settings, key=lambda k: (list(METHODS).index(k[0]), k[1], k[2] or 0))
    for key in ordered:
        group = settings[key]
        mark = " **(best)**" if best[key[0]] == key else ""
        coef = _coef_cells(group)
        lines.append(
            f"| {METHODS[key[0]]}{mark} | {key[1]:g} | {'—' if key[2] is None else f'{key[2]:g}'} | "
            f"{_ms([r.accuracy['domain_mc'] for r in group])} | {_ms([r.accuracy['general_mc'] for r in group])} | "
            f"{_ms([r.deviation for r in group])} | {coef} |"
        )
    lines.append(
        f"| raw SFT, token mean | {token_runs[0].lr:g} | — | {_ms([r.accuracy['domain_mc'] for r in token_runs])} | "
        f"{_ms([r.accuracy['general_mc'] for r in token_runs])} | {_ms([r.deviation for r in token_runs])} | "
        "— | — | — |"
    )
    lines += [
        "",
        "Values are mean ± std (population) over the seeds. *Final deviation* is Eq. 8 averaged over the last quarter "
        "of the training steps (one step's batch of 8 answers of varied length swings it widely). The coefficient "
        "columns are the per-sample coefficient "
        "2σ(−βr) of Eq. 7 (for SFT using DPO, twice its logged σ(−βr), the same quantity), averaged over the "
        "training steps: its mean over the samples, its spread (std over the samples of each step) and the share "
        "of samples below 0.01 as logged (for SFT using DPO: σ(−βr) < 0.01).",
        "",
        "![Fig. 1](figures/reproduction_fig1_deviation.png)",
        "![Fig. 2a](figures/reproduction_fig2a_lr_beta.png)",
        "![Fig. 2b](figures/reproduction_fig2b_best_accuracy.png)",
        "",
        "## The paper's claims at this scale",
        "",
    ]
    lines += _claim1(settings)
    lines += _claim2(settings, best)
    lines += _claim3(settings)
    lines += _side_by_side(settings)
    lines += _token_mean(settings, best, token_runs)
    lines += ["", "All runs: `results.md` of the method grid, reproduced here.", ""]
    with open(os.path.join(methods_dir, "results.md"), encoding="utf-8") as f:
        lines.append(f.read())
    path = os.path.join(docs_dir, "reproduction.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    print(f"[repro] wrote {path}")
    return path


def _coef_cells(group: list[RunResult]) -> str:
    if not group[0].coef:
        return "— | — | —"
    scale = 2.0 if group[0].method == "sft_dpo" else 1.0  # SFT using DPO logs σ(−βr)
    mean = statistics.mean(scale * r.coef["coef"] for r in group)
    spread = statistics.mean(scale * r.coef["coef_std"] for r in group)
    below = statistics.mean(r.coef["coef_below_0.01"] for r in group)
    return f"{mean:.3f} | {spread:.3f} | {below:.3f}"


def _claim1(settings: dict[tuple, list[RunResult]]) -> list[str]:
    """At 2x the learning rate, the reference methods deviate less than raw SFT (|Eq. 8|, paired by seed)."""
    lines = [
        "### 1. Fig. 1: at 2x the learning rate, SFT using DPO and MinorSFT deviate less than raw SFT",
        "",
        'Final `deviation` (Eq. 8, the mean over the last quarter of the steps). A run that collapsed can end below its reference (negative), so "less" '
        "compares sizes: each cell is |deviation| of the reference method minus |deviation| of raw SFT at half its "
        "learning rate, same seeds, mean [95% paired t interval]. Negative means the reference method deviated less.",
        "",
        "| raw SFT lr | raw SFT abs. deviation | reference-method lr | method, β | abs. deviation | difference | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for lr in sorted(k[1] for k in settings if k[0] == "sft"):
        sft_runs = settings[("sft", lr, None)]
        sft = [abs(r.deviation) for r in sft_runs]
        for key in sorted(k for k in settings if k[0] in ("sft_dpo", "minorsft") and k[1] == 2 * lr):
            other = [abs(r.deviation) for r in settings[key]]
            diff = value_difference(sft_runs, settings[key], lambda r: abs(r.deviation))
            verdicts.append(diff.verdict)
            word = {"negative": "less", "positive": "more", "inconclusive": "inconclusive"}[diff.verdict]
            lines.append(
                f"| {lr:g} | {_ms(sft)} | {key[1]:g} | {METHODS[key[0]]}, β {key[2]:g} | {_ms(other)} | {diff} | "
                f"{word} |"
            )
    counts = {
        w: verdicts.count(v) for w, v in (("less", "negative"), ("more", "positive"), ("inconclusive", "inconclusive"))
    }
    verdict = _claim(verdicts, "negative")
    lines += [
        "",
        f"**Verdict: {verdict}** (deviates less in {counts['less']}, more in {counts['more']}, inconclusive in "
        f"{counts['inconclusive']} of {len(verdicts)} pairs).",
        "",
    ]
    return lines


def _claim2(settings: dict[tuple, list[RunResult]], best: dict[str, tuple]) -> list[str]:
    """MinorSFT's best setting scores at least as well as SFT using DPO's and raw SFT's (paired by seed)."""
    lines = [
        "### 2. Fig. 2: at each method's best setting, MinorSFT scores higher than SFT using DPO and raw SFT",
        "",
        "| eval set | " + " | ".join(_label(best[m]) for m in METHODS) + " |",
        "|---" * (1 + len(METHODS)) + "|",
    ]
    for e in EVALS:
        lines.append(f"| {e} | " + " | ".join(_ms([r.accuracy[e] for r in settings[best[m]]]) for m in METHODS) + " |")
    lines.append("| mean | " + " | ".join(_ms([r.score for r in settings[best[m]]]) for m in METHODS) + " |")
    lines += ["", "Mean accuracy of MinorSFT's best setting minus the other's, paired by seed and question:", ""]
    verdicts = []
    for other in ("sft_dpo", "sft"):
        diff = accuracy_difference(settings[best[other]], settings[best["minorsft"]])
        verdicts.append(diff.verdict)
        lines.append(f"- MinorSFT − {METHODS[other]}: {diff} → {_claim([diff.verdict], 'positive')}.")
    lines += ["", f"**Verdict: {_claim(verdicts, 'positive')}.**", ""]
    return lines


def _claim3(settings: dict[tuple, list[RunResult]]) -> list[str]:
    """Each method's accuracy rises with the learning rate up to a peak, then falls (the peak against both ends)."""
    lines = [
        "### 3. Each method improves with the learning rate up to a threshold, then degrades",
        "",
        "Mean of the two accuracies at each learning rate (the better β). The peak is compared with the lowest "
        "and the highest learning rate, paired by seed and question (peak minus end: positive means it rose, or "
        "fell again). The peak and the β are chosen on the same held-out sets, which favours a rise and a fall a "
        "little.",
        "",
    ]
    verdicts = []
    for method in METHODS:
        lrs = sorted({k[1] for k in settings if k[0] == method})
        at = {
            lr: max(
                (k for k in settings if k[0] == method and k[1] == lr),
                key=lambda k: statistics.mean(r.score for r in settings[k]),
            )
            for lr in lrs
        }
        curve = {lr: statistics.mean(r.score for r in settings[at[lr]]) for lr in lrs}
        peak = max(lrs, key=curve.get)
        text = " → ".join(f"{lr:g}: {curve[lr]:.3f}" for lr in lrs)
        if peak in (lrs[0], lrs[-1]):  # no rise (or no fall) in this grid: is the next lr really worse?
            where = "lowest" if peak == lrs[0] else "highest"
            near = None if len(lrs) == 1 else lrs[1] if peak == lrs[0] else lrs[-2]
            drop = None if near is None else accuracy_difference(settings[at[near]], settings[at[peak]])
            verdicts.append("negative" if drop is not None and drop.verdict == "positive" else "inconclusive")
            lines.append(
                f"- {METHODS[method]}: {text}. Peak at the {where} learning rate"
                + ("." if drop is None else f", above the next one by {drop}")
                + (": no rise and fall in this grid." if verdicts[-1] == "negative" else ": inconclusive.")
            )
            continue
        rise = accuracy_difference(settings[at[lrs[0]]], settings[at[peak]])
        fall = accuracy_difference(settings[at[lrs[-1]]], settings[at[peak]])
        verdict = _claim([rise.verdict, fall.verdict], "positive")
        verdicts.append({"agrees": "positive", "does not agree": "negative"}.get(verdict, "inconclusive"))
        lines.append(f"- {METHODS[method]}: {text}. Rise {rise}, fall {fall}: {verdict}.")
    lines += ["", f"**Verdict: {_claim(verdicts, 'positive')}.**", ""]
    return lines


def _side_by_side(settings: dict[tuple, list[RunResult]]) -> list[str]:
    """SFT using DPO and MinorSFT on the same seeds, setting by setting, with their coefficients."""
    lines = [
        "## SFT using DPO and MinorSFT, side by side",
        "",
        "Same learning rate, β and seeds. Accuracy is the mean of the two sets; the difference is MinorSFT minus SFT "
        "using DPO (bootstrap over seeds and questions). 2σ(−βr): mean and spread over the samples, averaged over "
        "the training steps.",
        "",
        "| lr | β | SFT using DPO acc | MinorSFT acc | difference | deviation (DPO / MinorSFT) | "
        "2σ(−βr) mean (DPO / MinorSFT) | 2σ(−βr) std (DPO / MinorSFT) | coef < 0.01 (DPO / MinorSFT) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    diffs, same_runs = {}, 0
    for key in sorted(k for k in settings if k[0] == "minorsft"):
        dpo, minor = settings[("sft_dpo", key[1], key[2])], settings[key]
        diff = diffs[key] = accuracy_difference(dpo, minor)
        same_runs += sum(np.array_equal(a.hits, b.hits) and a.deviation == b.deviation for a, b in zip(dpo, minor))
        coef = lambda group, name, scale: statistics.mean(scale * r.coef[name] for r in group)  # noqa: E731
        lines.append(
            f"| {key[1]:g} | {key[2]:g} | {_ms([r.score for r in dpo])} | {_ms([r.score for r in minor])} | {diff} | "
            f"{statistics.mean(r.deviation for r in dpo):.3f} / {statistics.mean(r.deviation for r in minor):.3f} | "
            f"{coef(dpo, 'coef', 2):.3f} / {coef(minor, 'coef', 1):.3f} | "
            f"{coef(dpo, 'coef_std', 2):.3f} / {coef(minor, 'coef_std', 1):.3f} | "
            f"{coef(dpo, 'coef_below_0.01', 1):.3f} / {coef(minor, 'coef_below_0.01', 1):.3f} |"
        )
    largest = max(diffs, key=lambda k: abs(diffs[k].mean))
    decided = [k for k in diffs if diffs[k].verdict != "inconclusive"]
    lines += [
        "",
        f"Where they differ: {same_runs} of {sum(len(settings[k]) for k in diffs)} paired runs give the same answers "
        "and deviation (in the first design, with one answer length, they coincided). The largest accuracy "
        f"difference is at lr {largest[1]:g}, β {largest[2]:g}: {diffs[largest]}. "
        + (
            f"{len(decided)} of {len(diffs)} intervals exclude zero."
            if decided
            else f"None of the {len(diffs)} intervals excludes zero: the methods train differently, but at this "
            "scale neither is more accurate than the other beyond the seed spread."
        ),
        "",
        "Why they differ now: per answer token, SFT using DPO's gradient (Eq. 4) weighs a sample by β·σ(−βr), the "
        "same for a short and a long answer, so the long answers carry most of each step; MinorSFT's (Eq. 7) weighs "
        "it by 2σ(−βr)/m, each sample as much as any other, as in Eq. 5. With answers from 2 to about 50 tokens "
        "that is a different direction, not a constant factor, and AdamW no longer removes it. The two also "
        "scale r differently: the same summed log-ratio pushes the coefficient of a long answer further from 1.",
        "",
    ]
    return lines


def _token_mean(
    settings: dict[tuple, list[RunResult]], best: dict[str, tuple], token_runs: list[RunResult]
) -> list[str]:
    """Raw SFT with the token mean against Eq. 5 at the same (best) learning rate."""
    if {r.lr for r in token_runs} != {best["sft"][1]}:
        raise ValueError(
            f"the token-mean runs are at lr {sorted({r.lr for r in token_runs})}, raw SFT's best is {best['sft'][1]}"
        )
    sample = settings[best["sft"]]
    acc = accuracy_difference(sample, token_runs)
    dev = value_difference(sample, token_runs, lambda r: r.deviation)
    domain = value_difference(sample, token_runs, lambda r: r.accuracy["domain_mc"])
    general = value_difference(sample, token_runs, lambda r: r.accuracy["general_mc"])
    return [
        "## Token mean versus Eq. 5",
        "",
        f"Raw SFT at its best learning rate ({token_runs[0].lr:g}), the same seeds, with the token mean "
        "(`sft_loss_reduction: token`, stock SFT's loss) minus Eq. 5's per-sample mean:",
        "",
        f"- mean accuracy: {acc}; domain {domain}, general {general} (paired t);",
        f"- final deviation: {dev}.",
        "",
        "The token mean weighs every answer token alike, so long answers count for more, as in SFT using DPO; Eq. 5 "
        "weighs every sample alike.",
        "",
    ]
