"""With the plugin installed, LLaMA-Factory's own stages pt, sft, rm, dpo and kto train exactly as without it.

Each stage trains two steps on the tiny model in one process with the automatic registration on and in one with
it off (``LLAMAFACTORY_MINORSFT_DISABLE=1``); the logged losses must be bit-identical. One process per setting
runs all five stages through ``llamafactory.train.tuner.run_exp`` (the CLI's own entry point), which keeps the
test at two interpreter start-ups instead of ten.
"""

import json
import subprocess
import sys

from conftest import cli_env
from llamafactory_minorsft.tools.tiny import make_instruction_data, write_dataset


RUNNER = r"""
import json, sys
import llamafactory.train.tuner as tuner
from llamafactory.extras.constants import TRAINING_STAGES

configs, out = json.loads(sys.argv[1]), {}
for stage, config in configs.items():
    tuner.run_exp(args=config)
    with open(config["output_dir"] + "/trainer_state.json") as f:
        out[stage] = [entry["loss"] for entry in json.load(f)["log_history"] if "loss" in entry]
out["hooked"] = getattr(tuner._training_function, "_minorsft_patched", False) or "minorsft" in TRAINING_STAGES.values()
print("RESULT " + json.dumps(out))
"""


def stage_configs(tiny, root) -> dict:
    common = dict(
        model_name_or_path=tiny.model,
        do_train=True,
        finetuning_type="full",
        dataset_dir=tiny.data,
        template="qwen",
        cutoff_len=128,
        overwrite_cache=True,
        overwrite_output_dir=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-3,
        seed=42,
        dataloader_num_workers=0,
    )
    datasets = {"pt": "minorsft_demo", "sft": "minorsft_demo", "rm": "pairs", "dpo": "pairs", "kto": "kto_tags"}
    configs = {
        stage: dict(common, stage=stage, dataset=dataset, output_dir=f"{root}/{stage}")
        for stage, dataset in datasets.items()
    }
    # stock rm with full fine-tuning cannot save a tied-embedding model (safetensors refuses shared tensors, with
    # or without the plugin); a LoRA reward model, the usual choice, saves fine
    configs["rm"].update(finetuning_type="lora", lora_target="all")
    return configs


def run_all(configs: dict, cwd, disabled: bool) -> dict:
    env = cli_env(**({"LLAMAFACTORY_MINORSFT_DISABLE": "1"} if disabled else {}))
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(configs)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def test_stock_stages_are_bit_identical_with_and_without_the_plugin(tiny, tmp_path):
    kto = [dict(sample, kto_tag=i % 2 == 0) for i, sample in enumerate(make_instruction_data(8, seed=11))]
    write_dataset(
        tiny.data,
        "kto_tags",
        kto,
        {"columns": {"prompt": "instruction", "query": "input", "response": "output", "kto_tag": "kto_tag"}},
    )
    on = run_all(stage_configs(tiny, tmp_path / "on"), tmp_path, disabled=False)
    off = run_all(stage_configs(tiny, tmp_path / "off"), tmp_path, disabled=True)
    assert on.pop("hooked") is True and off.pop("hooked") is False  # the two runs really differ in registration
    for stage in ("pt", "sft", "rm", "dpo", "kto"):
        assert len(on[stage]) == 2 and all(isinstance(loss, float) for loss in on[stage]), (stage, on[stage])
        assert on[stage] == off[stage], stage  # bit-identical
