"""Small-scale reproduction of arXiv 2408.10642 on this machine (2 CPU cores, under 30 minutes), offline.

1. A tiny Qwen2 model gets a "general" ability first: SFT on generated "which kind of thing is a <word>?"
   questions in the paper's ceval multiple-choice format, where the category shows in the word's suffix
   (animal, colour, fruit, tool), each answered by its letter and then a rationale of varied length (cached in
   ``.cache/reproduction``).
2. That model is fine-tuned on a generated "domain" of four other categories (metal, river, city, star), same
   format, with a grid over the three methods (raw SFT with Eq. 5 and deviation tracking, SFT using DPO, MinorSFT)
   × learning rates × β × seeds, through ``llamafactory-minorsft grid`` (stock ``llamafactory-cli train`` for
   every run, the reference log-probs precomputed once for the whole grid). Then one raw-SFT row with the token
   mean (``sft_loss_reduction: token``) at raw SFT's best learning rate.
3. Every run is scored on held-out multiple-choice sets of words never seen in training: the domain and the
   general one (retention), by the next-token scores of A-D; ``deviation`` and the coefficients come from
   training.
4. ``docs/reproduction.md`` gets the tables, the figures and a verdict on each of the paper's claims, from paired
   comparisons over seeds and questions (``report.py``).

    .venv/bin/python reproduction/reproduce.py            # the committed run
    .venv/bin/python reproduction/reproduce.py --smoke    # the pipeline on a few samples (its report: <cache>_grid/docs)
"""

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from typing import NoReturn

import yaml


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_SIZE = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
)
# The committed run's design (reproduction/README.md says why); --smoke shrinks it to check the pipeline.
DESIGN = dict(
    sft_lrs=[3.0e-4, 1.0e-3, 3.0e-3],  # from learning the domain with no forgetting to forgetting (piloted)
    betas=[0.04, 0.2],  # with the paper's 0.04
    seeds=[1, 2, 3, 4, 5],
    general_samples=800,
    general_epochs=8.0,
    general_lr=2.0e-3,
    domain_samples=128,  # 16 steps of batch 8
    batch_size=8,
    eval_questions=200,  # one question moves an accuracy by 0.005
)
SMOKE = dict(
    sft_lrs=[1.0e-3],
    betas=[0.04],
    seeds=[1, 2],
    general_samples=48,
    general_epochs=1.0,
    general_lr=1.0e-3,
    domain_samples=32,
    batch_size=8,
    eval_questions=12,
)


# Each task: words whose category shows in a suffix, asked as a ceval multiple-choice question whose four options
# (in a fixed order) are the task's categories; new stems make held-out questions the model can answer only by
# generalising. The domain has its own question, categories and suffixes. Nothing forces forgetting: whether the
# general ability survives depends on how far tuning moves the model, which is what the paper's methods limit.
# Each answer is the letter (scored as the next token) and then a rationale: the first k of its category's facts,
# k drawn per sample, so answers run from the letter alone to about 50 tokens and the methods' per-sample weights
# differ (with one answer length, SFT using DPO and MinorSFT differ by a constant factor that AdamW removes).
TASKS = {
    "general": {
        "question": "Which kind of thing is a {word}?",
        "categories": {"animal": "ox", "colour": "el", "fruit": "ap", "tool": "ik"},
        "facts": {
            "animal": "it breathes, eats grass, has four legs, sleeps at night, runs fast and lives in a herd",
            "colour": "it is seen by the eye, mixes with white, fades in the sun and paints a wall or a sky",
            "fruit": "it grows on a tree, is sweet, has seeds, ripens in summer and is eaten fresh or dried",
            "tool": "it is made of steel, has a handle, cuts or turns things and is kept in a box in the shed",
        },
    },
    "domain": {
        "question": "On the star chart, what is the place named {word}?",
        "categories": {"metal": "um", "river": "ar", "city": "os", "star": "is"},
        "facts": {
            "metal": "it is mined from rock, melts in a furnace, conducts heat and is cast into coins or bars",
            "river": "it flows from the hills to the sea, floods in spring, turns mills and carries boats",
            "city": "it has walls and gates, a market square, a harbour, a council and many thousand people",
            "star": "it burns in the night sky, guides the sailors, is far away and shines brighter than a moon",
        },
    },
}
MAX_FACT_WORDS = 18  # a rationale is the first k words of the facts, k uniform in 1..MAX_FACT_WORDS
# The share of answers that are the letter alone: the letter is 1 of m answer tokens, so without short answers the
# letter's gradient is too diluted to learn the domain in a few steps (measured: domain accuracy stayed at chance)
LETTER_ONLY = 0.5
#: written into the cache and the output directory as they are made: only such directories are ever deleted
MARKER = ".minorsft_reproduction"


def stem(rng: random.Random) -> str:
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.choice((2, 3))))


def mc_set(task: str, count: int, seed: int) -> list[dict[str, str]]:
    """``count`` questions of ``task`` in the ceval layout, each with the rationale it is trained on."""
    rng = random.Random(seed)
    spec = TASKS[task]
    names = list(spec["categories"])
    questions = []
    for _ in range(count):
        answer = rng.randrange(4)
        word = f"{stem(rng)}-{spec['categories'][names[answer]]}"
        words = 0 if rng.random() < LETTER_ONLY else rng.randint(1, MAX_FACT_WORDS)
        facts = spec["facts"][names[answer]].split()[:words]
        questions.append(
            {
                "question": spec["question"].format(word=word),
                **dict(zip("ABCD", names)),
                "answer": "ABCD"[answer],
                "explanation": " ".join(facts),
            }
        )
    return questions


def as_sft(questions: list[dict[str, str]]) -> list[dict[str, str]]:
    """The letter first (so the next-token score of A-D reads the answer), then the rationale, if any."""
    from llamafactory_minorsft.tools.eval_mc import build_prompt

    return [
        {
            "instruction": build_prompt(q, "ceval"),
            "input": "",
            "output": q["answer"] + (f". Because {q['explanation']}." if q["explanation"] else ""),
        }
        for q in questions
    ]


def answer_lengths(tokenizer, samples: list[dict[str, str]]) -> dict[str, float]:
    """Answer tokens, min / median / max (the output and the end-of-turn token, as the template trains them)."""
    lengths = [len(tokenizer(s["output"], add_special_tokens=False)["input_ids"]) + 1 for s in samples]
    return {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)}


def write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def train(config: dict, workdir: str, name: str) -> None:
    path = os.path.join(workdir, f"{name}.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f)
    from llamafactory_minorsft.tools.runs import train_command

    with open(os.path.join(workdir, f"{name}.log"), "w", encoding="utf-8") as log:
        subprocess.run(train_command(path), stdout=log, stderr=subprocess.STDOUT, check=True)


def check_own_dir(option: str, path: str, own: str) -> None:
    """``path`` may be deleted: this script made it (its ``MARKER``, or ``own`` of an earlier version), or it is empty.

    Anything else is refused, never deleted: ``--cache`` or ``--output-dir`` may point at a user's directory.
    """
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path) or os.path.islink(path):
        fail(f"{option} {path!r} is not a directory. Point {option} at a new directory.")
    if os.listdir(path) and not any(os.path.exists(os.path.join(path, name)) for name in (MARKER, own)):
        fail(
            f"{option} {path!r} holds files that this script did not write, and it would have to "
            f"delete them to rebuild. Point {option} at a new or empty directory."
        )


def prepare(cache: str, design: dict, output_dir: str) -> dict[str, str]:
    """Tokenizer, base model, data sets and the general model (cached: reused when present for this design)."""
    paths = {name: os.path.join(cache, name) for name in ("base", "data", "general", "eval")}
    stamp = os.path.join(cache, "design.json")
    # everything the data and the general model depend on: another design rebuilds them and drops the old grids
    design = dict(design, tasks=TASKS, letter_only=LETTER_ONLY, max_fact_words=MAX_FACT_WORDS, model=MODEL_SIZE)
    if os.path.exists(os.path.join(paths["general"], "model.safetensors")) and os.path.exists(stamp):
        with open(stamp, encoding="utf-8") as f:
            if json.load(f) == json.loads(json.dumps(design)):
                print("[repro] reusing the cached general model", flush=True)
                open(os.path.join(cache, MARKER), "w").close()  # made by an earlier version: marked now
                return paths

    # its runs were trained from another general model: both go, but only where this script made them
    dirs = (
        ("--cache", cache, "design.json"),
        ("--output-dir", output_dir, os.path.join("methods", "grid_status.json")),
    )
    for option, path, own in dirs:  # both checked before either goes
        check_own_dir(option, path, own)
    from transformers import AutoTokenizer  # torch: after the checks, before anything goes

    from llamafactory_minorsft.tools.tiny import build_model, build_tokenizer, write_dataset

    for _, path, _ in dirs:
        shutil.rmtree(path, ignore_errors=True)
    os.makedirs(paths["eval"])
    os.makedirs(output_dir, exist_ok=True)
    for path in (cache, output_dir):
        open(os.path.join(path, MARKER), "w").close()
    general_train = as_sft(mc_set("general", design["general_samples"], seed=0))
    domain_train = as_sft(mc_set("domain", design["domain_samples"], seed=1))
    write_dataset(paths["data"], "general", general_train)
    write_dataset(paths["data"], "domain", domain_train)
    write_jsonl(os.path.join(paths["eval"], "domain_mc.jsonl"), mc_set("domain", design["eval_questions"], seed=100))
    write_jsonl(os.path.join(paths["eval"], "general_mc.jsonl"), mc_set("general", design["eval_questions"], 101))

    texts = [s["instruction"] + " " + s["output"] for s in general_train[:400] + domain_train[:400]]
    build_tokenizer(texts + ["system user assistant You are a helpful assistant."], paths["base"])
    tokenizer = AutoTokenizer.from_pretrained(paths["base"])
    build_model(tokenizer, paths["base"], seed=0, **MODEL_SIZE)
    lengths = {"general": answer_lengths(tokenizer, general_train), "domain": answer_lengths(tokenizer, domain_train)}
    with open(os.path.join(cache, "answer_lengths.json"), "w", encoding="utf-8") as f:
        json.dump(lengths, f)
    print(f"[repro] answer tokens (min / median / max): {lengths}", flush=True)
    print("[repro] stage 1: general ability", flush=True)
    train(
        dict(
            model_name_or_path=paths["base"],
            stage="sft",
            do_train=True,
            finetuning_type="full",
            dataset="general",
            dataset_dir=paths["data"],
            template="qwen",
            cutoff_len=192,
            overwrite_cache=True,
            output_dir=paths["general"],
            overwrite_output_dir=True,
            logging_steps=10,
            save_strategy="no",
            report_to="none",
            per_device_train_batch_size=16,
            learning_rate=design["general_lr"],
            num_train_epochs=design["general_epochs"],
            lr_scheduler_type="linear",
            warmup_ratio=0.1,
            dataloader_num_workers=0,
            seed=0,
        ),
        cache,
        "general",
    )
    with open(stamp, "w", encoding="utf-8") as f:  # written last: the cache is complete
        json.dump(design, f)
    return paths


def write_grid(paths: dict[str, str], cache: str, output_dir: str, blocks: list[dict], design: dict) -> str:
    """A grid file of ``blocks`` over the domain, with the reference log-probs precomputed once for every run."""
    base = dict(
        model_name_or_path=paths["general"],
        do_train=True,
        finetuning_type="full",
        dataset="domain",
        dataset_dir=paths["data"],
        template="qwen",
        cutoff_len=192,
        overwrite_cache=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        per_device_train_batch_size=design["batch_size"],
        num_train_epochs=1.0,
        lr_scheduler_type="linear",
        warmup_ratio=0.1,
        dataloader_num_workers=0,
        precompute_ref_logps=True,  # one reference pass for the whole grid (same model, same data)
        ref_logps_cache_dir=os.path.join(cache, "ref_logps"),
    )
    name = os.path.basename(output_dir.rstrip(os.sep))
    with open(os.path.join(cache, f"{name}_base.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(base, f)
    grid = dict(
        base=f"{name}_base.yaml",
        output_dir=output_dir,
        eval=dict(
            files=[os.path.join(paths["eval"], "domain_mc.jsonl"), os.path.join(paths["eval"], "general_mc.jsonl")],
            prompt="ceval",
            batch_size=50,
        ),
        blocks=blocks,
    )
    path = os.path.join(cache, f"{name}.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(grid, f, sort_keys=False)
    return path


def method_blocks(design: dict) -> list[dict]:
    """The paper's grid: raw SFT (Eq. 5) at each lr; SFT using DPO and MinorSFT at twice those lrs × β."""
    reference_lrs = [2 * lr for lr in design["sft_lrs"]]  # the paper: they peak at twice SFT's learning rate
    return [
        dict(
            name="sft",
            set=dict(stage="sft", sft_loss_reduction="sample", track_deviation=True),
            grid=dict(learning_rate=design["sft_lrs"], seed=design["seeds"]),
        ),
        dict(
            name="sft_dpo",
            set=dict(stage="sft_dpo"),
            grid=dict(learning_rate=reference_lrs, pref_beta=design["betas"], seed=design["seeds"]),
        ),
        dict(
            name="minorsft",
            set=dict(stage="minorsft"),
            grid=dict(learning_rate=reference_lrs, pref_beta=design["betas"], seed=design["seeds"]),
        ),
    ]


def token_mean_block(grid_dir: str, design: dict) -> list[dict]:
    """Raw SFT with the token mean at raw SFT's best learning rate (from the finished method grid)."""
    from report import best_settings, load_runs  # reproduction/report.py

    lr = best_settings(load_runs(grid_dir))["sft"][1]
    return [
        dict(
            name="sft_token",
            set=dict(stage="sft", sft_loss_reduction="token", track_deviation=True),
            grid=dict(learning_rate=[lr], seed=design["seeds"]),  # the lr in the run's name: another best, another run
        )
    ]


def fail(message: str) -> NoReturn:
    """Bad input: one line, exit status 2 (as argparse and ``llamafactory-minorsft``)."""
    print(f"reproduce.py: {message}", file=sys.stderr)
    sys.exit(2)


def check_makeable(option: str, path: str) -> None:
    """``path`` is a directory, or one can be made there: its nearest existing parent is a writable directory."""
    from llamafactory_minorsft.paths import unwritable

    why = unwritable(path)
    if why:
        fail(f"{option} {path!r}: {why}. Point {option} at a directory.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=None, help="default: .cache/reproduction (--smoke: .cache/repro_smoke)")
    parser.add_argument("--output-dir", default=None, help="default: <cache>_grid")
    parser.add_argument("--docs", default=None, help="default: docs/ (--smoke: <output-dir>/docs)")
    parser.add_argument("--smoke", action="store_true", help="a small grid on a few samples: checks the pipeline")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from a finished run")
    args = parser.parse_args()
    design = SMOKE if args.smoke else DESIGN
    cache = os.path.abspath(
        args.cache or os.path.join(ROOT, ".cache", "repro_smoke" if args.smoke else "reproduction")
    )
    output_dir = os.path.abspath(args.output_dir or f"{cache.rstrip(os.sep)}_grid")
    docs = args.docs or (os.path.join(output_dir, "docs") if args.smoke else os.path.join(ROOT, "docs"))
    methods_dir, token_dir = os.path.join(output_dir, "methods"), os.path.join(output_dir, "token_mean")
    summary_path = os.path.join(output_dir, "reproduction_summary.json")
    if args.report_only:
        if not os.path.exists(summary_path):
            fail(
                f"--report-only: {summary_path} is missing: no run has finished in --output-dir "
                f"{output_dir!r}. Run reproduce.py without --report-only first."
            )
    else:
        for option, path in (("--cache", cache), ("--output-dir", output_dir), ("--docs", docs)):  # before any work
            check_makeable(option, path)
    from report import write_report  # reproduction/report.py (numpy, scipy): after the checks

    if args.report_only:
        with open(summary_path, encoding="utf-8") as f:
            summary = json.load(f)
        write_report(methods_dir, token_dir, docs, summary)
        return

    start = time.time()
    paths = prepare(cache, design, output_dir)
    from llamafactory_minorsft.tools.eval_mc import MultipleChoiceScorer, evaluate_files
    from llamafactory_minorsft.tools.grid import run_grid

    eval_files = [os.path.join(paths["eval"], f) for f in ("domain_mc.jsonl", "general_mc.jsonl")]
    general = {
        n: r["accuracy"]
        for n, r in evaluate_files(MultipleChoiceScorer(paths["general"], "qwen", batch_size=50), eval_files).items()
    }
    print(f"[repro] general model before domain tuning: {general}", flush=True)
    code = run_grid(write_grid(paths, cache, methods_dir, method_blocks(design), design))
    if code == 0:
        code = run_grid(write_grid(paths, cache, token_dir, token_mean_block(methods_dir, design), design))
    with open(os.path.join(cache, "answer_lengths.json"), encoding="utf-8") as f:
        lengths = json.load(f)
    summary = dict(
        general=general,
        minutes=(time.time() - start) / 60,
        answer_lengths=lengths,
        design=design,
        smoke=args.smoke,
    )
    with open(summary_path, "w", encoding="utf-8") as f:
        json.dump(summary, f)
    if code == 0:
        write_report(methods_dir, token_dir, docs, summary)
    sys.exit(code)


if __name__ == "__main__":
    main()
