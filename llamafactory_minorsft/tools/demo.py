"""The CPU demo: SFT (+ deviation tracking), MinorSFT and SFT using DPO on the offline tiny model.

Each run goes through the stock ``llamafactory-cli train`` with an ``examples_yaml/tiny`` config; the demo
prints the final loss and deviation of each and draws the three deviation curves on one chart (Fig. 1).
"""

import os
import shutil
import sys

from .runs import final_value, log_history, train


RUNS = (("sft", "SFT (track_deviation)"), ("minorsft", "MinorSFT"), ("sft_dpo", "SFT using DPO"))


def run_demo(output_dir: str = "demo_output", examples_dir: str = "examples_yaml/tiny") -> int:
    from .figures import plot_deviation_curves
    from .tiny import build_tiny_setup

    configs = {stage: os.path.join(examples_dir, f"qwen2_{stage}_tiny.yaml") for stage, _ in RUNS}
    missing = [path for path in configs.values() if not os.path.isfile(path)]
    if missing:  # before anything is built
        raise ValueError(
            f"demo --examples-dir {examples_dir}: {', '.join(map(os.path.basename, missing))} not found there. Run the "
            "demo from the repository root, or point --examples-dir at its examples_yaml/tiny."
        )

    tiny_dir = os.path.join(output_dir, "tiny")
    if not os.path.exists(os.path.join(tiny_dir, "model", "config.json")):
        shutil.rmtree(tiny_dir, ignore_errors=True)
        try:
            build_tiny_setup(tiny_dir, seed=0, num_samples=256)
        except OSError as err:
            raise ValueError(f"demo --output-dir {output_dir}: cannot write there: {err}") from None

    rows = []
    for stage, label in RUNS:
        run_dir = os.path.join(output_dir, f"qwen2_{stage}_tiny")
        overrides = [
            f"model_name_or_path={tiny_dir}/model",
            f"dataset_dir={tiny_dir}/data",
            f"output_dir={run_dir}",
        ]
        config = configs[stage]
        print(f"[demo] training {label}: llamafactory-cli train {config} {' '.join(overrides)}", flush=True)
        log_path = os.path.join(output_dir, f"{stage}.log")
        returncode = train(config, log_path, tuple(overrides))
        if returncode != 0:
            print(f"[demo] {label} failed; see {log_path}", file=sys.stderr)
            return returncode

        history = log_history(run_dir)
        plots = ", ".join(os.path.join(run_dir, f"training_{key}.png") for key in ("loss", "deviation"))
        rows.append((label, final_value(history, "loss"), final_value(history, "deviation"), plots))

    run_dirs = {label: os.path.join(output_dir, f"qwen2_{stage}_tiny") for stage, label in RUNS}
    comparison = plot_deviation_curves(run_dirs, os.path.join(output_dir, "deviation_comparison.png"))
    print()
    print(f"| {'method':<22} | {'final loss':>10} | {'final deviation':>15} | plots")
    print(f"|{'-' * 24}|{'-' * 12}|{'-' * 17}|------")
    for label, loss, deviation, plots in rows:
        print(f"| {label:<22} | {loss:>10.4f} | {deviation:>15.4f} | {plots}")
    print(f"\nAll three deviation curves: {comparison}")
    return 0
