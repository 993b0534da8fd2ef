"""The grid runner and the multiple-choice evaluator, end to end on the tiny model (a three-run mini grid)."""

import csv
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from llamafactory.hparams import parser  # noqa: F401 (its loggers bind to pytest's stderr, not one test's capsys)

from conftest import cli_env, warm_tool_env
from llamafactory_minorsft.tools.tiny import make_mc_questions


TOOL = str(Path(sys.executable).parent / "llamafactory-minorsft")


def tool(*args, cwd, check=True, env=None):
    env = (
        env or warm_tool_env()
    )  # the grid's trainings fork from a warm CLI (the stopped-grid test starts the real one)
    proc = subprocess.run([TOOL, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-5000:])
    return proc


def tool_in_process(*args, cwd, capsys, monkeypatch) -> tuple[int, str, str]:
    """The console script's ``main`` in this process, from ``cwd``: (exit status, stdout, stderr).

    For what ends before any run: a new process would spend its time importing what this one has imported.
    """
    from llamafactory_minorsft.tools.cli import main

    monkeypatch.chdir(cwd)
    capsys.readouterr()
    code = main([str(arg) for arg in args])
    return code, *capsys.readouterr()


def write_mc(tmp_path):
    questions = make_mc_questions(24, seed=5)
    jsonl = tmp_path / "domain_mc.jsonl"
    jsonl.write_text("\n".join(json.dumps(q) for q in questions[:12]))
    with open(tmp_path / "general_mc.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "question", "A", "B", "C", "D", "answer", "explanation"])
        writer.writeheader()
        writer.writerows({"id": i, "explanation": "", **q} for i, q in enumerate(questions[12:]))
    return jsonl, tmp_path / "general_mc.csv"


def write_grid(tiny, tmp_path, **extra) -> Path:
    base = dict(
        model_name_or_path=tiny.model,
        do_train=True,
        finetuning_type="full",
        dataset="minorsft_demo",
        dataset_dir=tiny.data,
        template="qwen",
        cutoff_len=128,
        overwrite_cache=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        per_device_train_batch_size=4,
        max_steps=3,
        dataloader_num_workers=0,
    )
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    grid = dict(
        base="base.yaml",
        output_dir=str(tmp_path / "grid_out"),
        eval=dict(files=["domain_mc.jsonl", "general_mc.csv"], prompt="ceval"),
        blocks=[
            dict(name="sft", set=dict(stage="sft", track_deviation=True), grid=dict(learning_rate=[1e-3])),
            dict(name="minorsft", set=dict(stage="minorsft"), grid=dict(learning_rate=[2e-3], pref_beta=[0.04])),
            dict(
                name="sft_go",
                set=dict(stage="sft_go", sft_go_grouping="tfidf", track_deviation=True, learning_rate=1e-3),
                grid=dict(sft_go_lambda=[0.5]),
            ),
        ],
        **extra,
    )
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_eval_mc_scores_full_models_and_reads_all_formats(tiny, tmp_path):
    jsonl, csv_path = write_mc(tmp_path)
    proc = tool(
        "eval-mc",
        "--model",
        tiny.model,
        "--template",
        "qwen",
        "--output",
        tmp_path / "r.json",
        jsonl,
        csv_path,
        cwd=tmp_path,
    )
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["domain_mc"]["total"] == 12 and results["general_mc"]["total"] == 12
    assert all(0 <= r["accuracy"] <= 1 and r["correct"] == round(r["accuracy"] * r["total"]) for r in results.values())
    # one hit per question, in file order, that adds up to the count (the reproduction pairs runs by question)
    assert all(len(r["hits"]) == r["total"] and r["hits"].count("1") == r["correct"] for r in results.values())
    assert "| domain_mc |" in proc.stdout


def test_eval_mc_refuses_a_tokenizer_larger_than_the_model(tiny, tmp_path):
    """A tokenizer that is not the model's gives ids past its embedding: a clear error, not an IndexError."""
    import shutil

    from llamafactory_minorsft.tools.eval_mc import MultipleChoiceScorer
    from llamafactory_minorsft.tools.tiny import build_tokenizer, make_instruction_data

    model = tmp_path / "model"
    shutil.copytree(tiny.model, model)
    texts = [s["instruction"] + " " + s["output"] for s in make_instruction_data(512, seed=3)]
    build_tokenizer(texts, str(model), vocab_size=4096)
    with pytest.raises(ValueError, match="do not belong together"):
        MultipleChoiceScorer(str(model), "qwen")


def test_eval_mc_rejects_a_file_missing_columns(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "A": "1", "B": "2", "answer": "A"}))
    proc = tool("eval-mc", "--model", tiny.model, "--template", "qwen", bad, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "lacks the column(s) C, D" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_files_with_a_byte_order_mark_are_read_and_broken_ones_are_named(tmp_path):
    from llamafactory_minorsft.tools.eval_mc import load_questions

    _, general = write_mc(tmp_path)
    bom = tmp_path / "excel.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + general.read_bytes())  # as Excel saves "CSV UTF-8"
    assert load_questions(str(bom)) == load_questions(str(general))
    for name, text, message in [
        ("broken.jsonl", '{"question": "q"', "cannot be read as UTF-8 jsonl"),
        ("latin1.csv", "question,A,B,C,D,answer\nd\xe9j\xe0,1,2,3,4,A", "cannot be read as UTF-8 csv"),
        ("mapping.json", json.dumps({"question": "q"}), "must hold a list of questions"),
    ]:
        path = tmp_path / name
        path.write_bytes(text.encode("latin-1"))
        with pytest.raises(ValueError, match=message) as err:
            load_questions(str(path))
        assert name in str(err.value)


def test_mini_grid_trains_evaluates_plots_shows_progress_and_resumes(tiny, tmp_path):
    """Three runs and a fourth made to fail (`pref_beta: 0` is refused before its model loads), then a rerun."""
    write_mc(tmp_path)
    grid = write_grid(tiny, tmp_path)
    spec = yaml.safe_load(grid.read_text())
    spec["blocks"].append(dict(name="bad", set=dict(stage="minorsft", pref_beta=0.0), grid=dict(learning_rate=[1e-3])))
    grid.write_text(yaml.safe_dump(spec))
    names = ["sft-learning_rate=0.001", "minorsft-learning_rate=0.002-pref_beta=0.04", "sft_go-sft_go_lambda=0.5"]
    bad = "bad-learning_rate=0.001"
    dry = tool("grid", grid, "--dry-run", cwd=tmp_path)
    assert "4 runs" in dry.stdout and f"run 2/4 {names[1]}: stage=minorsft" in dry.stdout
    assert "run 3/4 sft_go-sft_go_lambda=0.5: stage=sft_go sft_go_lambda=0.5" in dry.stdout
    assert not (tmp_path / "grid_out").exists()

    first = tool("grid", grid, cwd=tmp_path, check=False)
    out = tmp_path / "grid_out"
    assert first.returncode == 1
    # progress: a line per run with the counts so far and the grid's ETA, a live bar, the failed run and its log
    assert f"[grid] run 1/4 {names[0]}: training (0 done, 0 skipped, 0 failed)\n" in first.stdout
    assert re.search(
        rf"\[grid\] run 2/4 {names[1]}: training \(1 done, 0 skipped, 0 failed; grid ETA 0:\d\d:\d\d\)", first.stdout
    )
    failed_log = out / "runs" / bad / "grid_train.log"
    assert f"{bad}: training failed, see {failed_log}" in first.stdout and "`pref_beta`" in failed_log.read_text()
    assert f"1 run(s) failed: {bad} (log: {failed_log})" in first.stdout
    assert "run 1/4: 100%" in first.stderr and "3/3" in first.stderr
    assert "loss=" in first.stderr and "deviation=" in first.stderr
    status = json.loads((out / "grid_status.json").read_text())
    assert (status["total"], status["done"], status["failed"], status["pending"], status["running"]) == (
        4,
        3,
        1,
        0,
        None,
    )
    assert [run["status"] for run in status["runs"]] == ["done", "done", "done", "failed"]
    assert status["runs"][3]["log"] == str(failed_log) and all(run["duration_s"] > 0 for run in status["runs"][:3])

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["sft", "minorsft", "sft_go", "bad"]
    assert [r["status"] for r in rows] == ["done", "done", "done", "failed"]
    for row in rows[:3]:
        assert float(row["final_deviation"]) != 0 and 0 <= float(row["acc_domain_mc"]) <= 1
        assert row["final_loss"] and row["acc_general_mc"]
    assert rows[1]["pref_beta"] == "0.04" and rows[0]["pref_beta"] == "" and rows[2]["sft_go_lambda"] == "0.5"
    for figure in ("fig1_deviation.png", "fig2a_lr_beta.png", "fig2b_best_accuracy.png"):
        assert (out / figure).stat().st_size > 0
    assert "| minorsft-learning_rate=0.002-pref_beta=0.04 | minorsft |" in (out / "results.md").read_text()
    run_status = json.loads((out / "runs" / names[1] / "grid_status.json").read_text())
    hits = run_status["eval_hits"]["domain_mc"]
    assert len(hits) == 12 and hits.count("1") / 12 == pytest.approx(run_status["eval"]["domain_mc"])

    # started again: finished runs are skipped (their durations give the ETA); an unfinished (crashed) one is redone
    (out / "runs" / names[0] / "grid_status.json").unlink()
    again = tool("grid", grid, cwd=tmp_path, check=False)
    assert f"run 1/4 {names[0]}: training (0 done, 0 skipped, 0 failed)" in again.stdout
    assert re.search(
        rf"run 2/4 {names[1]}: done before, skipped \(1 done, 1 skipped, 0 failed; grid ETA", again.stdout
    )
    assert re.search(rf"run 4/4 {bad}: training \(1 done, 2 skipped, 0 failed; grid ETA 0:\d\d:\d\d\)", again.stdout)
    assert "[grid] finished: 1 done, 2 skipped, 1 failed" in again.stdout

    # started with another evaluation: the finished runs are evaluated again, not trained again
    spec["eval"]["files"] = ["domain_mc.jsonl"]
    grid.write_text(yaml.safe_dump(spec))
    model = out / "runs" / names[1] / "model.safetensors"
    trained_at, duration = model.stat().st_mtime_ns, run_status["duration_s"]
    third = tool("grid", grid, cwd=tmp_path, check=False)
    assert f"{names[1]}: its evaluation changed since it finished: evaluated again" in third.stdout
    assert f"run 2/4 {names[1]}: evaluating (1 done, 0 skipped, 0 failed" in third.stdout
    assert (
        f"run 4/4 {bad}: training" in third.stdout and "[grid] finished: 3 done, 0 skipped, 1 failed" in third.stdout
    )
    assert model.stat().st_mtime_ns == trained_at
    evaluated = json.loads((out / "runs" / names[1] / "grid_status.json").read_text())
    assert (
        list(evaluated["eval"]) == ["domain_mc"] and evaluated["eval"]["domain_mc"] == run_status["eval"]["domain_mc"]
    )
    assert evaluated["duration_s"] == duration  # the training's, for the ETA
    assert 0 < evaluated["eval_s"] < duration  # the evaluation's, for the ETA of runs evaluated again
    with open(out / "results.csv") as f:
        assert "acc_general_mc" not in next(csv.reader(f))


def test_a_run_whose_evaluation_failed_is_evaluated_again_not_trained_again(tiny, tmp_path):
    """The record says `trained` before the evaluation starts: a failed evaluation is redone alone on the next start."""
    jsonl, _ = write_mc(tmp_path)
    grid = write_grid(tiny, tmp_path)
    spec = yaml.safe_load(grid.read_text())
    spec["eval"]["files"], spec["blocks"] = [jsonl.name], spec["blocks"][1:2]
    grid.write_text(yaml.safe_dump(spec))
    questions = jsonl.read_text()
    env = warm_tool_env()
    # the training command, wrapped: once the training has ended, the evaluation file breaks
    wrapper = tmp_path / "train_then_break_eval.sh"
    cli = env.get("LLAMAFACTORY_MINORSFT_CLI") or shlex.quote(str(Path(sys.executable).parent / "llamafactory-cli"))
    wrapper.write_text(f'{cli} "$@" || exit $?\nprintf "not json" > {shlex.quote(str(jsonl))}\n')
    broken = tool("grid", grid, cwd=tmp_path, check=False, env={**env, "LLAMAFACTORY_MINORSFT_CLI": f"sh {wrapper}"})
    name = "minorsft-learning_rate=0.002-pref_beta=0.04"
    assert broken.returncode == 1 and f"{name}: evaluation failed" in broken.stdout, broken.stdout[-3000:]
    record = json.loads((tmp_path / "grid_out" / "runs" / name / "grid_status.json").read_text())
    assert record["status"] == "trained" and record["duration_s"] > 0 and "train_fingerprint" in record

    jsonl.write_text(questions)
    model = tmp_path / "grid_out" / "runs" / name / "model.safetensors"
    trained_at = model.stat().st_mtime_ns
    again = tool("grid", grid, cwd=tmp_path)
    assert f"run 1/1 {name}: evaluating (0 done, 0 skipped, 0 failed)" in again.stdout, again.stdout[-3000:]
    assert "[grid] finished: 1 done, 0 skipped, 0 failed" in again.stdout
    assert model.stat().st_mtime_ns == trained_at
    done = json.loads((tmp_path / "grid_out" / "runs" / name / "grid_status.json").read_text())
    assert done["status"] == "done" and done["duration_s"] == record["duration_s"] and "domain_mc" in done["eval"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (dict(colour="red"), "unknown key(s) colour"),
        (dict(blocks=[]), "`blocks` is empty"),
        (
            dict(blocks=[dict(name="x", grid=dict(learning_rte=[1e-3]))]),
            "learning_rte are not LLaMA-Factory train options",
        ),
        (dict(blocks=[dict(name="x", grid=dict(learning_rate=[]))]), "non-empty lists"),
        (dict(set=dict(pref_beta="high")), "`set` sets `pref_beta` to 'high'; it must be a float"),
        (
            dict(blocks=[dict(name="x", set=dict(track_deviation="yes"), grid=dict(learning_rate=["2e-5"]))]),
            "block 'x' `set` sets `track_deviation` to 'yes'; it must be a bool",
        ),
        (dict(blocks=[dict(name="x", grid=dict(max_steps=[2, 2.5]))]), "sets `max_steps` to 2.5; it must be a int"),
        (dict(blocks=[dict(name="x", grid=dict(cutoff_len=["128"]))]), "sets `cutoff_len` to '128'; it must be a int"),
        (
            dict(blocks=[dict(name="x", grid=dict(learning_rate=[1e-3, 1e-3]))]),
            "`grid.learning_rate` lists 0.001 twice",
        ),
        (
            dict(blocks=[dict(name="x", grid=dict(learning_rate=[1e-3, 1.0000001e-3]))]),
            "grid values that print alike",
        ),
    ],
    ids=[
        "unknown-top-key",
        "empty",
        "unknown-grid-key",
        "empty-values",
        "set-type",
        "block-set-type",
        "grid-type",
        "grid-int-string",
        "repeated-value",
        "values-alike",
    ],
)
def test_bad_grid_files_fail_clearly_before_any_run(tiny, tmp_path, capsys, monkeypatch, extra, message):
    grid = write_grid(tiny, tmp_path)
    spec = {**yaml.safe_load(grid.read_text()), **extra}
    grid.write_text(yaml.safe_dump(spec))
    # a real start and --dry-run both begin with load_grid: the value checks are run through --dry-run
    dry_run = ["--dry-run"] if "sets `" in message or "twice" in message or "alike" in message else []
    code, _, stderr = tool_in_process("grid", grid, *dry_run, cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    last = stderr.strip().splitlines()[-1]  # one line
    assert code == 2 and last.startswith("llamafactory-minorsft: error: ") and message in last, stderr[-2000:]
    assert not (tmp_path / "grid_out").exists()


def test_tool_paths_that_cannot_be_used_fail_in_one_line_before_any_work(tiny, tmp_path):
    """Exit 2 and one line naming the option, before a training starts.

    A path is refused before the tool imports torch, transformers or LLaMA-Factory (seconds); the template's check
    needs the tokenizer.
    """
    questions, _ = write_mc(tmp_path)
    (tmp_path / "a_file").write_text("")
    cases = [
        (["eval-mc", "--model", tiny.model, "--template", "qwen", "--output", tmp_path, questions], "is a directory"),
        (["eval-mc", "--model", tmp_path / "nowhere", "--template", "qwen", questions], "--model"),
        (["eval-mc", "--model", tiny.model, "--template", "llama3", questions], "--template llama3: adds"),
        (["tiny", tmp_path / "a_file" / "tiny"], "Not a directory"),
        (["grid", write_grid(tiny, tmp_path), "--output-dir", tmp_path / "a_file"], "a_file"),
        (["demo", "--examples-dir", tmp_path / "nowhere", "--output-dir", tmp_path / "demo"], "--examples-dir"),
    ]
    heavy = ("torch", "transformers", "llamafactory")
    probe = (
        "import sys; from llamafactory_minorsft.tools.cli import main; main(sys.argv[1:]); "
        f"print(*[m for m in {heavy} if m in sys.modules])"
    )
    for args, message in cases:
        proc = subprocess.run(
            [sys.executable, "-c", probe, *map(str, args)], cwd=tmp_path, env=cli_env(), capture_output=True, text=True
        )
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("llamafactory-minorsft: error: ") and message in last, (args, last)
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
        if "llama3" not in args:
            assert proc.stdout.split() == [], (args, proc.stdout[-2000:])
    for args, _ in cases[:2]:  # the console script: exit status 2
        assert tool(*args, cwd=tmp_path, check=False).returncode == 2
    assert not (tmp_path / "demo").exists() and not (tmp_path / "a_file").read_text()


def test_paper_grid_lists_the_paper_setup(tmp_path, capsys, monkeypatch):
    paper_grid = Path(__file__).resolve().parents[1] / "examples_yaml" / "paper_grid.yaml"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    args = ("grid", paper_grid, "--dry-run", "--output-dir", "~/out")  # the user's home, as the real run checks it
    code, stdout, _ = tool_in_process(*args, cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert code == 0 and f"21 runs into {tmp_path / 'home' / 'out'}" in stdout
    assert "minorsft-learning_rate=2e-05-pref_beta=0.04: stage=minorsft learning_rate=2e-05 pref_beta=0.04" in stdout
    assert "sft-learning_rate=1e-05: stage=sft learning_rate=1e-05" in stdout
    assert "(instruction prompt)" in stdout and "(ceval prompt)" in stdout


@pytest.mark.parametrize(
    "spec, message",
    [
        ("hello", "must be a mapping of keys to values, got a str"),
        (dict(blocks=dict(grid=dict(learning_rate=[1e-3]))), "`blocks` must be a list"),
        (dict(blocks=["sft"]), "block 0 must be a mapping"),
        (dict(blocks=[dict(grid=["learning_rate"])]), "`block 0 grid` must be a mapping"),
        (dict(eval=dict(files="mc.jsonl")), "`eval.files` must be a list"),
        (dict(eval=dict(batch_size=-1)), "`eval.batch_size` must be a whole number of at least 1, got -1"),
        (dict(base="missing.yaml"), "`base` "),
        (dict(base_keys=dict(lerning_rate=0.1)), "`base` (base.yaml) key(s) lerning_rate are not LLaMA-Factory"),
    ],
    ids=["scalar", "blocks-mapping", "block-string", "grid-list", "files-string", "batch-size", "no-base", "base-key"],
)
def test_grid_files_of_the_wrong_shape_are_refused_with_the_key(tiny, tmp_path, spec, message):
    from llamafactory_minorsft.tools.grid import load_grid

    grid = write_grid(tiny, tmp_path)
    if isinstance(spec, dict):
        if "base_keys" in spec:
            base = yaml.safe_load((tmp_path / "base.yaml").read_text())
            (tmp_path / "base.yaml").write_text(yaml.safe_dump({**base, **spec.pop("base_keys")}))
        spec = {**yaml.safe_load(grid.read_text()), **spec}
    grid.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError) as err:
        load_grid(str(grid))
    assert message in str(err.value)


def test_a_finished_run_is_kept_only_with_the_settings_it_finished_with(tiny, tmp_path, capsys):
    """A rerun after the base, a block's `set` or the evaluation changed redoes the run; a corrupt record too."""
    from llamafactory_minorsft.tools.grid import (
        STATUS_FILE,
        fingerprint,
        finished_status,
        load_grid,
        train_fingerprint,
        trained_status,
    )

    write_mc(tmp_path)
    runs, settings = load_grid(str(write_grid(tiny, tmp_path)))
    run = runs[0]
    (Path(run.config["output_dir"])).mkdir(parents=True)
    record = Path(run.config["output_dir"]) / STATUS_FILE
    record.write_text(json.dumps({"status": "done", "fingerprint": fingerprint(run, settings["eval"])}))
    assert finished_status(run, settings["eval"])["status"] == "done"

    changed, _ = load_grid(str(write_grid(tiny, tmp_path, set=dict(max_steps=6))))
    assert finished_status(changed[0], settings["eval"]) is None
    assert "changed since it finished" in capsys.readouterr().out
    assert finished_status(run, {**settings["eval"], "batch_size": 4}) is None
    assert finished_status(run, {**settings["eval"], "files": settings["eval"]["files"][:1]}) is None
    # an edited eval file (another answer key) is another evaluation: evaluated again, not trained again
    mc = Path(settings["eval"]["files"][0]["path"])
    train_before, kept = train_fingerprint(run), mc.read_text()
    questions = [json.loads(line) for line in kept.splitlines()]
    questions[0]["answer"] = "D" if questions[0]["answer"] != "D" else "A"
    mc.write_text("\n".join(json.dumps(q) for q in questions))
    assert finished_status(run, settings["eval"]) is None and train_fingerprint(run) == train_before
    mc.write_text(kept)
    assert finished_status(run, settings["eval"])["status"] == "done"
    record.write_text(json.dumps({"status": "done"}))  # recorded by an earlier version: no fingerprint
    assert finished_status(run, settings["eval"]) is None  # … and no config it trained with
    # an earlier version's record next to the config it trained with, and the same eval sets: kept, and fingerprinted
    (record.parent / "grid_config.yaml").write_text(yaml.safe_dump(run.config))
    record.write_text(json.dumps({"status": "done", "eval": {"domain_mc": 0.5, "general_mc": 0.25}}))
    assert finished_status(run, settings["eval"])["eval"]["domain_mc"] == 0.5
    assert json.loads(record.read_text())["fingerprint"] == fingerprint(run, settings["eval"])
    record.write_text(json.dumps({"status": "done", "eval": {"domain_mc": 0.5, "general_mc": 0.25}}))
    assert finished_status(changed[0], settings["eval"]) is None  # trained with another config
    assert trained_status(changed[0]) is None and trained_status(run) is not None
    record.write_text(json.dumps({"status": "done", "eval": {"domain_mc": 0.5}}))  # … or evaluated on fewer sets
    assert finished_status(run, settings["eval"]) is None and trained_status(run)["eval"] == {"domain_mc": 0.5}
    assert "its evaluation changed since it finished: evaluated again" in capsys.readouterr().out
    # trained, but its evaluation failed: evaluated again, and only with this config
    record.write_text(json.dumps({"status": "trained", "train_fingerprint": train_fingerprint(run)}))
    assert finished_status(run, settings["eval"]) is None and trained_status(run)["status"] == "trained"
    assert trained_status(changed[0]) is None
    record.write_text('{"status": "do')  # cut off
    assert finished_status(run, settings["eval"]) is None
    assert f"its record {record} cannot be read" in capsys.readouterr().out


def test_a_training_that_ends_with_non_finite_metrics_is_diverged():
    """Its last deviation, or its last two gradient norms, are not finite; one skipped fp16 step is no divergence."""
    from llamafactory_minorsft.tools.grid import diverged_metric

    nan = float("nan")
    steps = [{"loss": 2.0, "grad_norm": g, "step": i} for i, g in enumerate([1.0, nan, nan], start=1)]
    assert diverged_metric(steps) == "grad_norm at step 3"
    assert diverged_metric(steps[:2]) is None  # fp16 loss scaling skipped step 2 (its gradients overflowed)
    assert diverged_metric([steps[1], steps[0]]) is None
    assert diverged_metric([{"loss": 1.0, "deviation": float("inf"), "step": 3}]) == "deviation at step 3"
    assert diverged_metric([{"loss": 1.0, "grad_norm": 0.5, "deviation": -0.1, "step": 1}]) is None
    assert diverged_metric(steps[1:2]) == "grad_norm at step 2"  # its only logged step: nothing else to show


def test_the_grid_eta_prices_each_run_left_by_its_work(tmp_path):
    """A run left to train costs a training and an evaluation; one trained before, an evaluation alone."""
    from llamafactory_minorsft.tools.grid import GridProgress
    from llamafactory_minorsft.tools.runs import Run

    runs = [Run(f"r{i}", "m", {}, {"output_dir": str(tmp_path / f"r{i}")}) for i in range(5)]
    progress = GridProgress(runs, str(tmp_path), "grid.yaml")
    for state, work in zip(progress.states, [None, "train", "train", "evaluate", "train"]):
        state["work"] = work
    assert progress.eta_seconds() is None  # nothing finished yet: no price
    progress.update(1, "skipped", {"duration_s": 100.0})  # an old record: no evaluation time
    assert progress.eta_seconds() is None  # an evaluation is left, and none was timed
    progress.update(2, "running")
    progress.update(2, "done", {"duration_s": 200.0, "eval_s": 10.0})
    assert progress.eta_seconds() == pytest.approx(2 * (150.0 + 10.0) + 10.0)
    progress.update(4, "running")
    progress.update(4, "done", {"duration_s": 150.0, "eval_s": 20.0})  # re-evaluated: its training's duration
    assert progress.eta_seconds() == pytest.approx(2 * (150.0 + 15.0))
    assert json.loads((tmp_path / "grid_status.json").read_text())["eta_seconds"] == pytest.approx(330.0)
    for index in (3, 5):
        progress.update(index, "failed", {"duration_s": 1.0})
    assert progress.eta_seconds() == 0.0 and "ETA" not in progress.summary()


def test_a_diverged_setting_is_never_the_best():
    from llamafactory_minorsft.tools.grid import best_runs
    from llamafactory_minorsft.tools.runs import Run

    def run(lr, seed, accuracy, diverged=None):
        result = {"status": "done", "eval": {"mc": accuracy}, **({"diverged": diverged} if diverged else {})}
        return Run(f"m-{lr}-{seed}", "m", {"learning_rate": lr, "seed": seed}, {}, result)

    runs = [run(1, 1, 0.5), run(1, 2, 0.5), run(9, 1, 0.9), run(9, 2, 0.25, diverged="grad_norm at step 3")]
    assert best_runs(runs, ["mc"])["m"].values["learning_rate"] == 1
    assert best_runs(runs[2:], ["mc"])["m"] is None


def test_a_nan_score_is_never_the_best_wherever_it_stands():
    """`max` with a NaN key depends on the order; a setting whose likelihood is NaN loses in every order."""
    from llamafactory_minorsft.tools.grid import best_runs
    from llamafactory_minorsft.tools.runs import Run

    def run(beta, logps):
        return Run(f"m-{beta}", "m", {"pref_beta": beta}, {}, {"status": "done", "loss": 1.0, "logps/policy": logps})

    for runs in ([run(0.1, float("nan")), run(0.2, -30.0)], [run(0.2, -30.0), run(0.1, float("nan"))]):
        assert best_runs(runs, [])["m"].values["pref_beta"] == 0.2
    assert best_runs([run(0.1, float("nan")), run(0.2, float("nan"))], [])["m"] is None  # as with `eval`


def test_grid_values_stock_runs_take_pass_the_type_check():
    """Lenient where `llamafactory-cli train` trains: 0/1 for a bool, 128.0 for an int, "2e-5" for a float."""
    from llamafactory_minorsft.tools.grid import fits, scalar_option_types

    kinds = scalar_option_types()
    for key, value in [("do_train", 1), ("cutoff_len", 128.0), ("learning_rate", "2e-5"), ("pref_beta", 1)]:
        assert fits(value, *kinds[key]), key
    for key, value in [("do_train", "false"), ("cutoff_len", 128.5), ("learning_rate", "fast"), ("pref_beta", True)]:
        assert not fits(value, *kinds[key]), key


def test_without_evaluation_the_best_setting_has_the_highest_likelihood_not_the_lowest_loss():
    """MinorSFT's loss shrinks as β grows (its coefficient 2σ(−βr) does): the log-likelihood is the fair score."""
    from llamafactory_minorsft.tools.grid import best_runs
    from llamafactory_minorsft.tools.runs import Run

    def run(beta, loss, logps=None):
        result = {"status": "done", "eval": {}, "loss": loss, "logps/policy": logps}
        return Run(f"m-{beta}", "m", {"pref_beta": beta}, {}, result)

    runs = [run(0.02, 2.0, logps=-30.0), run(0.04, 1.5, logps=-35.0)]
    assert best_runs(runs, [])["m"].values["pref_beta"] == 0.02
    runs.append(run(0.08, 1.0))  # a run that logged no likelihood (plain sft, an earlier record): the method's loss
    assert best_runs(runs, [])["m"].values["pref_beta"] == 0.08


def test_a_stopped_grid_stops_its_training(tiny, tmp_path):
    """`kill` (SIGTERM) of the grid stops the training it runs, as Ctrl-C does, and the status says so."""
    import signal
    import time

    import psutil

    grid = write_grid(tiny, tmp_path)
    spec = yaml.safe_load(grid.read_text())
    spec.update(eval={}, set=dict(max_steps=100000), blocks=spec["blocks"][:1])
    grid.write_text(yaml.safe_dump(spec))
    proc = subprocess.Popen([TOOL, "grid", str(grid)], cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, text=True)
    log = tmp_path / "grid_out" / "runs" / "sft-learning_rate=0.001" / "trainer_log.jsonl"
    deadline = time.time() + 300
    while not log.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert log.exists(), "the training never started"
    training = psutil.Process(proc.pid).children(recursive=True)
    assert training
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted during sft-learning_rate=0.001" in out
    gone, alive = psutil.wait_procs(training, timeout=60)
    for process in alive:  # a failing test leaves no training behind
        process.kill()
    assert not alive, alive
    status = json.loads((tmp_path / "grid_out" / "grid_status.json").read_text())
    assert status["runs"][0]["status"] == "interrupted" and status["running"] is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["tiny", "out", "--hidden-size", "0"], "--hidden-size: must be a whole number of at least 1, got '0'"),
        (["tiny", "out", "--hidden-size", "20"], "tiny --hidden-size: must be a multiple of 8"),
        (["tiny", "out", "--num-samples", "-3"], "--num-samples: must be a whole number of at least 1, got '-3'"),
        (["tiny", "out", "--num-layers", "two"], "--num-layers: must be a whole number of at least 1, got 'two'"),
        (["eval-mc", "--model", "m", "--template", "qwen", "--batch-size", "0", "q.jsonl"], "--batch-size: must be"),
    ],
    ids=["hidden-zero", "hidden-heads", "samples", "layers", "batch-size"],
)
def test_tool_sizes_are_checked_before_anything_is_written(tmp_path, monkeypatch, capsys, argv, message):
    from llamafactory_minorsft.tools.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_fig1_without_any_deviation_says_why(tmp_path, capsys):
    """Runs of plain sft without `track_deviation` log no deviation: the chart says so instead of being empty."""
    from llamafactory_minorsft.tools.figures import NO_DEVIATION, NO_RUNS, plot_deviation_curves

    for name, extra in (("plain", {}), ("tracked", {"deviation": 0.25})):
        (tmp_path / name).mkdir()
        history = [{"step": step, "loss": 1.0 / step, **extra} for step in (1, 2)]
        (tmp_path / name / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    path = plot_deviation_curves({"sft": str(tmp_path / "plain")}, str(tmp_path / "empty.png"))
    assert NO_DEVIATION in capsys.readouterr().err and Path(path).stat().st_size > 0
    plot_deviation_curves(
        {"sft": str(tmp_path / "plain"), "minorsft": str(tmp_path / "tracked")}, str(tmp_path / "a.png")
    )
    assert NO_DEVIATION not in capsys.readouterr().err
    plot_deviation_curves({}, str(tmp_path / "none.png"))  # no finished run: that, not `track_deviation`, is why
    assert capsys.readouterr().err.endswith(f"{NO_RUNS}\n")


def test_fig1_and_the_live_plot_show_a_run_of_one_logged_step(tmp_path):
    """One point draws no line: it gets a marker, so the chart is not blank."""
    import matplotlib.image
    import numpy as np

    from llamafactory_minorsft.tools.figures import plot_deviation_curves
    from llamafactory_minorsft.webui import loss_and_deviation_plot

    def drawn(png) -> int:  # pixels of the curves' colour, matplotlib's first (#1f77b4): the legend's line has 58
        rgb = matplotlib.image.imread(png)[..., :3]
        return int((np.abs(rgb - np.array([0x1F, 0x77, 0xB4]) / 255).max(-1) < 0.1).sum())

    (tmp_path / "run").mkdir()
    history = [{"step": 1, "loss": 2.0, "deviation": 0.25}]
    (tmp_path / "run" / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    assert drawn(plot_deviation_curves({"minorsft": str(tmp_path / "run")}, str(tmp_path / "fig1.png"))) > 100
    log = [{"current_steps": 1, "loss": 2.0, "deviation": 0.25}]
    fig = loss_and_deviation_plot(log, log)
    fig.savefig(tmp_path / "live.png")
    assert drawn(tmp_path / "live.png") > 200  # both panels; their legends have 116
    history.append({"step": 2, "loss": float("nan"), "deviation": float("nan")})  # diverged after one good log
    (tmp_path / "run" / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    assert drawn(plot_deviation_curves({"minorsft": str(tmp_path / "run")}, str(tmp_path / "nan.png"))) > 100


def test_fig2a_reads_a_default_or_string_learning_rate(tmp_path):
    """A base config without `learning_rate` (the Trainer's default), or YAML's "2e-5" (a string)."""
    from llamafactory_minorsft.tools.figures import learning_rate, plot_accuracy_heatmaps
    from llamafactory_minorsft.tools.runs import Run

    runs = [
        Run("a", "sft", {}, {"stage": "sft"}, {"status": "done", "eval": {"mc": 0.5}}),
        Run("b", "sft", {}, {"stage": "sft", "learning_rate": "2e-5"}, {"status": "done", "eval": {"mc": 0.25}}),
    ]
    assert [learning_rate(run) for run in runs] == [5e-5, 2e-5]
    assert os.path.isfile(plot_accuracy_heatmaps(runs, ["mc"], str(tmp_path / "fig2a.png")))


def test_the_web_uis_deviation_reader_skips_a_line_being_written(tmp_path):
    from llamafactory_minorsft.webui import read_deviation_log

    (tmp_path / "trainer_deviation.jsonl").write_text('{"current_steps": 1, "deviation": 0.5}\n[1]\n{"curr')
    assert read_deviation_log(str(tmp_path)) == [{"current_steps": 1, "deviation": 0.5}]


def test_the_web_ui_plots_no_deviation_a_finished_run_left_in_the_folder(tmp_path):
    """A stock run written where a plugin run logged the deviation leaves that log as it was: it is not plotted."""
    import llamafactory.webui.control as control
    import matplotlib.pyplot as plt

    from llamafactory_minorsft.webui import deviation_log_is_current

    trainer_log = [
        {"current_steps": 3, "total_steps": 9, "loss": 1.0, "percentage": 33.3, "remaining_time": "0:01:00"}
    ]
    (tmp_path / "trainer_log.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in trainer_log))
    (tmp_path / "trainer_deviation.jsonl").write_text('{"current_steps": 1, "deviation": 0.5}\n')
    now = time.time()
    os.utime(tmp_path / "trainer_log.jsonl", (now, now))
    for elapsed, written, current in [
        ("0:00:30", now - 20, True),
        ("0:00:30", now - 600, False),
        ("1 day, 0:00:30", now - 600, True),
    ]:
        os.utime(tmp_path / "trainer_deviation.jsonl", (written, written))
        for entry in trainer_log:
            entry["elapsed_time"] = elapsed
        assert deviation_log_is_current(str(tmp_path), trainer_log) is current
        (tmp_path / "trainer_log.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in trainer_log))
        os.utime(tmp_path / "trainer_log.jsonl", (now, now))
        assert "loss_viewer" in control.get_trainer_info("en", str(tmp_path), True)[2]
        assert len(plt.gcf().axes) == (2 if current else 1)  # the last plot drawn: the stock one has the loss alone

    assert not deviation_log_is_current(str(tmp_path), [{"current_steps": 1}])  # an older LLaMA-Factory's log


def test_a_resumed_plugin_run_keeps_its_deviation_on_the_live_plot(tmp_path):
    """The resumed part may log no deviation before the monitor looks: the run touches its log as it starts."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from llamafactory_minorsft.train.callbacks import DEVIATION_LOG, DeviationLogCallback
    from llamafactory_minorsft.webui import deviation_log_is_current

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    log = tmp_path / DEVIATION_LOG
    log.write_text('{"current_steps": 2, "deviation": 0.5}\n')
    old = time.time() - 600
    os.utime(log, (old, old))
    DeviationLogCallback().on_train_begin(args, TrainerState(global_step=2), TrainerControl())
    trainer_log = [{"current_steps": 3, "elapsed_time": "0:00:00"}]  # the resumed part's first entry
    (tmp_path / "trainer_log.jsonl").write_text(json.dumps(trainer_log[0]) + "\n")
    assert log.read_text() and deviation_log_is_current(str(tmp_path), trainer_log)

    DeviationLogCallback().on_train_begin(args, TrainerState(global_step=0), TrainerControl())
    assert not log.exists()  # a fresh run starts its own log


def test_the_training_command_can_be_a_wrapper(monkeypatch):
    """`LLAMAFACTORY_MINORSFT_CLI` stands for `llamafactory-cli` in the tools' trainings, split as a shell would."""
    from llamafactory_minorsft.tools.runs import CLI_ENV, train_command

    monkeypatch.delenv(CLI_ENV, raising=False)
    assert train_command("c.yaml") == [str(Path(sys.executable).parent / "llamafactory-cli"), "train", "c.yaml"]
    monkeypatch.setenv(CLI_ENV, "nice -n 10 'my cli'")
    assert train_command("c.yaml", "seed=2") == ["nice", "-n", "10", "my cli", "train", "c.yaml", "seed=2"]


def test_the_tests_stand_in_cli_ends_as_its_run_ends(tmp_path):
    """The tests' stand-in for `llamafactory-cli` (`tests/warm_client.py`) ends as its run ends.

    It exits with the run's status, a signal sent to it reaches the run and kills it with that signal, and a client
    that breaks off a request leaves the server serving the next one.
    """
    env = warm_tool_env()
    if "WARM_CLI_SOCKET" not in env:
        pytest.skip("the warm CLI serves CPU runs only")
    client = [*shlex.split(env["LLAMAFACTORY_MINORSFT_CLI"]), "train"]
    with socket.socket(socket.AF_UNIX) as broken:  # a request without its stdin, stdout and stderr
        broken.connect(env["WARM_CLI_SOCKET"])
        broken.sendall(b"{}")
    missing = subprocess.run([*client, "missing.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert missing.returncode == 1 and "missing.yaml" in missing.stderr  # the run's traceback, on the client's stderr

    os.mkfifo(tmp_path / "blocked.yaml")  # the run waits on reading its config until this test writes it
    proc = subprocess.Popen([*client, "blocked.yaml"], cwd=tmp_path, env=env)
    writer = None
    try:
        deadline = time.monotonic() + 60
        while writer is None and time.monotonic() < deadline:  # a writer can open a FIFO once a reader waits on it
            try:
                writer = os.open(tmp_path / "blocked.yaml", os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.1)
        assert writer is not None, "the run never opened its config"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM
    finally:
        proc.kill()
        if writer is not None:
            os.close(writer)
