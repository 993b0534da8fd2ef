"""How often a finished 2-process CPU run aborts at exit: stock ``sft`` against this package's ``sft_dpo``.

torch 2.11's Gloo backend can abort a process at interpreter shutdown ("terminate called without an active
exception", pytorch/pytorch#190489; see ``llamafactory_minorsft/train/teardown.py``). The stock stages only destroy
the process group; this package's stages also wait for the Gloo workers to go idle. Both stages run the same
ZeRO-3 LoRA training (3 steps, tiny Qwen2) through ``FORCE_TORCHRUN=1 NPROC_PER_NODE=2 llamafactory-cli train``,
``--parallel`` runs at a time with the stages interleaved, so both see the same CPU load. The race needs that
load: on an idle machine it rarely shows.

    .venv/bin/python benchmarks/exit_race.py --runs 30 --parallel 2      # writes benchmarks/EXIT_RACE.md
"""

import argparse
import itertools
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import yaml

from llamafactory_minorsft.tools.tiny import build_tiny_setup


HERE = os.path.dirname(os.path.abspath(__file__))
ABORT = "terminate called without an active exception"


def config(paths: dict, stage: str, output_dir: str) -> dict:
    return dict(
        model_name_or_path=paths["model"],
        stage=stage,
        do_train=True,
        finetuning_type="lora",
        lora_target="all",
        pref_beta=0.5,
        precompute_ref_logps=stage != "sft" or None,
        ref_logps_cache_dir=f"{output_dir}_cache",
        dataset="minorsft_demo",
        dataset_dir=paths["data"],
        template="qwen",
        cutoff_len=128,
        overwrite_cache=True,
        dataloader_num_workers=0,
        output_dir=output_dir,
        overwrite_output_dir=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        max_steps=3,
        deepspeed=os.path.join(HERE, "..", "examples_yaml", "deepspeed", "ds_z3_config.json"),
        seed=42,
    )


def run_one(paths: dict, root: str, stage: str, index: int) -> tuple[str, int, bool]:
    """One 2-process training; returns (stage, exit code, whether the Gloo exit abort was printed)."""
    workdir = os.path.join(root, f"{stage}_{index}")
    os.makedirs(workdir)
    cfg = {k: v for k, v in config(paths, stage, os.path.join(workdir, "out")).items() if v is not None}
    with open(os.path.join(workdir, "config.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f)

    env = dict(
        os.environ,
        FORCE_TORCHRUN="1",
        NPROC_PER_NODE="2",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # torchrun must be on PATH
    proc = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "llamafactory-cli"), "train", "config.yaml"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
    )
    with open(os.path.join(workdir, "stderr.txt"), "w", encoding="utf-8") as f:
        f.write(proc.stderr)

    return stage, proc.returncode, ABORT in proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=16, help="runs per stage")
    parser.add_argument("--parallel", type=int, default=2, help="trainings at a time (each is 2 processes)")
    args = parser.parse_args()

    start = time.time()
    with tempfile.TemporaryDirectory() as root:
        paths = build_tiny_setup(os.path.join(root, "tiny"), seed=0, num_samples=64)
        jobs = list(itertools.chain.from_iterable((("sft", i), ("sft_dpo", i)) for i in range(args.runs)))
        with ThreadPoolExecutor(args.parallel) as pool:
            results = list(pool.map(lambda job: run_one(paths, root, *job), jobs))

    lines = [
        "# Gloo exit race: aborts at exit of finished 2-process CPU runs",
        "",
        f"Command: `.venv/bin/python benchmarks/exit_race.py --runs {args.runs} --parallel {args.parallel}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}; "
        f"date {time.strftime('%Y-%m-%d')}. {len(jobs)} runs, {args.parallel} at a time, {time.time() - start:.0f} s.",
        "Each run: tiny Qwen2, LoRA, DeepSpeed ZeRO-3, 2 processes (torchrun), 3 steps; `sft_dpo` with a precomputed reference.",
        "",
        "| stage | tear-down at the end | runs | aborted at exit | failed otherwise |",
        "|---|---|---|---|---|",
    ]
    for stage, how in (("sft", "stock: destroy_process_group"), ("sft_dpo", "barrier + wait for idle Gloo workers")):
        mine = [(code, abort) for name, code, abort in results if name == stage]
        aborted = sum(1 for code, abort in mine if code != 0 and abort)
        other = sum(1 for code, abort in mine if code != 0 and not abort)
        lines.append(f"| `{stage}` | {how} | {len(mine)} | {aborted} | {other} |")

    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(HERE, "EXIT_RACE.md"), "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
