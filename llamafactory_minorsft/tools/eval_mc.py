"""Multiple-choice evaluation with the paper's prompts (arXiv 2408.10642 §4), offline, on local files.

Files follow the ceval-exam layout: columns ``question, A, B, C, D, answer`` (extra columns are ignored), as
CSV, JSON (a list of objects) or JSONL. The model's choice is the option letter with the highest next-token
score after the template's assistant prefix, as LLaMA-Factory's own evaluator reads it. Full models and
LoRA adapters load through LLaMA-Factory.
"""

import csv
import json
import os
from typing import Any, Optional


CHOICES = ("A", "B", "C", "D")
REQUIRED_COLUMNS = ("question",) + CHOICES + ("answer",)

#: the paper's ceval-exam prompt, verbatim
CEVAL_PROMPT = (
    "You need to choose one of the four options A, B, C, and D as the most appropriate answer to the question. "
    "You can only output one character, and this character must be one of A, B, C, and D. The question content "
    "is: {question} The four options are: A. {A} B. {B} C. {C} D. {D} Your answer is:"
)
#: the paper's FinanceIQ / fineval instruction, verbatim; the question and options follow it (our layout)
INSTRUCTION = (
    "Please answer the questions based on the context provided. Please ensure that the original information "
    "(such as numbers, time, entities, opinions, etc.) is accurately cited when answering. If the user's question "
    "cannot be answered based on the given context, please briefly explain why. If the answer involves "
    "mathematical calculations, please give priority to calling tools; if it involves numerical comparison, "
    "please give the comparison process; if it involves analysis or reasoning, please give the reasoning and "
    "analysis process"
)
INSTRUCTION_PROMPT = INSTRUCTION + "\n\n{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nAnswer:"
PROMPTS = {"ceval": CEVAL_PROMPT, "instruction": INSTRUCTION_PROMPT}


def load_questions(path: str) -> list[dict[str, str]]:
    """Read a ceval-layout file; raises ValueError naming the file and any missing column."""
    if not os.path.isfile(path):
        raise ValueError(f"Evaluation file {path!r} does not exist.")

    # utf-8-sig: a byte-order mark (a CSV saved by Excel) would otherwise become part of the first column's name
    try:
        if path.endswith(".csv"):
            with open(path, encoding="utf-8-sig", newline="") as f:
                rows = list(csv.DictReader(f))
        elif path.endswith(".jsonl"):
            with open(path, encoding="utf-8-sig") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        elif path.endswith(".json"):
            with open(path, encoding="utf-8-sig") as f:
                rows = json.load(f)
        else:
            raise ValueError(f"Evaluation file {path!r}: use .csv, .json or .jsonl.")
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"Evaluation file {path!r} cannot be read as UTF-8 {path.rsplit('.', 1)[-1]}: {err}"
        ) from None

    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"Evaluation file {path!r}: must hold a list of questions, each a mapping of column: value.")
    if not rows:
        raise ValueError(f"Evaluation file {path!r} has no questions.")

    missing = [column for column in REQUIRED_COLUMNS if column not in rows[0]]
    if missing:
        raise ValueError(
            f"Evaluation file {path!r} lacks the column(s) {', '.join(missing)}; the ceval-exam layout needs "
            f"{', '.join(REQUIRED_COLUMNS)}."
        )

    bad = [i for i, row in enumerate(rows) if str(row["answer"]).strip() not in CHOICES]
    if bad:
        raise ValueError(f"Evaluation file {path!r}: `answer` must be one of A, B, C, D (rows {bad[:5]}).")

    return [{key: str(row[key]).strip() for key in REQUIRED_COLUMNS} for row in rows]


def build_prompt(question: dict[str, str], prompt: str = "ceval") -> str:
    return PROMPTS[prompt].format(**question)


class MultipleChoiceScorer:
    """A model (plus adapters) loaded by LLaMA-Factory, scoring A-D as the next token after the prompt."""

    def __init__(self, model: str, template: str, adapter: Optional[str] = None, batch_size: int = 8) -> None:
        import torch
        from llamafactory.data import get_template_and_fix_tokenizer
        from llamafactory.hparams import get_infer_args
        from llamafactory.model import load_model, load_tokenizer

        args = {"model_name_or_path": model, "template": template, "infer_dtype": "float32"}
        if adapter:
            args.update(adapter_name_or_path=adapter, finetuning_type="lora")
        model_args, data_args, finetuning_args, _ = get_infer_args(args)
        tokenizer_module = load_tokenizer(model_args)
        self.tokenizer = tokenizer_module["tokenizer"]
        self.tokenizer.padding_side = "left"
        own_tokens = len(self.tokenizer)
        self.template = get_template_and_fix_tokenizer(self.tokenizer, data_args)
        self.model = load_model(self.tokenizer, model_args, finetuning_args, is_trainable=False).eval()
        rows = self.model.get_input_embeddings().num_embeddings
        if own_tokens <= rows < len(self.tokenizer):  # the template added special tokens the model has no rows for
            raise ValueError(
                f"eval-mc --template {template}: adds {len(self.tokenizer) - own_tokens} special token(s) that the "
                f"vocabulary of {model} lacks. Use the template the model was trained with."
            )
        if len(self.tokenizer) > rows:  # its ids past the embedding would fail deep in the forward
            raise ValueError(
                f"eval-mc: the tokenizer of {model} has {len(self.tokenizer)} tokens, the model's embedding only {rows} "
                "rows: they do not belong together. Point --model at a directory whose tokenizer is the model's."
            )
        self.choice_ids = torch.tensor([self.tokenizer.encode(c, add_special_tokens=False)[-1] for c in CHOICES])
        self.batch_size = batch_size

    def predict(self, prompts: list[str]) -> list[str]:
        import torch

        predictions = []
        for start in range(0, len(prompts), self.batch_size):
            encoded = [
                self.template.encode_oneturn(
                    self.tokenizer, [{"role": "user", "content": p}, {"role": "assistant", "content": ""}]
                )[0]
                for p in prompts[start : start + self.batch_size]
            ]
            batch = self.tokenizer.pad({"input_ids": encoded}, return_tensors="pt", padding=True)
            with torch.no_grad():
                logits = self.model(**batch.to(self.model.device)).logits[:, -1]
            scores = logits[:, self.choice_ids.to(logits.device)]
            predictions += [CHOICES[i] for i in scores.argmax(-1).tolist()]
        return predictions


def evaluate_files(scorer: MultipleChoiceScorer, files: list[str], prompt: str = "ceval") -> dict[str, Any]:
    """Accuracy per file: {name: {"accuracy", "correct", "total", "hits"}} (name = file stem).

    ``hits``: one character per question, in file order, "1" where it was answered right (for paired statistics).
    """
    results = {}
    for path in files:
        questions = load_questions(path)
        predictions = scorer.predict([build_prompt(q, prompt) for q in questions])
        hits = "".join("1" if pred == q["answer"] else "0" for pred, q in zip(predictions, questions))
        correct = hits.count("1")
        name = os.path.splitext(os.path.basename(path))[0]
        results[name] = {
            "accuracy": correct / len(questions),
            "correct": correct,
            "total": len(questions),
            "hits": hits,
        }
    return results


def format_table(results: dict[str, Any]) -> str:
    lines = ["| eval set | accuracy | correct / total |", "|---|---|---|"]
    lines += [f"| {name} | {r['accuracy']:.4f} | {r['correct']} / {r['total']} |" for name, r in results.items()]
    return "\n".join(lines)
