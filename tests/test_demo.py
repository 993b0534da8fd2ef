"""The README's demo command end to end (minus the set-up): three tiny trainings and a comparison table."""

import subprocess
import sys
from pathlib import Path

from conftest import cli_env


ROOT = Path(__file__).resolve().parents[1]


def test_demo_prints_the_table_and_writes_the_plots(tmp_path):
    out = tmp_path / "demo_output"
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "llamafactory-minorsft"),
            "demo",
            "--output-dir",
            str(out),
            "--examples-dir",
            str(ROOT / "examples_yaml" / "tiny"),
        ],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for label in ("SFT (track_deviation)", "MinorSFT", "SFT using DPO"):
        row = next(line for line in proc.stdout.splitlines() if line.startswith(f"| {label} "))
        loss, deviation = (float(cell) for cell in row.split("|")[2:4])
        assert loss > 0 and deviation > 0  # training moved every policy away from its reference
    for stage in ("sft", "minorsft", "sft_dpo"):
        assert (out / f"qwen2_{stage}_tiny" / "training_deviation.png").stat().st_size > 0
    assert (out / "deviation_comparison.png").stat().st_size > 0
