"""The reproduction pipeline on a few samples (the full run is not part of CI), and its paired statistics."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import cli_env, warm_tool_env


REPRODUCTION = Path(__file__).resolve().parents[1] / "reproduction"
sys.path.insert(0, str(REPRODUCTION))

from report import RunResult, accuracy_difference, load_runs, value_difference  # noqa: E402
from reproduce import as_sft, mc_set  # noqa: E402


def runs_with_hits(hits: np.ndarray) -> list[RunResult]:
    return [
        RunResult("minorsft", 1e-3, 0.04, seed, 0.0, 0.0, {"domain_mc": 0.0, "general_mc": 0.0}, row)
        for seed, row in enumerate(hits, start=1)
    ]


def test_paired_accuracy_interval_reads_seeds_and_questions():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, size=(5, 400)).astype(np.int8)
    better = a.copy()
    better[:, :40] = 1  # the first 40 questions always right on b's side
    gain = accuracy_difference(runs_with_hits(a), runs_with_hits(better))
    expected = (better.astype(float) - a).mean()
    assert gain.mean == pytest.approx(expected) and gain.low > 0 and gain.verdict == "positive"
    assert gain.low <= expected <= gain.high
    same = accuracy_difference(runs_with_hits(a), runs_with_hits(a))
    assert (same.mean, same.low, same.high, same.verdict) == (0, 0, 0, "inconclusive")
    # noise alone: the interval holds zero
    noise = accuracy_difference(runs_with_hits(a), runs_with_hits(rng.permuted(a, axis=1)))
    assert noise.low < 0 < noise.high and noise.verdict == "inconclusive"
    with pytest.raises(ValueError, match="unpaired runs"):
        accuracy_difference(runs_with_hits(a), runs_with_hits(a)[:4])


def test_paired_accuracy_interval_resamples_the_seeds():
    """A gain on one seed of five is not a gain of the method: the interval must reach zero.

    A bootstrap over the questions alone would exclude zero here (400 questions, each +0.2 on average).
    """
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, size=(5, 400)).astype(np.int8)
    b = a.copy()
    b[0] = 1  # seed 1 alone answers everything
    lucky = accuracy_difference(runs_with_hits(a), runs_with_hits(b))
    assert lucky.mean > 0.05 and lucky.low <= 0 and lucky.verdict == "inconclusive"


def test_paired_value_interval_is_the_paired_t_interval():
    a, b = [0.10, 0.20, 0.15, 0.30, 0.25], [0.05, 0.12, 0.16, 0.20, 0.18]
    diff = np.subtract(b, a)
    half = 2.7764451051977987 * diff.std(ddof=1) / np.sqrt(5)  # t(0.975, 4 degrees of freedom)
    runs_a, runs_b = runs_with_hits(np.zeros((5, 1))), runs_with_hits(np.zeros((5, 1)))
    for run, x in zip(runs_a + runs_b, a + b):
        run.deviation = x
    result = value_difference(runs_a, runs_b, lambda r: r.deviation)
    assert (result.low, result.high) == pytest.approx((diff.mean() - half, diff.mean() + half))
    assert result.mean == pytest.approx(diff.mean())
    # the same difference on every seed gives no interval, not a zero-width one that would decide a claim
    shifted = runs_with_hits(np.zeros((5, 1)))
    for run, x in zip(shifted, a):
        run.deviation = x + 0.5
    same = value_difference(runs_a, shifted, lambda r: r.deviation)
    assert same.mean == pytest.approx(0.5) and same.verdict == "inconclusive" and "no interval" in str(same)


def test_the_report_reads_only_the_runs_of_its_grid(tmp_path):
    """A run directory that the grid's status does not list as finished (an earlier grid's) stays out of the report."""
    for name, lr in (("minorsft-a", 1e-3), ("minorsft-stray", 5e-3), ("minorsft-failed", 2e-3)):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        hits = {"domain_mc": "10", "general_mc": "01"}
        (run / "grid_status.json").write_text(json.dumps(dict(loss=1.0, eval={"domain_mc": 0.5}, eval_hits=hits)))
        (run / "grid_config.yaml").write_text(f"learning_rate: {lr}\npref_beta: 0.04\nseed: 1\n")
        (run / "trainer_state.json").write_text(json.dumps(dict(log_history=[dict(step=1, loss=1.0, deviation=0.1)])))
    states = [dict(name="minorsft-a", status="done"), dict(name="minorsft-failed", status="failed")]
    (tmp_path / "grid_status.json").write_text(json.dumps(dict(runs=states)))
    runs = load_runs(str(tmp_path))
    assert [(r.method, r.lr, r.beta, r.seed) for r in runs] == [("minorsft", 1e-3, 0.04, 1)]
    assert runs[0].hits.tolist() == [1, 0, 0, 1]


def test_answers_start_with_the_letter_and_vary_in_length():
    questions = mc_set("domain", 64, seed=1)
    samples = as_sft(questions)
    assert all(s["output"][0] == q["answer"] and s["output"][1:2] in ("", ".") for s, q in zip(samples, questions))
    words = [len(q["explanation"].split()) for q in questions]
    assert min(words) == 0 and max(words) >= 15  # from the letter alone to a long rationale


@pytest.mark.parametrize("option", ["--cache", "--output-dir"])
@pytest.mark.parametrize("kind", ["directory", "file"])
def test_directories_it_did_not_make_are_never_deleted(tmp_path, option, kind):
    """The script rebuilds its cache and output directory from scratch, but only where it made them."""
    theirs = tmp_path / "theirs"
    if kind == "file":  # refused at once, in one line
        theirs.write_text("precious")
        probe = (  # the script, and which of the slow imports it made before refusing (none)
            "import runpy, sys\ntry: runpy.run_path('reproduce.py', run_name='__main__')\n"
            "finally: print(*[m for m in ('torch', 'transformers', 'llamafactory') if m in sys.modules])"
        )
        proc = subprocess.run(
            [sys.executable, "-c", probe, "--smoke", "--cache", str(tmp_path / "c"), option, str(theirs)],
            cwd=REPRODUCTION,
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2 and proc.stderr.strip() == (
            f"reproduce.py: {option} {str(theirs)!r}: {str(theirs)!r} is not a directory. Point {option} at a directory."
        )
        assert proc.stdout.split() == [], proc.stdout[-2000:]
        assert theirs.read_text() == "precious" and not (tmp_path / "c").exists()
        return

    theirs.mkdir()
    (theirs / "thesis.tex").write_text("precious")
    dirs = {"--cache": str(tmp_path / "cache"), "--output-dir": str(tmp_path / "out"), option: str(theirs)}
    proc = subprocess.run(
        [sys.executable, "reproduce.py", "--smoke", *[part for pair in dirs.items() for part in pair]],
        cwd=REPRODUCTION,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and f"{option} {str(theirs)!r} holds files that this script did not" in proc.stderr
    assert (theirs / "thesis.tex").read_text() == "precious"
    assert not any(Path(path).exists() for key, path in dirs.items() if key != option)  # nothing else either


def test_smoke_run_writes_the_report(tmp_path):
    cache, docs = tmp_path / "cache", tmp_path / "docs"
    proc = subprocess.run(
        [sys.executable, "reproduce.py", "--smoke", "--cache", str(cache), "--docs", str(docs)],
        cwd=REPRODUCTION,
        env=warm_tool_env(),  # its trainings fork from a warm CLI (see conftest)
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    report = (docs / "reproduction.md").read_text()
    lengths = json.loads((cache / "answer_lengths.json").read_text())
    assert lengths["domain"]["min"] == 2 and lengths["domain"]["max"] > 20  # the letter + end token, and more
    assert f"domain 2 / {lengths['domain']['median']:g} / {lengths['domain']['max']}" in report
    for heading in ("### 1.", "### 2.", "### 3.", "## SFT using DPO and MinorSFT, side by side", "## Token mean"):
        assert heading in report
    assert len(re.findall(r"\*\*Verdict: (agrees|does not agree|inconclusive)", report)) == 3
    assert "| raw SFT, token mean |" in report
    # every run trained and was scored, the reference methods with their coefficient and its spread
    assert re.search(
        r"\| MinorSFT \*\*\(best\)\*\* \| 0\.002 \| 0\.04 \|( [^|]+ \|){3} \d\.\d{3} \| \d\.\d{3} \|", report
    )
    for name in ("fig1_deviation.png", "fig2a_lr_beta.png", "fig2b_best_accuracy.png"):
        assert (docs / "figures" / f"reproduction_{name}").stat().st_size > 0
