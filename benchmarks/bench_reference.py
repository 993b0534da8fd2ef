"""Overhead of the reference model: step time and peak memory of each variant, as ratios against plain SFT.

Every variant trains the same model on the same data in its own process, through LLaMA-Factory's
``run_exp`` (the code path of ``llamafactory-cli train``). A callback records the wall time of each
optimizer step; the first ``--warmup`` steps are dropped. Process-to-process noise on a shared CPU is
about ±10 %, so every variant runs ``--repeats`` times, the rounds in alternating order, and the median
is taken over the steps of all its runs. Peak memory is the process's peak resident set size
(``ru_maxrss``), the largest over the runs.

    .venv/bin/python benchmarks/bench_reference.py              # writes benchmarks/RESULTS.md

With ``--vocab-size`` (e.g. Qwen2's 151936) it measures one real-vocabulary table instead, a ``--suite`` of
``SUITES``: `stages` (every stage against stock SFT, an untied head on a hidden-256 decoder, samples of exactly
``--seq-len`` tokens), `head-short` and `head-long` (Qwen2-1.5B's tied head and layers, 2 of them, at 1 x 256 and
2 x 1,024 tokens), `zero3` (DeepSpeed ZeRO-3 over 2 processes). ``--precision bf16`` saves the model in bf16 and
trains with `bf16: true`, as GPU users do (on the CPU with `use_cpu: true`: accelerate's autocast); ``--deepspeed z2``
runs every variant under DeepSpeed ZeRO-2 (torchrun, one process). Each table replaces its own section of RESULTS.md
after ``REAL_VOCAB_MARK``; the others stay.

    .venv/bin/python benchmarks/bench_reference.py --suite head-long --vocab-size 151936 --precision bf16 ...
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional


HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_SIZE = dict(
    hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4
)
#: the decoder of the real-vocabulary table: the output head dominates, as in Qwen2-0.5B and 1.5B
REAL_VOCAB_SIZE = dict(
    hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
REAL_VOCAB_MARK = "<!-- real-vocabulary tables: bench_reference.py --vocab-size, one section per suite -->"
SECTION_MARK = "<!-- section: "


class PeakMemory:
    """The process's peak memory since the last ``take``; ``overall``: the peak of the whole run.

    The resident set size (Linux's VmHWM, reset through /proc/self/clear_refs) or, on a GPU, CUDA's allocated peak.
    """

    def __init__(self, cuda: bool):
        self.cuda, self.overall = cuda, 0.0

    def take(self) -> float:
        if self.cuda:
            import torch

            peak = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/status", encoding="utf-8") as f:
                peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024  # kB
            with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
                f.write("5")  # resets VmHWM to the current resident set size
        self.overall = max(self.overall, peak)
        return peak


def worker(config_path: str, result_path: str) -> None:
    """Run one training in this process and write its step times and peak memory (also per phase of each step)."""
    import torch
    from llamafactory.train.tuner import run_exp
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None
            self.memory = PeakMemory(torch.cuda.is_available())
            self.phases = []  # per step: peaks (MB) of forward + the head's backward, the rest of backward, the optimizer
            self.phase, self.hooked = [None], False

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self.memory.take()  # loading, the precompute pass, the previous step's end
            if not self.hooked and model is not None:  # the head's backward is done: its input has its gradient
                from llamafactory_minorsft.train.head import causal_lm

                causal_lm(model).lm_head.register_full_backward_hook(self.head_done)
                self.hooked = True
            self.phase = [None]
            self.start = time.perf_counter()

        def head_done(self, *args):
            self.phase[0] = self.memory.take()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.phase.append(self.memory.take())

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.phases.append([*self.phase, self.memory.take()])

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # kernels run asynchronously: the step ends when they do
            self.times.append(time.perf_counter() - self.start)

    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)

    timer = StepTimer()
    run_exp(config, callbacks=[timer])
    results = {}
    if int(os.environ.get("RANK", "0")) == 0:  # rank 0 writes it
        with open(os.path.join(config["output_dir"], "all_results.json"), encoding="utf-8") as f:
            results = json.load(f)

    timer.memory.take()
    peak = {"phases": timer.phases}
    if torch.cuda.is_available():
        peak["peak_cuda_mb"] = timer.memory.overall
    else:
        peak["peak_rss_mb"] = timer.memory.overall
    if "LOCAL_RANK" in os.environ:  # under torchrun: one result per process
        result_path += f".{os.environ['RANK']}"
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump({"step_times": timer.times, **peak, "results": results}, f)


def make_data(data_dir: str, num_samples: int, pieces_per_answer: int = 6) -> None:
    """Answers of ``pieces_per_answer`` generated answers joined (6: about 150 tokens), so a step does real work."""
    from llamafactory_minorsft.tools.tiny import make_instruction_data, write_dataset

    n = pieces_per_answer
    pieces = make_instruction_data(num_samples * n, seed=5)
    samples = [
        {
            "instruction": pieces[n * i]["instruction"],
            "input": "",
            "output": " ".join(p["output"] for p in pieces[n * i : n * i + n]),
        }
        for i in range(num_samples)
    ]
    write_dataset(data_dir, "bench", samples)


def train_config(paths: dict, args, **overrides) -> dict:
    """The training config every variant shares; ``overrides`` add to or replace its keys."""
    config = dict(
        model_name_or_path=paths["model"],
        do_train=True,
        finetuning_type="full",
        dataset="bench",
        dataset_dir=paths["data"],
        template="qwen",
        cutoff_len=256,
        overwrite_cache=True,
        dataloader_num_workers=0,
        overwrite_output_dir=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=1e-4,
        max_steps=args.steps,
        pref_beta=0.04,
        seed=42,
    )
    return {**config, **overrides}


def run_variant(name: str, config: dict, workdir: str, device: str = "cpu", nproc: int = 0) -> dict:
    """Train ``config`` in a process of its own (``nproc`` > 0: that many, under torchrun); its step times and peak.

    Under torchrun every process writes its own result: the step times are rank 0's, the peak the largest.
    """
    config_path = os.path.join(workdir, f"{name}.json")
    result_path = os.path.join(workdir, f"{name}.result.json")
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    print(f"[bench] {name} ...", flush=True)
    command = [sys.executable, __file__, "--worker", config_path, result_path]
    if nproc:
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        command = [torchrun, f"--nproc_per_node={nproc}", f"--master_port={free_port()}", *command[1:]]
    with open(os.path.join(workdir, f"{name}.log"), "w", encoding="utf-8") as log:
        subprocess.run(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            check=True,
            env={**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {})},
        )
    results = []
    for rank in range(max(1, nproc)):
        with open(result_path + (f".{rank}" if nproc else ""), encoding="utf-8") as f:
            results.append(json.load(f))
    merged = dict(results[0])
    for key in ("peak_rss_mb", "peak_cuda_mb"):
        if key in merged:
            merged[key] = max(result[key] for result in results)
    shutil.rmtree(config["output_dir"], ignore_errors=True)  # the trained model: gigabytes at a real vocabulary
    return merged


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "RESULT"), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=14, help="optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant, in alternating order")
    parser.add_argument("--output", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--vocab-size", type=int, help="the real-vocabulary table, with an output head of this size")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sample of the `stages` suite")
    parser.add_argument("--suite", choices=list(SUITES), default="stages", help="the real-vocabulary table to measure")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: a bf16 checkpoint + bf16")
    parser.add_argument("--deepspeed", choices=list(DEEPSPEED_CONFIGS), help="run every variant under this ZeRO stage")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="cuda: bf16 on the GPU, peak = max_memory_allocated"
    )
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is visible")
    if args.vocab_size:
        return vocabulary_table(args)

    from llamafactory_minorsft.tools.tiny import build_tiny_setup

    workdir = tempfile.mkdtemp(prefix="minorsft_bench_")
    paths = build_tiny_setup(os.path.join(workdir, "tiny"), seed=0, num_samples=64, **MODEL_SIZE)
    num_samples = args.steps * args.batch_size
    make_data(paths["data"], num_samples)
    base = train_config(paths, args)
    lora = dict(finetuning_type="lora", lora_target="all", lora_rank=8)
    variants = {
        "sft": dict(stage="sft"),
        "sft_lora": dict(stage="sft", **lora),
        "minorsft_online_full": dict(stage="minorsft"),
        "minorsft_online_lora": dict(stage="minorsft", **lora),
        "minorsft_precompute_pass": dict(stage="minorsft", precompute_ref_logps=True),  # cache miss: the pass runs
        "minorsft_precomputed_full": dict(stage="minorsft", precompute_ref_logps=True),  # cache hit: no reference
    }
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
        order.remove("minorsft_precomputed_full")  # always right after the pass that fills this round's cache
        order.insert(order.index("minorsft_precompute_pass") + 1, "minorsft_precomputed_full")
        for name in order:
            config = {
                **base,
                **variants[name],
                "output_dir": os.path.join(workdir, "out", name),
                "ref_logps_cache_dir": os.path.join(workdir, f"cache{repeat}"),
            }
            runs[name].append(run_variant(f"{name}.{repeat}", config, workdir))

    median = {
        name: statistics.median(t for r in rs for t in r["step_times"][args.warmup :]) for name, rs in runs.items()
    }
    peak = {name: max(r["peak_rss_mb"] for r in rs) for name, rs in runs.items()}
    pass_seconds = statistics.median(
        r["results"]["ref_precompute_train_runtime"] for r in runs["minorsft_precompute_pass"]
    )
    assert all("ref_precompute_train_runtime" not in r["results"] for r in runs["minorsft_precomputed_full"]), (
        "no cache hit"
    )
    sft_epoch = median["sft"] * num_samples / args.batch_size
    weights_mb = os.path.getsize(os.path.join(paths["model"], "model.safetensors")) / 2**20

    def row(label, name, time_target, mem_target, baseline="sft"):
        t, m = median[name] / median[baseline], peak[name] / peak[baseline]
        ok = (time_target is None or t <= time_target) and peak[name] <= mem_target(peak[baseline])
        return (
            f"| {label} | {median[name]:.3f} | {t:.2f}x | {peak[name]:.0f} | {m:.2f}x "
            f"| {'met' if ok else '**missed**'} |"
        )

    lines = [
        "# Reference-model overhead benchmark",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_reference.py --steps {args.steps} --warmup {args.warmup} "
        f"--batch-size {args.batch_size} --repeats {args.repeats}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}, Python "
        f"{platform.python_version()}; date {time.strftime('%Y-%m-%d')}.",
        f"Model: Qwen2 architecture {MODEL_SIZE}, {weights_mb:.0f} MB of fp32 weights; batch {args.batch_size}, "
        f"answers of about 150 tokens, {args.steps} steps per run, {args.repeats} runs per variant "
        f"(alternating order); median of steps {args.warmup + 1}-{args.steps} of all runs.",
        "Each run is its own process; peak memory is the largest peak RSS of a variant's runs (imports included). "
        "Run-to-run noise of the step time on this shared 2-core machine is about ±10 %.",
        "",
        "| variant | median step (s) | step vs SFT | peak RSS (MB) | memory vs SFT | target |",
        "|---|---|---|---|---|---|",
        row("plain SFT (full)", "sft", None, lambda b: b),
        row("MinorSFT, online reference (full)", "minorsft_online_full", 1.40, lambda b: b + weights_mb),
        row("MinorSFT, online reference (LoRA)", "minorsft_online_lora", 1.40, lambda b: 1.10 * b),
        row(
            "MinorSFT, precomputed reference (full, cache hit)", "minorsft_precomputed_full", 1.05, lambda b: 1.05 * b
        ),
        "",
        "Targets: online full ≤ 1.40x step time and ≤ SFT + one copy of the weights "
        f"(+{weights_mb:.0f} MB); online LoRA ≤ 1.40x and ≤ 1.10x; precomputed ≤ 1.05x and ≤ 1.05x.",
        "",
        "LoRA against a LoRA baseline (same adapters, plain SFT loss):",
        "",
        "| variant | median step (s) | step vs SFT (LoRA) | peak RSS (MB) | memory vs SFT (LoRA) | target |",
        "|---|---|---|---|---|---|",
        row("plain SFT (LoRA)", "sft_lora", None, lambda b: b, baseline="sft_lora"),
        row(
            "MinorSFT, online reference (LoRA)", "minorsft_online_lora", 1.40, lambda b: 1.10 * b, baseline="sft_lora"
        ),
        "",
        f"Precompute pass (one no-grad reference pass over the {num_samples} training samples, median of runs): "
        f"{pass_seconds:.2f} s, "
        f"{pass_seconds / sft_epoch:.2f} of an SFT epoch ({sft_epoch:.1f} s = {num_samples // args.batch_size} steps x "
        f"{median['sft']:.3f} s); target ≤ 0.5: {'met' if pass_seconds <= 0.5 * sft_epoch else '**missed**'}.",
        f"Its process peaked at {peak['minorsft_precompute_pass']:.0f} MB (policy and reference both loaded during "
        "the pass); the cache-hit run above never loads the reference.",
        "",
    ]
    over = peak["minorsft_online_full"] - (peak["sft"] + weights_mb)
    if over > 0:
        lines += [
            f"Online reference (full) is {over:.0f} MB over its memory target of SFT + one copy of the weights: "
            "the reference's own no-grad forward (activations and logits of one batch) comes on top of its weights. "
            "The target is a floor, not a budget with headroom; use `precompute_ref_logps` where memory is tight.",
            "",
        ]
    write_section(args.output, "\n".join(lines), None)
    print("\n".join(lines))
    print(f"[bench] written to {args.output}; work files in {workdir}")


def write_section(path: str, text: str, key: Optional[str]) -> None:
    """Replace one table of ``path``, keeping the others.

    ``key`` None: the small-vocabulary table, before ``REAL_VOCAB_MARK``; else the real-vocabulary section ``key``,
    after its own marker (added at the end if new).
    """
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    small, mark, tail = old.partition(REAL_VOCAB_MARK)
    sections = {}  # key → text, in file order
    for part in tail.split(SECTION_MARK)[1:]:
        section_key, _, body = part.partition(" -->")
        sections[section_key] = body.strip("\n")
    if key is None:
        small = text
    else:
        sections[key] = text.strip("\n")
    new = small.rstrip("\n") + "\n\n" + REAL_VOCAB_MARK + "\n"
    for section_key, body in sections.items():
        new += f"\n{SECTION_MARK}{section_key} -->\n\n{body}\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)


#: Qwen2-1.5B's decoder layer and head (config.json), 2 layers: the head's fixed costs at a realistic hidden size
QWEN2_15B_HEAD = dict(
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=2,
    num_attention_heads=12,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)
#: suite → (model size, micro-batch size, tokens per sample, processes, variants with their targets). Targets are
#: ratios against stock sft in the same run: (step time, peak memory), None where only measured.
SUITES = {
    # issue 14's table: every stage, hidden 256, an untied head
    "stages": (dict(REAL_VOCAB_SIZE, tie_word_embeddings=False), 2, 1024, 1, "stages"),
    # issue 19: Qwen2-1.5B's head, a short and a long micro-batch, and ZeRO-3 over 2 processes at hidden 256
    "head-short": (QWEN2_15B_HEAD, 1, 256, 1, {"minorsft_online": (None, 1.05), "minorsft_precomputed": (None, 0.90)}),
    "head-long": (QWEN2_15B_HEAD, 2, 1024, 1, {"minorsft_online": (1.30, 0.85), "minorsft_precomputed": (1.05, 0.80)}),
    "zero3": (
        dict(REAL_VOCAB_SIZE, tie_word_embeddings=False),
        1,
        1024,
        2,
        {"minorsft_online": (1.30, 0.75), "minorsft_precomputed": (1.05, 0.70)},
    ),
}
DEEPSPEED_CONFIGS = {
    "z2": os.path.join(HERE, "..", "examples_yaml", "deepspeed", "ds_z2_config.json"),
    "z3": os.path.join(HERE, "..", "examples_yaml", "deepspeed", "ds_z3_config.json"),
}


def stage_variants(paths: dict) -> dict:
    """Every stage against stock sft (issue 14): name → (label, overrides, step-time target, memory target)."""
    rho1 = dict(stage="sft_go", sft_go_grouping="rho1", ref_model=paths["ref_model"], precompute_ref_logps=True)
    return {
        "sft": ("stock sft", dict(stage="sft"), None, None),
        "minorsft_online": ("minorsft, online reference", dict(stage="minorsft"), 1.30, 0.85),
        "minorsft_pass": (
            "minorsft, precompute pass (cache miss)",
            dict(stage="minorsft", precompute_ref_logps=True),
            None,
            None,
        ),
        "minorsft_precomputed": (
            "minorsft, precomputed (cache hit)",
            dict(stage="minorsft", precompute_ref_logps=True),
            1.05,
            0.80,
        ),
        "sft_dpo_online": ("sft_dpo, online reference", dict(stage="sft_dpo"), 1.30, 0.85),
        "sft_track": ("sft + track_deviation", dict(stage="sft", track_deviation=True), 1.30, None),
        "sft_go_tfidf": ("sft_go, tfidf", dict(stage="sft_go"), 1.10, None),
        "sft_go_rho1_pass": ("sft_go, rho1, precompute pass (cache miss)", rho1, None, None),
        "sft_go_rho1_precomputed": ("sft_go, rho1, precomputed (cache hit)", rho1, None, None),
    }


def head_variants(targets: dict) -> dict:
    """Minorsft's reference modes against stock sft: name → (label, overrides, step-time target, memory target)."""
    return {
        "sft": ("stock sft", dict(stage="sft"), None, None),
        "minorsft_online": ("minorsft, online reference", dict(stage="minorsft"), *targets["minorsft_online"]),
        "minorsft_pass": (
            "minorsft, precompute pass (cache miss)",
            dict(stage="minorsft", precompute_ref_logps=True),
            None,
            None,
        ),
        "minorsft_precomputed": (
            "minorsft, precomputed (cache hit)",
            dict(stage="minorsft", precompute_ref_logps=True),
            *targets["minorsft_precomputed"],
        ),
    }


def vocabulary_table(args) -> None:
    """One suite of ``SUITES`` at a real vocabulary size (see the module docstring)."""
    from llamafactory_minorsft.tools.tiny import build_tiny_setup

    size, batch_size, seq_len, nproc, targets = SUITES[args.suite]
    if args.suite == "stages":
        batch_size, seq_len = args.batch_size, args.seq_len
    precision = "bf16" if args.device == "cuda" else args.precision
    workdir = tempfile.mkdtemp(prefix="minorsft_bench_vocab_")
    dtype = "bfloat16" if precision == "bf16" else "float32"
    size = dict(size, vocab_size=args.vocab_size)
    paths = build_tiny_setup(os.path.join(workdir, "tiny"), seed=0, num_samples=64, dtype=dtype, **size)
    num_samples = args.steps * batch_size * nproc
    # answers longer than the cutoff: every sample is exactly `seq_len` tokens, most of them answer tokens
    make_data(paths["data"], num_samples, pieces_per_answer=max(6, seq_len // 10))
    extra = {"bf16": True} if precision == "bf16" else {}
    if precision == "bf16" and args.device == "cpu":
        extra["use_cpu"] = True  # accelerate's autocast on the CPU, as on a GPU
    if args.deepspeed:
        extra["deepspeed"] = os.path.abspath(DEEPSPEED_CONFIGS[args.deepspeed])
    if args.suite == "zero3":
        extra["deepspeed"] = os.path.abspath(DEEPSPEED_CONFIGS["z3"])
    base = train_config(
        paths,
        args,
        cutoff_len=seq_len,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        **extra,
    )
    variants = stage_variants(paths) if targets == "stages" else head_variants(targets)
    launcher = nproc if "deepspeed" in extra else 0  # DeepSpeed runs under torchrun, even on one process
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
        for hit, miss in (("minorsft_precomputed", "minorsft_pass"), ("sft_go_rho1_precomputed", "sft_go_rho1_pass")):
            if hit in order:
                order.remove(hit)  # always right after the pass that fills this round's cache
                order.insert(order.index(miss) + 1, hit)
        for name in order:
            config = {**base, **variants[name][1], "output_dir": os.path.join(workdir, "out", name)}
            config["ref_logps_cache_dir"] = os.path.join(workdir, f"cache{repeat}")
            runs[name].append(run_variant(f"{name}.{repeat}", config, workdir, args.device, launcher))

    for hit in ("minorsft_precomputed", "sft_go_rho1_precomputed"):
        if hit in runs:
            assert all("ref_precompute_train_runtime" not in r["results"] for r in runs[hit]), f"{hit}: no cache hit"
    median = {
        name: statistics.median(t for r in rs for t in r["step_times"][args.warmup :]) for name, rs in runs.items()
    }
    memory = "peak_cuda_mb" if args.device == "cuda" else "peak_rss_mb"
    peak = {name: max(r[memory] for r in rs) for name, rs in runs.items()}
    # where each step's peak is (after the warm-up steps): forward + the head's backward, the rest of backward (the
    # decoder and the embedding, whatever computes the loss), the optimizer step
    phase = {
        name: [max((step[i] or 0) for r in rs for step in r["phases"][args.warmup :]) for i in range(3)]
        for name, rs in runs.items()
    }
    memory_label = "peak CUDA allocated (MB)" if args.device == "cuda" else "peak RSS (MB)"
    if nproc > 1:
        memory_label += ", per process"
    if args.device == "cuda":
        import torch

        where = f"GPU: {torch.cuda.get_device_name()}"
    else:
        where = f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}"
    setup = precision + (f" + DeepSpeed {args.deepspeed.upper()}" if args.deepspeed else "")
    if args.suite == "zero3":
        setup += f" + DeepSpeed ZeRO-3, {nproc} processes"
    command = (
        f"`.venv/bin/python benchmarks/bench_reference.py --suite {args.suite} --vocab-size {args.vocab_size} "
        + (f"--seq-len {seq_len} --batch-size {batch_size} " if args.suite == "stages" else "")
        + f"--precision {precision} "
        + (f"--deepspeed {args.deepspeed} " if args.deepspeed else "")
        + f"--steps {args.steps} --warmup {args.warmup} --repeats {args.repeats} --device {args.device}`"
    )
    head = "tied" if size.get("tie_word_embeddings") else "untied"
    model = {key: value for key, value in size.items() if key not in ("vocab_size", "tie_word_embeddings")}
    lines = [
        f"## {SUITE_TITLES[args.suite]}: {setup}" + (" (GPU)" if args.device == "cuda" else ""),
        "",
        f"Command: {command}",
        "",
        f"{where}; date {time.strftime('%Y-%m-%d')}. Model: Qwen2 architecture {model}, vocabulary "
        f"{args.vocab_size}, {head} output head, saved in {dtype}; full fine-tuning, {nproc} process(es) x batch "
        f"{batch_size} x {seq_len} tokens, {args.steps} steps per run, {args.repeats} run(s) per variant; median of "
        f"steps {args.warmup + 1}-{args.steps}.",
        "",
        f"| variant | median step (s) | step vs SFT | target | {memory_label} | memory vs SFT | target | verdict "
        "| peak: forward + head backward | rest of backward | optimizer step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (label, _, time_target, memory_target) in variants.items():
        t, m = median[name] / median["sft"], peak[name] / peak["sft"]
        ok = (time_target is None or t <= time_target) and (memory_target is None or m <= memory_target)
        measured_only = time_target is None and memory_target is None
        verdict = "baseline" if name == "sft" else "measured" if measured_only else "met" if ok else "**missed**"
        lines.append(
            f"| {label} | {median[name]:.2f} | {t:.2f}x | {'' if time_target is None else f'≤ {time_target:.2f}x'} "
            f"| {peak[name]:.0f} | {m:.2f}x | {'' if memory_target is None else f'≤ {memory_target:.2f}x'} "
            f"| {verdict} | {phase[name][0]:.0f} | {phase[name][1]:.0f} | {phase[name][2]:.0f} |"
        )
    lines += [
        "",
        "The last three columns split each step's peak (the largest over the steps after the warm-up): the forward and "
        "the output head's backward (where the stages differ from stock sft), the rest of the backward (the decoder "
        "and the embedding, the same code for every variant), and the optimizer step (AdamW). The run's peak is the "
        "largest of them, or the loading.",
    ]
    text = "\n".join(lines) + "\n"
    for name in ("tiny", *(f"cache{repeat}" for repeat in range(args.repeats))):  # keep the logs only
        shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
    key = f"{args.suite}-{precision}-{args.deepspeed or 'none'}-{args.device}"
    write_section(args.output, text, key)
    print(text)
    print(f"[bench] written to {args.output} (section {key}); work files in {workdir}")


SUITE_TITLES = {
    "stages": "Every stage at a real vocabulary size",
    "head-short": "Qwen2-1.5B's head, a short micro-batch (1 x 256 tokens)",
    "head-long": "Qwen2-1.5B's head, a long micro-batch (2 x 1,024 tokens)",
    "zero3": "ZeRO-3, 2 processes x 1,024 tokens, vocabulary 151,936",
}


if __name__ == "__main__":
    main()
