"""Small-scale reproduction of arXiv 2408.10642 on this machine (2 CPU cores, about 10 minutes), offline.

1. A tiny Qwen2 model gets a "general" ability first: SFT on generated "which kind of thing is a <word>?"
   questions in the paper's ceval multiple-choice format, where the category shows in the word's suffix
   (animal, colour, fruit, tool; cached in ``.cache/reproduction``).
2. That model is fine-tuned on a generated "domain" of four other categories (metal, river, city, star),
   same format, with a grid over
   the three methods (raw SFT with deviation tracking, SFT using DPO, MinorSFT) × learning rates × β × seeds,
   through ``llamafactory-minorsft grid`` (stock ``llamafactory-cli train`` for every run).
3. Every run is scored on held-out multiple-choice sets of words never seen in training: the domain and the
   general one (retention); ``deviation`` comes from training.
4. ``docs/reproduction.md`` gets the tables, the figures and a verdict on each of the paper's claims.

    .venv/bin/python reproduction/reproduce.py            # the committed run
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time

import yaml


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_SIZE = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
)
SFT_LRS = [1.0e-4, 3.0e-4, 1.0e-3, 3.0e-3]  # from under-learning the domain to wrecking the model
REFERENCE_LRS = [2 * lr for lr in SFT_LRS]  # the paper: the reference methods peak at twice SFT's learning rate
BETAS = [0.04, 0.2]
SEEDS = [1, 2, 3]
DOMAIN_SAMPLES = 64  # 4 steps of batch 16: no setting learns the domain perfectly, so the best ones can differ
DOMAIN_EPOCHS = 1.0


# Each task: words whose category shows in a suffix, asked as a ceval multiple-choice question whose four options
# (in a fixed order) are the task's categories; new stems make held-out questions the model can answer only by
# generalising. The domain has its own question, categories and suffixes. Nothing forces forgetting: whether the
# general ability survives depends on how far tuning moves the model, which is what the paper's methods limit.
TASKS = {
    "general": {
        "question": "Which kind of thing is a {word}?",
        "categories": {"animal": "ox", "colour": "el", "fruit": "ap", "tool": "ik"},
    },
    "domain": {
        "question": "On the star chart, what is the place named {word}?",
        "categories": {"metal": "um", "river": "ar", "city": "os", "star": "is"},
    },
}


def stem(rng: random.Random) -> str:
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.choice((2, 3))))


def mc_set(task: str, count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    categories = TASKS[task]["categories"]
    names = list(categories)
    questions = []
    for _ in range(count):
        answer = rng.randrange(4)
        word = f"{stem(rng)}-{categories[names[answer]]}"
        questions.append(
            {
                "question": TASKS[task]["question"].format(word=word),
                **dict(zip("ABCD", names)),
                "answer": "ABCD"[answer],
            }
        )
    return questions


def as_sft(questions: list[dict[str, str]]) -> list[dict[str, str]]:
    from llamafactory_minorsft.tools.eval_mc import build_prompt

    return [{"instruction": build_prompt(q, "ceval"), "input": "", "output": q["answer"]} for q in questions]


def write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def train(config: dict, workdir: str, name: str) -> None:
    path = os.path.join(workdir, f"{name}.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f)
    cli = os.path.join(os.path.dirname(sys.executable), "llamafactory-cli")
    with open(os.path.join(workdir, f"{name}.log"), "w", encoding="utf-8") as log:
        subprocess.run([cli, "train", path], stdout=log, stderr=subprocess.STDOUT, check=True)


def prepare(cache: str) -> dict[str, str]:
    """Tokenizer, base model, data sets and the general model (cached: reused when present)."""
    from llamafactory_minorsft.tools.tiny import build_model, build_tokenizer, write_dataset

    paths = {name: os.path.join(cache, name) for name in ("base", "data", "general", "eval")}
    if os.path.exists(os.path.join(paths["general"], "model.safetensors")):
        print("[repro] reusing the cached general model", flush=True)
        return paths

    shutil.rmtree(cache, ignore_errors=True)
    os.makedirs(paths["eval"])
    general_train = as_sft(mc_set("general", 800, seed=0))
    domain_train = as_sft(mc_set("domain", DOMAIN_SAMPLES, seed=1))
    write_dataset(paths["data"], "general", general_train)
    write_dataset(paths["data"], "domain", domain_train)
    write_jsonl(os.path.join(paths["eval"], "domain_mc.jsonl"), mc_set("domain", 200, seed=100))
    write_jsonl(os.path.join(paths["eval"], "general_mc.jsonl"), mc_set("general", 200, seed=101))

    texts = [s["instruction"] + " " + s["output"] for s in general_train[:400] + domain_train[:400]]
    tokenizer = build_tokenizer(texts + ["system user assistant You are a helpful assistant."], paths["base"])
    build_model(tokenizer, paths["base"], seed=0, **MODEL_SIZE)
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
            cutoff_len=160,
            overwrite_cache=True,
            output_dir=paths["general"],
            overwrite_output_dir=True,
            logging_steps=10,
            save_strategy="no",
            report_to="none",
            per_device_train_batch_size=16,
            learning_rate=1e-3,
            num_train_epochs=5.0,
            lr_scheduler_type="linear",
            warmup_ratio=0.1,
            dataloader_num_workers=0,
            seed=0,
        ),
        cache,
        "general",
    )
    return paths


def write_grid(paths: dict[str, str], workdir: str, output_dir: str) -> str:
    base = dict(
        model_name_or_path=paths["general"],
        do_train=True,
        finetuning_type="full",
        dataset="domain",
        dataset_dir=paths["data"],
        template="qwen",
        cutoff_len=160,
        overwrite_cache=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        per_device_train_batch_size=16,
        num_train_epochs=DOMAIN_EPOCHS,
        lr_scheduler_type="linear",
        warmup_ratio=0.1,
        dataloader_num_workers=0,
    )
    with open(os.path.join(workdir, "base.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(base, f)
    grid = dict(
        base="base.yaml",
        output_dir=output_dir,
        eval=dict(
            files=[os.path.join(paths["eval"], "domain_mc.jsonl"), os.path.join(paths["eval"], "general_mc.jsonl")],
            prompt="ceval",
            batch_size=32,
        ),
        blocks=[
            dict(
                name="sft",
                set=dict(stage="sft", sft_loss_reduction="sample", track_deviation=True),
                grid=dict(learning_rate=SFT_LRS, seed=SEEDS),
            ),
            dict(
                name="sft_dpo",
                set=dict(stage="sft_dpo"),
                grid=dict(learning_rate=REFERENCE_LRS, pref_beta=BETAS, seed=SEEDS),
            ),
            dict(
                name="minorsft",
                set=dict(stage="minorsft"),
                grid=dict(learning_rate=REFERENCE_LRS, pref_beta=BETAS, seed=SEEDS),
            ),
        ],
    )
    path = os.path.join(workdir, "grid.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(grid, f, sort_keys=False)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=os.path.join(ROOT, ".cache", "reproduction"))
    parser.add_argument("--output-dir", default=os.path.join(ROOT, ".cache", "reproduction_grid"))
    parser.add_argument("--docs", default=os.path.join(ROOT, "docs"))
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from a finished run")
    args = parser.parse_args()
    from report import write_report  # reproduction/report.py

    summary_path = os.path.join(args.output_dir, "reproduction_summary.json")
    if args.report_only:
        with open(summary_path, encoding="utf-8") as f:
            summary = json.load(f)
        write_report(args.output_dir, args.docs, summary["general"], summary["minutes"])
        return

    start = time.time()
    paths = prepare(args.cache)
    grid = write_grid(paths, args.cache, args.output_dir)
    from llamafactory_minorsft.tools.eval_mc import MultipleChoiceScorer, evaluate_files
    from llamafactory_minorsft.tools.grid import run_grid

    eval_files = [os.path.join(paths["eval"], f) for f in ("domain_mc.jsonl", "general_mc.jsonl")]
    general = {
        n: r["accuracy"]
        for n, r in evaluate_files(MultipleChoiceScorer(paths["general"], "qwen", batch_size=32), eval_files).items()
    }
    print(f"[repro] general model before domain tuning: {general}", flush=True)
    code = run_grid(grid)
    minutes = (time.time() - start) / 60
    with open(summary_path, "w", encoding="utf-8") as f:
        json.dump({"general": general, "minutes": minutes}, f)
    write_report(args.output_dir, args.docs, general, minutes)
    sys.exit(code)


if __name__ == "__main__":
    main()
