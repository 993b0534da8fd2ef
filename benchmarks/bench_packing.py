"""Packed (`neat_packing`) against padded batches: trained tokens per second, peak memory and padding, in one run.

Instruction answers are short and uneven. The data here are generated with the answer lengths of LLaMA-Factory's
`alpaca_en_demo` (``ANSWER_WORDS``: the deciles of its 999 answers' word counts, measured with ``str.split``;
about 1.3 tokens per English word) and its prompt lengths (``PROMPT_WORDS``), cutoff 1,024. Every variant trains
the same data in its own process through LLaMA-Factory's ``run_exp``; per optimizer step the worker records the wall
time, the answer tokens trained (labels that count, not padding), and the real and padded tokens of the batch. The
table gives answer tokens per second over the steps after the warm-up, as ratios against stock sft with
`neat_packing` and against the same stage padded, with peak RSS and the padding fraction.

    .venv/bin/python benchmarks/bench_packing.py --model tiny        # a tiny decoder (hidden 64)
    .venv/bin/python benchmarks/bench_packing.py --model qwen2-1.5b-head --steps 4 --warmup 1

Each model's table replaces its own section of benchmarks/PACKING.md.
"""

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_reference import QWEN2_15B_HEAD, PeakMemory, write_section  # noqa: E402


#: deciles (0 %, 10 %, …, 90 %, 100 %) of the word counts of alpaca_en_demo's answers and prompts (instruction +
#: input), measured on LLaMA-Factory's data/alpaca_en_demo.json (999 samples): sorted counts at index round(q/10·998)
ANSWER_WORDS = (1, 8, 13, 24, 46, 81, 118, 170, 224, 279, 429)
PROMPT_WORDS = (4, 7, 8, 9, 10, 12, 13, 15, 18, 24, 130)
TOKENS_PER_WORD = 1.3
CUTOFF = 1024
MODELS = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    # still tiny (about 9M parameters), but its step is compute, not overhead (at hidden 64, packing gains stock sft
    # 1.04x: there is nothing to gain)
    "tiny-512": dict(
        hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2
    ),
    "qwen2-1.5b-head": dict(QWEN2_15B_HEAD, vocab_size=151936),
}
#: variant → (label, overrides, batch in samples or packed rows). The precomputed variants share one cache (it is
#: keyed by the samples): the padded run's pass fills it, before its timed steps; the packed run finds it.
PRECOMPUTED = dict(stage="minorsft", precompute_ref_logps=True)
VARIANTS = {
    "sft_padded": ("stock sft, padded", dict(stage="sft"), "padded"),
    "sft_packed": ("stock sft, neat_packing", dict(stage="sft", neat_packing=True), "packed"),
    "minorsft_padded": ("minorsft online, padded", dict(stage="minorsft"), "padded"),
    "minorsft_packed": ("minorsft online, neat_packing", dict(stage="minorsft", neat_packing=True), "packed"),
    "minorsft_precomputed_padded": ("minorsft precomputed, padded", PRECOMPUTED, "padded"),
    "minorsft_precomputed_packed": (
        "minorsft precomputed, neat_packing",
        dict(PRECOMPUTED, neat_packing=True),
        "packed",
    ),
}
#: variant → [(baseline, least ratio of answer tokens per second)]
TARGETS = {
    "minorsft_packed": [("sft_packed", 0.75)],
    "minorsft_precomputed_packed": [("sft_packed", 0.90), ("minorsft_precomputed_padded", 1.5)],
}


def draw(deciles: tuple[int, ...], rng: random.Random) -> int:
    """A length from the distribution whose deciles are ``deciles`` (linear between them)."""
    u = rng.random() * 10
    low = int(u)
    return round(deciles[low] + (u - low) * (deciles[low + 1] - deciles[low]))


def make_data(data_dir: str, tokenizer_dir: str, num_samples: int, seed: int = 0) -> dict[str, int]:
    """Write the `alpaca_like` data set; returns its answer-length statistics in tokens."""
    from transformers import AutoTokenizer

    from llamafactory_minorsft.tools.tiny import make_instruction_data, write_dataset

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    pool = " ".join(
        sample["output"] + " " + sample["instruction"] for sample in make_instruction_data(512, seed)
    ).split()
    rng = random.Random(seed)

    def text(words: int) -> tuple[str, int]:
        target = max(1, round(words * TOKENS_PER_WORD))
        picked = []
        while len(tokenizer(" ".join(picked), add_special_tokens=False)["input_ids"]) < target:
            picked += rng.sample(pool, k=max(1, (target - len(picked)) // 2))
        ids = tokenizer(" ".join(picked), add_special_tokens=False)["input_ids"][:target]
        return tokenizer.decode(ids), target

    samples, lengths = [], []
    for _ in range(num_samples):
        prompt, _ = text(draw(PROMPT_WORDS, rng))
        answer, tokens = text(draw(ANSWER_WORDS, rng))
        samples.append({"instruction": prompt, "input": "", "output": answer})
        lengths.append(tokens)
    write_dataset(data_dir, "alpaca_like", samples)
    lengths.sort()
    return {"min": lengths[0], "median": lengths[len(lengths) // 2], "max": lengths[-1]}


def worker(config_path: str, result_path: str) -> None:
    """One training; per step its wall time and token counts, and the peak RSS."""
    import torch
    from llamafactory.train.tuner import run_exp
    from transformers import Trainer, TrainerCallback

    counts = []
    training_step = Trainer.training_step

    def counted(self, model, inputs, *args, **kwargs):  # the batch as the model sees it
        labels = inputs["labels"]
        mask = inputs.get("attention_mask")
        if "sample_ids" in inputs:
            real = int((inputs["sample_ids"] > 0).sum())
        elif mask is not None and mask.dim() == 4:  # block-diagonal: a real token attends to itself
            real = int((mask.diagonal(dim1=-2, dim2=-1) == 0).sum())
        elif mask is not None:
            real = int((mask != 0).sum())
        else:
            real = labels.numel()
        counts.append({"answer": int((labels[:, 1:] != -100).sum()), "real": real, "total": labels.numel()})
        return training_step(self, model, inputs, *args, **kwargs)

    Trainer.training_step = counted

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    memory, timer = PeakMemory(torch.cuda.is_available()), StepTimer()
    run_exp(config, callbacks=[timer])
    memory.take()
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump({"step_times": timer.times, "counts": counts, "peak_rss_mb": memory.overall}, f)


def run_variant(name: str, config: dict, workdir: str) -> dict:
    config_path, result_path = (os.path.join(workdir, f"{name}.{ext}") for ext in ("json", "result.json"))
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    print(f"[bench] {name} ...", flush=True)
    with open(os.path.join(workdir, f"{name}.log"), "w", encoding="utf-8") as log:
        subprocess.run(
            [sys.executable, __file__, "--worker", config_path, result_path],
            stdout=log,
            stderr=subprocess.STDOUT,
            check=True,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        )
    with open(result_path, encoding="utf-8") as f:
        result = json.load(f)
    shutil.rmtree(config["output_dir"], ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "RESULT"), help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=list(MODELS), default="tiny")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out")
    parser.add_argument("--padded-batch", type=int, default=8, help="samples per padded batch")
    parser.add_argument("--packed-batch", type=int, default=1, help="packed rows per batch")
    parser.add_argument("--output", default=os.path.join(HERE, "PACKING.md"))
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)

    from llamafactory_minorsft.tools.tiny import build_tiny_setup

    workdir = tempfile.mkdtemp(prefix="minorsft_bench_packing_")
    size = MODELS[args.model]
    paths = build_tiny_setup(os.path.join(workdir, "tiny"), seed=0, num_samples=64, **size)
    lengths = make_data(paths["data"], paths["model"], num_samples=args.steps * max(args.padded_batch, 16))
    base = dict(
        model_name_or_path=paths["model"],
        do_train=True,
        finetuning_type="full",
        dataset="alpaca_like",
        dataset_dir=paths["data"],
        template="qwen",
        cutoff_len=CUTOFF,
        overwrite_cache=True,
        dataloader_num_workers=0,
        overwrite_output_dir=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        learning_rate=1e-4,
        max_steps=args.steps,
        pref_beta=0.04,
        seed=42,
    )
    runs = {}
    for name, (_, overrides, kind) in VARIANTS.items():
        batch = args.padded_batch if kind == "padded" else args.packed_batch
        config = {**base, **overrides, "per_device_train_batch_size": batch}
        config["ref_logps_cache_dir"] = os.path.join(workdir, "cache")
        runs[name] = run_variant(name, {**config, "output_dir": os.path.join(workdir, "out", name)}, workdir)

    def rate(name: str) -> float:
        counts, times = runs[name]["counts"][args.warmup :], runs[name]["step_times"][args.warmup :]
        return sum(c["answer"] for c in counts) / sum(times)

    def padding(name: str) -> float:
        counts = runs[name]["counts"]
        return 1 - sum(c["real"] for c in counts) / sum(c["total"] for c in counts)

    model = {key: value for key, value in size.items() if key != "tie_word_embeddings"}
    lines = [
        f"## {args.model}",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_packing.py --model {args.model} --steps {args.steps} "
        f"--warmup {args.warmup} --padded-batch {args.padded_batch} --packed-batch {args.packed_batch}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}; date "
        f"{time.strftime('%Y-%m-%d')}. Model: Qwen2 architecture {model}"
        + (", tied head" if size.get("tie_word_embeddings") else "")
        + f", fp32, full fine-tuning; cutoff {CUTOFF}; answers {lengths['min']}–{lengths['max']} tokens (median "
        f"{lengths['median']}); padded batches of {args.padded_batch} samples, packed batches of {args.packed_batch} "
        f"row(s); steps {args.warmup + 1}-{args.steps} timed.",
        "",
        "| variant | answer tokens/s | vs stock sft packed | vs same stage padded | target | peak RSS (MB) | padding |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (label, _, kind) in VARIANTS.items():
        padded = name.replace("_packed", "_padded")
        verdict = "; ".join(
            f"≥ {least:.2f}x {VARIANTS[baseline][0]}: {'met' if rate(name) / rate(baseline) >= least else '**missed**'}"
            for baseline, least in TARGETS.get(name, [])
        )
        lines.append(
            f"| {label} | {rate(name):.0f} | {rate(name) / rate('sft_packed'):.2f}x | "
            + (f"{rate(name) / rate(padded):.2f}x" if kind == "packed" else "")
            + f" | {verdict} | {runs[name]['peak_rss_mb']:.0f} | {padding(name):.0%} |"
        )
    text = "\n".join(lines) + "\n"
    if not os.path.exists(args.output):
        with open(args.output, "w", encoding="utf-8") as f:
            f.write("# Packed against padded batches\n\nWritten by `benchmarks/bench_packing.py`.\n")
    write_section(args.output, text, args.model)
    for name in ("tiny", "cache"):
        shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
    print(text)
    print(f"[bench] written to {args.output} (section {args.model}); work files in {workdir}")


if __name__ == "__main__":
    main()
