"""Hyperparameter grids over stock LLaMA-Factory runs: ``llamafactory-minorsft grid GRID.yaml``.

A grid file::

    base: examples_yaml/tiny/qwen2_sft_tiny.yaml   # a LLaMA-Factory train config (relative to this file)
    output_dir: grid_output                        # runs/, results.csv, results.md and the figures
    set: {max_steps: 20}                           # optional: overrides for every run
    eval:                                          # optional: multiple-choice evaluation of every run
      files: [domain_mc.jsonl, general_mc.jsonl]   # ceval layout (relative to this file)
      prompt: ceval                                # or: instruction
    blocks:                                        # one block per method: β only applies to some stages
      - name: sft
        set: {stage: sft, track_deviation: true}
        grid: {learning_rate: [1.0e-5, 2.0e-5]}
      - name: minorsft
        set: {stage: minorsft}
        grid: {learning_rate: [2.0e-5, 3.0e-5], pref_beta: [0.02, 0.04], seed: [1, 2]}

Every combination of a block's grid runs through the stock ``llamafactory-cli train``, one after another, in
``runs/<name>``. A run that finished (training and evaluation) is skipped when the grid is started again with the
same config and evaluation (its record holds their hash); a changed or unfinished one is redone from scratch. A run
whose training ended with non-finite metrics is flagged ``diverged`` in its record: it is evaluated as any other, but
its setting is never a method's best.

Progress: one line per run as it starts (``run 4/21 <name>``, with the runs done, skipped and failed so far and the
grid's ETA from the finished runs' durations); while a run trains, a progress bar read from the run's own logs
(``trainer_log.jsonl``, ``trainer_deviation.jsonl``: step, loss, deviation, elapsed time and ETA), its whole output
going to ``runs/<name>/grid_train.log``; and ``grid_status.json`` at the grid's root, rewritten as runs start and
end, for ``cat`` from another shell or node.
"""

import csv
import functools
import hashlib
import itertools
import json
import math
import os
import signal
import statistics
import subprocess
import threading
import time
import types
import typing
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from typing import Any, Optional

import yaml
from tqdm import tqdm

from ..paths import unwritable
from .runs import Run, final_value, log_history, step_values, train_command


TOP_KEYS = {"base", "output_dir", "set", "eval", "blocks"}
BLOCK_KEYS = {"name", "set", "grid"}
EVAL_KEYS = {"files", "prompt", "template", "batch_size"}
STATUS_FILE = "grid_status.json"


def train_option_classes() -> tuple[type, ...]:
    from llamafactory.hparams import DataArguments, GeneratingArguments, ModelArguments, TrainingArguments

    from ..hparams import PluginFinetuningArguments

    return ModelArguments, DataArguments, TrainingArguments, PluginFinetuningArguments, GeneratingArguments


def train_option_names() -> set[str]:
    """Every option LLaMA-Factory's train parser accepts (with the plugin's options)."""
    return {f.name for cls in train_option_classes() for f in fields(cls) if f.init}


def scalar_option_types() -> dict[str, tuple[type, bool]]:
    """The options of type bool, int or float: name → (type, whether None is allowed)."""
    kinds = {}
    for cls in train_option_classes():
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # an annotation this interpreter cannot resolve: those options go unchecked
            continue
        for f in fields(cls):
            hint = hints.get(f.name)
            args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
            kind = [arg for arg in args if arg is not type(None)]
            if len(kind) == 1 and kind[0] in (bool, int, float):
                kinds[f.name] = (kind[0], type(None) in args)
    return kinds


def fits(value: Any, kind: type, optional: bool) -> bool:
    """Whether ``value`` can be meant for an option of ``kind``: refuses what no run could take as that type.

    LLaMA-Factory's parser converts no value of a config, so a string is kept as one: "false" for a bool would be
    true. Lenient where stock runs train: 0/1 for a bool, 128.0 for an int. A float may be a string such as
    ``2e-5``: PyYAML reads it (no dot) as one, and ``llamafactory-cli``'s OmegaConf reads the run's config back as a
    number.
    """
    if value is None:
        return optional
    if kind is bool:
        return isinstance(value, bool) or (type(value) is int and value in (0, 1))
    if isinstance(value, bool):
        return False
    if kind is int:
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, str):
        try:
            return math.isfinite(float(value))
        except ValueError:
            return False
    return isinstance(value, (int, float))


def _format_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def load_grid(path: str, output_dir: Optional[str] = None) -> tuple[list[Run], dict[str, Any]]:
    """Parse and check a grid file; returns its runs and settings. Raises ValueError naming the bad key."""
    spec = read_mapping(path, "Grid file")
    where = os.path.dirname(os.path.abspath(path))
    expect(path, spec, {"set": dict, "eval": dict, "blocks": list, "base": str, "output_dir": str})
    unknown = set(spec) - TOP_KEYS
    if unknown:
        raise ValueError(
            f"Grid file {path}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(TOP_KEYS))}."
        )
    if "base" not in spec:
        raise ValueError(f"Grid file {path}: `base` (a LLaMA-Factory train config) is missing.")
    if not spec.get("blocks"):
        raise ValueError(f"Grid file {path}: `blocks` is empty; list at least one block with a `grid`.")

    base = read_mapping(os.path.join(where, spec["base"]), f"Grid file {path}: `base`")

    options = train_option_names()
    out = os.path.abspath(os.path.expanduser(output_dir or spec.get("output_dir") or "grid_output"))
    settings = {"output_dir": out, "eval": dict(spec.get("eval") or {})}
    unknown = set(settings["eval"]) - EVAL_KEYS
    if unknown:
        raise ValueError(
            f"Grid file {path}: unknown `eval` key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(EVAL_KEYS))}."
        )
    expect(path, settings["eval"], {"files": list, "prompt": str, "template": str}, "eval.")
    batch_size = settings["eval"].get("batch_size", 8)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"Grid file {path}: `eval.batch_size` must be a whole number of at least 1, got {batch_size!r}."
        )
    default_prompt = settings["eval"].get("prompt", "ceval")
    files = []
    for entry in settings["eval"].get("files", []):  # a path, or {path, prompt}
        entry = entry if isinstance(entry, dict) else {"path": entry}
        if set(entry) - {"path", "prompt"} or "path" not in entry:
            raise ValueError(f"Grid file {path}: an `eval.files` entry is a path or {{path, prompt}}, got {entry}.")
        files.append({"path": os.path.join(where, entry["path"]), "prompt": entry.get("prompt", default_prompt)})
    settings["eval"]["files"] = files

    def check(keys, what):
        bad = sorted(set(keys) - options)
        if bad:
            raise ValueError(f"Grid file {path}: {what} key(s) {', '.join(bad)} are not LLaMA-Factory train options.")

    kinds = scalar_option_types()

    def check_types(values, what):  # the values the grid file adds; `base` is the user's LLaMA-Factory config
        for key, value in values.items():
            if key in kinds and not fits(value, *kinds[key]):
                kind, optional = kinds[key]
                raise ValueError(
                    f"Grid file {path}: {what} sets `{key}` to {value!r}; it must be a {kind.__name__}"
                    f"{' or null' if optional else ''}."
                )

    check(spec.get("set") or {}, "`set`")
    check_types(spec.get("set") or {}, "`set`")
    # LLaMA-Factory's own switch for keys its parser does not know
    if os.getenv("ALLOW_EXTRA_ARGS", "0").lower() not in ("true", "y", "1"):
        check(base, f"`base` ({spec['base']})")
    runs, names = [], set()
    for i, block in enumerate(spec["blocks"]):
        if not isinstance(block, dict):
            raise ValueError(f"Grid file {path}: block {i} must be a mapping with `name`, `set` and `grid`.")
        expect(path, block, {"name": str, "set": dict, "grid": dict}, f"block {i} ")
        unknown = set(block) - BLOCK_KEYS
        if unknown:
            raise ValueError(f"Grid file {path}: block {i} has unknown key(s) {', '.join(sorted(unknown))}.")
        method = block.get("name") or f"block{i}"
        grid = block.get("grid") or {}
        check(block.get("set") or {}, f"block {method!r} `set`")
        check(grid, f"block {method!r} `grid`")
        if not grid or any(not isinstance(v, list) or not v for v in grid.values()):
            raise ValueError(f"Grid file {path}: block {method!r} needs a `grid` of non-empty lists of values.")
        check_types(block.get("set") or {}, f"block {method!r} `set`")
        for key, values in grid.items():
            for value in values:
                check_types({key: value}, f"block {method!r} `grid`")
            repeated = [value for i, value in enumerate(values) if value in values[:i]]
            if repeated:
                raise ValueError(f"Grid file {path}: block {method!r} `grid.{key}` lists {repeated[0]!r} twice.")

        for combination in itertools.product(*grid.values()):
            values = dict(zip(grid, combination))
            name = "-".join([method] + [f"{k}={_format_value(v)}" for k, v in values.items()])
            if name in names:
                raise ValueError(
                    f"Grid file {path}: two runs are named {name!r}: two blocks of one name, or grid values that print "
                    "alike. Give the blocks distinct names, or the values distinct digits."
                )
            names.add(name)
            config = {**base, **(spec.get("set") or {}), **(block.get("set") or {}), **values}
            config.update(output_dir=os.path.join(out, "runs", name), overwrite_output_dir=True)
            runs.append(Run(name=name, method=method, values=values, config=config))

    return runs, settings


def read_mapping(path: str, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (an empty file: {})."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as err:
        raise ValueError(f"{what} {path}: cannot be read ({err.strerror}).") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{what} {path}: not valid YAML ({err}).") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path}: must be a mapping of keys to values, got a {type(data).__name__}.")
    return data


def expect(path: str, spec: dict[str, Any], types: dict[str, type], prefix: str = "") -> None:
    """Each present key of ``types`` has its type (None counts as absent)."""
    for key, kind in types.items():
        if spec.get(key) is not None and not isinstance(spec[key], kind):
            raise ValueError(
                f"Grid file {path}: `{prefix}{key}` must be a {dict(dict='mapping', list='list', str='string')[kind.__name__]}, "
                f"got {spec[key]!r}."
            )


def fingerprint(run: Run, eval_settings: dict[str, Any]) -> str:
    """What a run's result depends on: its train config (but where it lies), and the evaluation's settings and files.

    The files by their contents: an edited answer key is another evaluation.
    """
    config = {key: value for key, value in run.config.items() if key != "output_dir"}
    payload = {"config": config, "eval": eval_settings}
    if eval_settings.get("files"):  # only then: a train fingerprint (no eval) stays as earlier versions made it
        payload["contents"] = [file_digest(entry["path"]) for entry in eval_settings["files"]]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: str) -> Optional[str]:
    """The SHA-256 of a file's bytes (None if it cannot be read), read once per version of the file."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return _file_digest(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def train_fingerprint(run: Run) -> str:
    """What a run's trained model depends on: its whole train config (but where it lies)."""
    return fingerprint(run, {})


def finished_status(run: Run, eval_settings: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The recorded result of a run that finished before with the same settings, else None (the run is redone).

    ``runs/<name>/grid_status.json``; a run whose config or evaluation changed since (``fingerprint``), or whose
    record cannot be read, is redone, and the grid says why.
    """
    status_path = os.path.join(run.config["output_dir"], STATUS_FILE)
    if not os.path.exists(status_path):
        return None
    try:
        with open(status_path, encoding="utf-8") as f:
            status = json.load(f)
    except (OSError, ValueError) as err:
        status = f"{err}"
    if not isinstance(status, dict):
        print(f"[grid] {run.name}: its record {status_path} cannot be read ({status}): redone", flush=True)
        return None
    if status.get("status") != "done":
        return None
    if "fingerprint" not in status and recorded_with(run, status, eval_settings):  # an earlier version's record
        status["fingerprint"] = fingerprint(run, eval_settings)
        write_json(status_path, status)
    if status.get("fingerprint") != fingerprint(run, eval_settings):
        if trained_status(run) is not None:
            print(f"[grid] {run.name}: its evaluation changed since it finished: evaluated again", flush=True)
        else:
            print(f"[grid] {run.name}: its config or evaluation changed since it finished: redone", flush=True)
        return None
    return status


def trained_status(run: Run) -> Optional[dict[str, Any]]:
    """The record of a run trained before with this train config, whatever its evaluation, else None.

    Such a run is evaluated again, not trained again (``evaluate_again``): only its evaluation changed, or its
    evaluation failed (its record then says ``trained``). A record of an earlier version, which has no train
    fingerprint, counts where its run directory's ``grid_config.yaml`` is this run's config.
    """
    try:
        with open(os.path.join(run.config["output_dir"], STATUS_FILE), encoding="utf-8") as f:
            status = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(status, dict) or status.get("status") not in ("done", "trained"):
        return None
    if "train_fingerprint" in status:
        return status if status["train_fingerprint"] == train_fingerprint(run) else None
    return status if status["status"] == "done" and trained_with(run) else None


def trained_with(run: Run) -> bool:
    """The run directory keeps the config it trained with (``grid_config.yaml``), and it is this run's."""
    try:
        with open(os.path.join(run.config["output_dir"], "grid_config.yaml"), encoding="utf-8") as f:
            trained = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return False
    if not isinstance(trained, dict):
        return False
    return {k: v for k, v in trained.items() if k != "output_dir"} == {
        k: v for k, v in yaml.safe_load(yaml.safe_dump(run.config)).items() if k != "output_dir"
    }


def recorded_with(run: Run, status: dict[str, Any], eval_settings: dict[str, Any]) -> bool:
    """A record without a fingerprint (an earlier version's) was made with this config and these eval sets."""
    names = {os.path.splitext(os.path.basename(entry["path"]))[0] for entry in eval_settings.get("files", [])}
    return trained_with(run) and set(status.get("eval") or {}) == names


def write_json(path: str, data: Any) -> None:
    """Write ``data`` atomically: a reader (or a rerun after a kill) never sees half a file."""
    tmp_path = f"{path}.tmp"
    with open(tmp_path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp_path, path)


def train_watched(config_path: str, run_dir: str, log_path: str, desc: str) -> int:
    """``llamafactory-cli train CONFIG`` into ``log_path``, with a progress bar read from the run's own logs."""
    for name in ("trainer_log.jsonl", "trainer_deviation.jsonl"):  # an earlier, unfinished attempt's
        if os.path.exists(os.path.join(run_dir, name)):
            os.remove(os.path.join(run_dir, name))
    with open(log_path, "w", encoding="utf-8") as log, tqdm(desc=desc, unit="step", dynamic_ncols=True) as bar:
        # its own process group (torchrun's workers included), stopped with the grid (`stop_group`)
        process = subprocess.Popen(
            train_command(config_path), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            return watch(process, run_dir, bar)
        finally:
            stop_group(process)


def stop_group(process: subprocess.Popen) -> None:
    """Stop a training that is still running (the grid was interrupted): its whole process group."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=wait)
            return
        except (subprocess.TimeoutExpired, KeyboardInterrupt):  # hung, or a second Ctrl-C: SIGKILL
            continue
        except ProcessLookupError:
            return


def watch(process: subprocess.Popen, run_dir: str, bar: tqdm) -> int:
    """Update the progress bar from the run's logs until the training ends; its return code."""
    while True:
        returncode = process.poll()
        progress = last_entry(os.path.join(run_dir, "trainer_log.jsonl"), "total_steps")
        if progress.get("total_steps"):
            bar.total = progress["total_steps"]
            bar.update(progress["current_steps"] - bar.n)
            shown = {
                "loss": last_entry(os.path.join(run_dir, "trainer_log.jsonl"), "loss").get("loss"),
                "deviation": last_entry(os.path.join(run_dir, "trainer_deviation.jsonl"), "deviation").get(
                    "deviation"
                ),
            }
            bar.set_postfix({key: f"{value:.4g}" for key, value in shown.items() if value is not None}, False)
            bar.refresh()
        if returncode is not None:
            return returncode
        try:  # a second between updates, and none after the training ends
            process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass


def last_entry(path: str, key: str) -> dict[str, Any]:
    """The last complete entry with ``key`` of a JSON-lines log ({} when there is none yet)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return {}
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if key in entry:
            return entry
    return {}


def run_one(run: Run, settings: dict[str, Any], desc: str) -> dict[str, Any]:
    """Train (stock CLI), evaluate, and record the result in ``runs/<name>/grid_status.json``."""
    run_dir = run.config["output_dir"]
    os.makedirs(run_dir, exist_ok=True)
    for name in (STATUS_FILE, "trainer_state.json"):  # an earlier attempt's: never mixed with this one's
        if os.path.exists(os.path.join(run_dir, name)):
            os.remove(os.path.join(run_dir, name))
    config_path = os.path.join(run_dir, "grid_config.yaml")
    with open(config_path, "w", encoding="utf-8") as f:
        yaml.safe_dump(run.config, f)
    log_path = os.path.join(run_dir, "grid_train.log")
    start = time.time()
    if train_watched(config_path, run_dir, log_path, desc) != 0:
        return failed_status(run, "training failed", log_path, start)
    return record_result(run, settings, log_path, start)


def evaluate_again(run: Run, settings: dict[str, Any], trained: dict[str, Any]) -> dict[str, Any]:
    """A run trained before with its config, whose evaluation changed: evaluated and recorded anew, not retrained.

    Its earlier record stays until the new one replaces it, so a failed evaluation is tried again on the next start.
    """
    log_path = os.path.join(run.config["output_dir"], "grid_train.log")  # here, even if the grid has moved
    return record_result(run, settings, log_path, time.time(), trained.get("duration_s"))


def failed_status(run: Run, why: str, log_path: str, start: float) -> dict[str, Any]:
    print(f"[grid] {run.name}: {why}, see {log_path}", flush=True)
    return {"status": "failed", "log": log_path, "duration_s": round(time.time() - start, 1)}


def record_result(
    run: Run, settings: dict[str, Any], log_path: str, start: float, train_s: Optional[float] = None
) -> dict[str, Any]:
    """Read a trained run's logs, evaluate it, and write its record (``STATUS_FILE``), last: "finished".

    ``train_s``: the training's duration, for a run trained before (the grid's ETA counts trainings, not evaluations).
    """
    run_dir = run.config["output_dir"]
    try:
        history = log_history(run_dir)
    except (OSError, ValueError, KeyError):
        return failed_status(
            run, f"training wrote no trainer_state.json into {run_dir} (did it train? `do_train`)", log_path, start
        )

    status_path = os.path.join(run_dir, STATUS_FILE)
    if train_s is None:  # trained now: recorded as such first, so that a failed evaluation is redone alone
        train_s = round(time.time() - start, 1)
        write_json(
            status_path,
            dict(status="trained", log=log_path, duration_s=train_s, train_fingerprint=train_fingerprint(run)),
        )

    status = {"status": "done", "eval": {}}
    status.update({key: final_value(history, key) for key in ("loss", "deviation", "logps/policy")})
    diverged = diverged_metric(history)
    if diverged is not None:  # evaluated as any run (its seeds stay paired), but its setting is never the best
        status["diverged"] = diverged
        print(f"[grid] {run.name}: diverged ({diverged} is not finite)", flush=True)
    if settings["eval"].get("files"):
        evaluated_at = time.time()
        try:
            results = evaluate_run(run, settings["eval"])
        except Exception as err:  # one run's evaluation does not stop the grid
            with open(log_path, "a", encoding="utf-8") as log:
                log.write(f"\n[grid] evaluation failed: {err!r}\n")
            return failed_status(run, f"evaluation failed ({err})", log_path, start)
        status["eval"] = {name: result["accuracy"] for name, result in results.items()}
        status["eval_hits"] = {name: result["hits"] for name, result in results.items()}  # per question, paired
        status["eval_s"] = round(time.time() - evaluated_at, 1)

    status.update(
        log=log_path,
        duration_s=train_s,
        fingerprint=fingerprint(run, settings["eval"]),
        train_fingerprint=train_fingerprint(run),
    )
    write_json(status_path, status)  # "done": the last write
    return status


def diverged_metric(history: list[dict[str, Any]]) -> Optional[str]:
    """Why a training ended diverged, else None: its last `deviation`, or its last two `grad_norm`, not finite.

    One non-finite gradient norm among others is no divergence: fp16 loss scaling skips a step whose gradients
    overflowed, often in the first steps. A run that logged a single one has nothing else to show, so it counts.
    The Trainer logs a NaN loss as the running mean, so the loss tells nothing.
    """
    for key, last in (("deviation", 1), ("grad_norm", 2)):
        values = step_values(history, key)[-last:]
        if values and not any(isinstance(v, (int, float)) and math.isfinite(v) for _, v in values):
            return f"{key} at step {values[-1][0]}"
    return None


class GridProgress:
    """The grid's counts, its ETA from the durations of finished runs, and ``grid_status.json`` at its root."""

    def __init__(self, runs: list[Run], output_dir: str, grid_file: str) -> None:
        self.runs, self.path, self.grid_file = runs, os.path.join(output_dir, STATUS_FILE), os.path.abspath(grid_file)
        self.states = [
            {"index": i, "name": run.name, "status": "pending", "work": "train"} for i, run in enumerate(runs, start=1)
        ]  # work: "train" (and evaluate), "evaluate" (trained before), None (done before)

    def count(self, status: str) -> int:
        return sum(state["status"] == status for state in self.states)

    def mean_seconds(self, key: str) -> Optional[float]:
        """The mean ``key`` (``duration_s``: a training, ``eval_s``: an evaluation) of the runs finished, if any."""
        seconds = [state.get(key) for state in self.states if state["status"] in ("done", "skipped")]
        seconds = [s for s in seconds if s is not None]
        return statistics.mean(seconds) if seconds else None

    def eta_seconds(self) -> Optional[float]:
        """The runs left, each priced by its work: a training and its evaluation, or an evaluation alone."""
        left = [state["work"] for state in self.states if state["status"] in ("pending", "running") and state["work"]]
        train, evaluate = self.mean_seconds("duration_s"), self.mean_seconds("eval_s")
        if ("evaluate" in left and evaluate is None) or ("train" in left and train is None):
            return None
        return sum((evaluate if work == "evaluate" else train + (evaluate or 0.0) for work in left), 0.0)

    def summary(self) -> str:
        eta = self.eta_seconds()
        return f"{self.count('done')} done, {self.count('skipped')} skipped, {self.count('failed')} failed" + (
            "" if not eta else f"; grid ETA {timedelta(seconds=round(eta))}"
        )

    def update(self, index: int, status: str, result: Optional[dict[str, Any]] = None) -> None:
        state = self.states[index - 1]
        state["status"] = status
        now = datetime.now(UTC).isoformat(timespec="seconds")
        state["started" if status == "running" else "ended"] = now
        for key in ("duration_s", "eval_s", "log"):
            if result and key in result:
                state[key] = result[key]
        state.setdefault("log", os.path.join(self.runs[index - 1].config["output_dir"], "grid_train.log"))
        self.write(now)

    def write(self, now: str) -> None:
        running = [state for state in self.states if state["status"] == "running"]
        data = {
            "grid": self.grid_file,
            "updated": now,
            "total": len(self.states),
            **{status: self.count(status) for status in ("done", "skipped", "failed", "interrupted", "pending")},
            "running": running[0]["name"] if running else None,
            "eta_seconds": self.eta_seconds(),
            "runs": self.states,
        }
        write_json(self.path, data)


def check_eval_templates(path: str, runs: list[Run], eval_settings: dict[str, Any]) -> None:
    """The evaluation's chat template exists (checked before anything trains)."""
    if not eval_settings.get("files"):
        return
    from llamafactory.data.template import TEMPLATES

    for template in {eval_settings.get("template") or run.config.get("template") for run in runs}:
        if template not in TEMPLATES:
            raise ValueError(
                f"Grid file {path}: evaluation template {template!r} (`eval.template`, else the runs' `template`) "
                "is not a LLaMA-Factory template."
            )


def evaluate_run(run: Run, eval_settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    from .eval_mc import MultipleChoiceScorer, evaluate_files

    is_lora = run.config.get("finetuning_type", "lora") == "lora"
    scorer = MultipleChoiceScorer(
        model=run.config["model_name_or_path"] if is_lora else run.config["output_dir"],
        adapter=run.config["output_dir"] if is_lora else None,
        template=eval_settings.get("template") or run.config["template"],
        batch_size=eval_settings.get("batch_size", 8),
    )
    results = {}
    for entry in eval_settings["files"]:
        results.update(evaluate_files(scorer, [entry["path"]], entry["prompt"]))
    return results


def summarize(runs: list[Run], output_dir: str) -> dict[str, Optional[Run]]:
    """Write results.csv / results.md and the figures; returns the best run of each method."""
    from .figures import plot_accuracy_heatmaps, plot_best_accuracy, plot_deviation_curves

    grid_keys = list(dict.fromkeys(k for run in runs for k in run.values))
    eval_sets = list(dict.fromkeys(k for run in runs for k in run.result.get("eval", {})))
    header = (
        ["run", "method"]
        + grid_keys
        + ["final_loss", "final_deviation"]
        + [f"acc_{e}" for e in eval_sets]
        + ["status"]
    )
    rows = []
    for run in runs:
        r = run.result
        rows.append(
            [run.name, run.method]
            + [run.values.get(k, "") for k in grid_keys]
            + [r.get("loss"), r.get("deviation")]
            + [r.get("eval", {}).get(e) for e in eval_sets]
            + [r.get("status", "not run")]
        )

    with open(os.path.join(output_dir, "results.csv"), "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    cell = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    with open(os.path.join(output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")

    best = best_runs(runs, eval_sets)
    plot_deviation_curves(
        {m: r.config["output_dir"] for m, r in best.items() if r}, os.path.join(output_dir, "fig1_deviation.png")
    )
    if eval_sets:
        plot_best_accuracy(runs, best, eval_sets, os.path.join(output_dir, "fig2b_best_accuracy.png"))
        plot_accuracy_heatmaps(runs, eval_sets, os.path.join(output_dir, "fig2a_lr_beta.png"))
    return best


def setting_scores(runs: list[Run], eval_sets: list[str]) -> dict[tuple, list[float]]:
    """Per (method, setting): the score of each seed, the mean eval accuracy.

    Without evaluation, the final ``logps/policy`` (the training answers' log-likelihood, which no β or λ scales)
    where every run of the method logged it, else −final loss (β scales MinorSFT's and SFT-DPO's, λ SFT-GO's).
    """
    done = [run for run in runs if run.result.get("status") == "done"]
    likelihood = {run.method for run in done} - {run.method for run in done if run.result.get("logps/policy") is None}
    scores: dict[tuple, list[float]] = {}
    for run in done:
        r = run.result
        if r.get("diverged"):  # a setting where any seed diverged is never the best
            score = -math.inf
        elif eval_sets:
            score = statistics.mean(r["eval"][e] for e in eval_sets)
        elif run.method in likelihood:
            score = r["logps/policy"]
        else:
            score = -r["loss"] if r.get("loss") is not None else -math.inf
        score = -math.inf if score is None or math.isnan(score) else score  # NaN would win or lose by its place
        scores.setdefault((run.method, run.setting), []).append(score)
    return scores


def best_runs(runs: list[Run], eval_sets: list[str]) -> dict[str, Optional[Run]]:
    """The best setting of each method (mean over seeds), represented by its first run."""
    scores = setting_scores(runs, eval_sets)
    best = {}
    for method in dict.fromkeys(run.method for run in runs):
        candidates = {key: statistics.mean(v) for key, v in scores.items() if key[0] == method}
        candidates = {key: score for key, score in candidates.items() if score > -math.inf}
        if not candidates:
            best[method] = None
            continue
        top = max(candidates, key=candidates.get)
        best[method] = next(
            run
            for run in runs
            if run.method == method and run.setting == top[1] and run.result.get("status") == "done"
        )
    return best


def train_runs(runs: list[Run], settings: dict[str, Any], progress: GridProgress) -> Optional[int]:
    """Train and evaluate every run not finished before; 130 if interrupted, else None."""
    plans = []  # all first, so that the ETA prices each run left by its work
    for index, run in enumerate(runs, start=1):
        done_before = finished_status(run, settings["eval"])
        trained = trained_status(run) if done_before is None else None
        plans.append((done_before, trained))
        progress.states[index - 1]["work"] = None if done_before else "evaluate" if trained else "train"
    for index, (run, (done_before, trained)) in enumerate(zip(runs, plans), start=1):
        head = f"run {index}/{len(runs)} {run.name}"
        if done_before is not None:
            run.result = done_before
            progress.update(index, "skipped", {key: done_before.get(key) for key in ("duration_s", "eval_s")})
            print(f"[grid] {head}: done before, skipped ({progress.summary()})", flush=True)
            continue
        progress.update(index, "running")
        print(f"[grid] {head}: {'evaluating' if trained else 'training'} ({progress.summary()})", flush=True)
        try:
            if trained is not None:
                run.result = evaluate_again(run, settings, trained)
            else:
                run.result = run_one(run, settings, desc=f"run {index}/{len(runs)}")
        except KeyboardInterrupt:
            progress.update(index, "interrupted")
            print(f"\n[grid] interrupted during {run.name}; start the grid again to redo it", flush=True)
            return 130
        progress.update(index, run.result["status"], run.result)
    return None


def interrupt(signum, frame) -> None:
    """SIGTERM handler: stop as on Ctrl-C."""
    raise KeyboardInterrupt


def run_grid(path: str, output_dir: Optional[str] = None, dry_run: bool = False) -> int:
    if not dry_run:  # an unusable output directory is refused before load_grid's seconds of imports
        given = output_dir or read_mapping(path, "Grid file").get("output_dir") or "grid_output"
        why = isinstance(given, str) and unwritable(given)
        if why:
            out = os.path.abspath(os.path.expanduser(given))
            raise ValueError(
                f"Grid output directory {out}: {why}. Give --output-dir (or the grid file's `output_dir`) a directory "
                "you can write."
            )
    runs, settings = load_grid(path, output_dir)
    from .eval_mc import PROMPTS, load_questions

    for entry in settings["eval"].get("files", []):
        if entry["prompt"] not in PROMPTS:
            raise ValueError(f"Grid file {path}: eval prompt {entry['prompt']!r} is not one of {', '.join(PROMPTS)}.")
        if not dry_run:  # a bad evaluation file fails now, not after the training
            load_questions(entry["path"])
    check_eval_templates(path, runs, settings["eval"])
    names = [os.path.splitext(os.path.basename(entry["path"]))[0] for entry in settings["eval"].get("files", [])]
    if len(set(names)) != len(names):
        raise ValueError(f"Grid file {path}: `eval.files` has two files of one name; their results would collide.")

    if dry_run:
        for index, run in enumerate(runs, start=1):
            print(
                f"run {index}/{len(runs)} {run.name}: "
                + " ".join(f"{k}={v}" for k, v in run.config.items() if k in run.values or k == "stage")
            )
        for entry in settings["eval"].get("files", []):
            print(
                f"evaluates on {entry['path']} ({entry['prompt']} prompt)"
                + ("" if os.path.isfile(entry["path"]) else ": missing, provide it before the real run")
            )
        print(f"{len(runs)} runs into {settings['output_dir']}")
        return 0

    try:
        os.makedirs(settings["output_dir"], exist_ok=True)
    except OSError as err:
        raise ValueError(f"Grid output directory {settings['output_dir']}: cannot be made: {err}") from None
    progress = GridProgress(runs, settings["output_dir"], path)
    progress.write(datetime.now(UTC).isoformat(timespec="seconds"))
    # `kill`, or the terminal closing, stops the grid as Ctrl-C does: the running training goes with it (it has its
    # own process group), and the status says so. Signal handlers can only be set in the main thread.
    signals = (signal.SIGTERM, signal.SIGHUP)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, interrupt) for sig in signals} if main_thread else {}
    try:
        code = train_runs(runs, settings, progress)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code is not None:
        return code
    print(f"[grid] finished: {progress.summary()}; status in {progress.path}", flush=True)
    best = summarize(runs, settings["output_dir"])
    print(open(os.path.join(settings["output_dir"], "results.md"), encoding="utf-8").read())
    print("best per method: " + ", ".join(f"{m}: {r.name if r else '-'}" for m, r in best.items()))
    diverged = [run.name for run in runs if run.result.get("diverged")]
    if diverged:
        print(f"[grid] {len(diverged)} run(s) diverged (their settings are never the best): {', '.join(diverged)}")
    failed = [run for run in runs if run.result.get("status") != "done"]
    if failed:
        logs = ", ".join(f"{run.name} (log: {run.result.get('log')})" for run in failed)
        print(f"[grid] {len(failed)} run(s) failed: {logs}; start the grid again to redo them")
    return 1 if failed else 0
