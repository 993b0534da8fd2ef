"""Every example YAML goes through LLaMA-Factory's real parser and trains two steps; trained models export and chat."""

import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import CLI, cli_env, run_cli, step_logs


EXAMPLES = Path(__file__).resolve().parents[1] / "examples_yaml"
PAPER_CONFIGS = sorted(EXAMPLES.glob("qwen2_*.yaml"))
TINY_CONFIGS = sorted(EXAMPLES.glob("tiny/*.yaml"))


def test_paper_configs_mirror_the_paper_setup():
    names = ["qwen2_minorsft.yaml", "qwen2_sft.yaml", "qwen2_sft_dpo.yaml", "qwen2_sft_go.yaml"]
    assert [p.name for p in PAPER_CONFIGS] == names
    for path in PAPER_CONFIGS:
        config = yaml.safe_load(path.read_text())
        assert config["model_name_or_path"] == "Qwen/Qwen2-7B-Instruct" and config["template"] == "qwen"
        assert config["finetuning_type"] == "full" and config["bf16"] is True
        assert (EXAMPLES.parent / config["deepspeed"]).exists()
        assert '"stage": 3' in (EXAMPLES.parent / config["deepspeed"]).read_text()
        assert config["per_device_train_batch_size"] * config["gradient_accumulation_steps"] * 8 == 64  # 8 GPUs
        assert config["warmup_ratio"] == 0.1 and config["lr_scheduler_type"] == "linear"
        assert config["num_train_epochs"] == 1.0
        if config["stage"] == "sft":
            assert config["learning_rate"] == 1e-5 and config["track_deviation"] is True
        elif config["stage"] == "sft_go":  # SFT-GO reweights SFT: SFT's learning rate, β unused
            assert (
                config["learning_rate"] == 1e-5 and config["sft_go_grouping"] == "tfidf" and "ref_model" not in config
            )
        else:
            assert config["learning_rate"] == 2e-5 and config["pref_beta"] == 0.04


@pytest.mark.parametrize("path", PAPER_CONFIGS + TINY_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_parses_and_trains_two_steps(tiny, tmp_path, path):
    config = yaml.safe_load(path.read_text())
    config.pop("deepspeed", None)  # one CPU process here; ZeRO-3 runs in the distributed tests
    config.update(
        model_name_or_path=tiny.model,
        dataset="minorsft_demo",
        dataset_dir=tiny.data,
        output_dir=str(tmp_path / "out"),
        bf16=False,
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        save_strategy="no",
        preprocessing_num_workers=None,
        dataloader_num_workers=0,
        cutoff_len=128,
    )
    config = {key: value for key, value in config.items() if value is not None}
    run_cli(config, tmp_path)
    logs = step_logs(tmp_path / "out")
    # SFT-GO's example uses TF-IDF grouping, which needs no reference: its own metrics instead of the deviation
    metric = "group_loss/important" if config["stage"] == "sft_go" else "deviation"
    assert len(logs) == 2 and all(metric in entry for entry in logs)


@pytest.mark.compat
def test_trained_minorsft_model_exports_and_chats(tiny, tmp_path):
    out = tmp_path / "out"
    run_cli(
        dict(
            model_name_or_path=tiny.model,
            stage="minorsft",
            do_train=True,
            finetuning_type="lora",
            lora_target="all",
            pref_beta=0.04,
            dataset="minorsft_demo",
            dataset_dir=tiny.data,
            template="qwen",
            cutoff_len=128,
            output_dir=str(out),
            max_steps=2,
            report_to="none",
            learning_rate=1e-3,
        ),
        tmp_path / "train",
    )
    export_dir = tmp_path / "exported"
    proc = subprocess.run(
        [
            CLI,
            "export",
            "--model_name_or_path",
            tiny.model,
            "--adapter_name_or_path",
            str(out),
            "--template",
            "qwen",
            "--finetuning_type",
            "lora",
            "--export_dir",
            str(export_dir),
        ],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (export_dir / "model.safetensors").exists() and (export_dir / "tokenizer.json").exists()

    proc = subprocess.run(
        [CLI, "chat", "--model_name_or_path", str(export_dir), "--template", "qwen", "--max_new_tokens", "8"],
        input="What is 2 plus 3?\nexit\n",
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    # the whole conversation ran: an answer, then the prompt again, where `exit` ended the loop
    answer = proc.stdout.split("Assistant:", 1)[-1]
    assert "Assistant:" in proc.stdout and "User:" in answer, proc.stdout[-2000:] + proc.stderr[-2000:]
    # LLaMA-Factory's chat keeps its event loop in a daemon thread; the interpreter's exit after `exit` was
    # once aborted by it here (a CI run under CPU load; chat does not go through the plugin's stages).
    # That teardown abort, after a complete conversation, is tolerated; any other failure is not.
    teardown_abort = proc.returncode == -6 and proc.stderr.rstrip().endswith(
        "terminate called without an active exception"
    )
    assert proc.returncode == 0 or teardown_abort, proc.stderr[-4000:]
