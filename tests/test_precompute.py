"""``precompute_ref_logps``: same numbers as the online reference, cached, never stale."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import base_config, run_cli, step_logs
from llamafactory_minorsft.tools.tiny import build_model


METRICS = ("loss", "deviation", "rewards", "coef", "logps/policy", "logps/ref")


def run(tiny, tmp_path, name, cache_dir, **overrides):
    defaults = dict(
        optim="adamw_torch",
        learning_rate=1e-2,
        max_steps=3,
        dataset="minorsft_demo",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
    )
    config = base_config(tiny, tmp_path / name, ref_logps_cache_dir=str(cache_dir), **{**defaults, **overrides})
    proc = run_cli(config, tmp_path / f"{name}_run")
    results = json.loads((tmp_path / name / "all_results.json").read_text())
    return step_logs(tmp_path / name), results, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(dict(stage="minorsft", ref_model="REF"), marks=pytest.mark.compat),
        pytest.param(dict(stage="sft_dpo", finetuning_type="lora", lora_target="all"), marks=pytest.mark.compat),
        dict(stage="sft", track_deviation=True),
    ],
    ids=["minorsft-full-ref_model", "sft_dpo-lora", "sft-track_deviation"],
)
def test_precomputed_equals_online_and_is_cached(tiny, tmp_path, overrides):
    overrides = {k: (tiny.ref_model if v == "REF" else v) for k, v in overrides.items()}
    cache = tmp_path / "cache"
    online, _, _ = run(tiny, tmp_path, "online", cache, **overrides)
    first, first_results, _ = run(tiny, tmp_path, "first", cache, precompute_ref_logps=True, **overrides)
    assert "ref_precompute_train_runtime" in first_results  # the pass ran
    assert len(list(cache.glob("*.pt"))) == 1
    for step_online, step_first in zip(online, first, strict=True):
        for key in METRICS:
            if key in step_online:
                assert step_first[key] == pytest.approx(step_online[key], rel=1e-5, abs=1e-5), key

    second, second_results, log = run(tiny, tmp_path, "second", cache, precompute_ref_logps=True, **overrides)
    assert "ref_precompute_train_runtime" not in second_results  # cache hit: no pass …
    assert "Created reference model" not in log  # … and no reference model loaded at all
    assert [e["loss"] for e in second] == [e["loss"] for e in first]

    if overrides["stage"] != "minorsft":
        return  # the cache key does not depend on the stage: the check below runs once
    # a changed input (another cutoff gives other tokenized data) never reuses the cache
    _, third_results, _ = run(tiny, tmp_path, "third", cache, precompute_ref_logps=True, cutoff_len=32, **overrides)
    assert "ref_precompute_train_runtime" in third_results
    assert len(list(cache.glob("*.pt"))) == 2


@pytest.mark.compat
def test_the_reference_pass_goes_in_data_set_order_whatever_the_samplers_and_drop_last(tiny, tmp_path):
    """The pass attaches its values by position: length-grouped sampling and `dataloader_drop_last` must not matter.

    Step 1 has policy = reference (full tuning, no `ref_model`), so each sample's log-ratio is 0 only if it got its
    own reference log-prob. 32 samples in eval batches of 5: a dropped last batch would leave 2 without one.
    """
    import transformers

    grouped = (
        dict(train_sampling_strategy="group_by_length")
        if int(transformers.__version__.split(".")[0]) >= 5
        else dict(group_by_length=True)
    )
    options = dict(stage="minorsft", dataset="minorsft_demo_eval", per_device_eval_batch_size=5, max_steps=1)
    steps, results, _ = run(
        tiny,
        tmp_path,
        "grouped",
        tmp_path / "cache",
        precompute_ref_logps=True,
        dataloader_drop_last=True,
        **grouped,
        **options,
    )
    assert "ref_precompute_train_runtime" in results
    assert steps[0]["deviation"] == pytest.approx(0.0, abs=1e-6)
    assert steps[0]["logps/ref"] == pytest.approx(steps[0]["logps/policy"], rel=1e-6)
    # the pass left the RNG alone: the length-grouped sampler drew the online run's batches
    online, _, _ = run(tiny, tmp_path, "online", tmp_path / "cache", dataloader_drop_last=True, **grouped, **options)
    assert steps[0]["loss"] == pytest.approx(online[0]["loss"], rel=1e-6)
    # the cached values serve a run without those options
    plain, results, _ = run(tiny, tmp_path, "plain", tmp_path / "cache", precompute_ref_logps=True, **options)
    assert "ref_precompute_train_runtime" not in results and plain[0]["deviation"] == pytest.approx(0.0, abs=1e-6)


def test_adapters_merged_into_the_base_are_part_of_the_reference(tiny, tmp_path):
    """A LoRA run on an earlier adapter with `create_new_adapter`: the reference includes that adapter.

    LLaMA-Factory merges the earlier adapter into the base, so the adapter-disabled reference is the base with it,
    and a cache made for the bare base must not serve it.
    """
    cache, lora = tmp_path / "cache", dict(stage="minorsft", finetuning_type="lora", lora_target="all")
    run(tiny, tmp_path, "adapter", tmp_path / "adapter_cache", **lora)  # an adapter that moved the model
    bare, bare_results, _ = run(tiny, tmp_path, "bare", cache, precompute_ref_logps=True, **lora)
    assert "ref_precompute_train_runtime" in bare_results
    merged = dict(adapter_name_or_path=str(tmp_path / "adapter"), create_new_adapter=True)
    steps, results, _ = run(tiny, tmp_path, "merged", cache, precompute_ref_logps=True, **lora, **merged)
    assert "ref_precompute_train_runtime" in results  # its own pass, not the bare base's values
    assert len(list(cache.glob("*.pt"))) == 2
    assert steps[0]["deviation"] == 0 and steps[0]["logps/ref"] != bare[0]["logps/ref"]  # policy = reference at first
    online, _, _ = run(tiny, tmp_path, "online", cache, **lora, **merged)
    assert [e["deviation"] for e in steps] == pytest.approx([e["deviation"] for e in online], rel=1e-5, abs=1e-6)


def test_the_reference_never_uses_dropout(tiny, tmp_path):
    """A base model with attention dropout, LoRA, the adapter-disabled base as reference.

    The reference forward runs without dropout online (the policy is in train mode), as in the precompute pass;
    minorsft also turns the policy's dropout off, as LLaMA-Factory's DPO does, so the first step's log-ratio is exactly
    0.
    """
    model = tmp_path / "dropout_model"
    build_model(AutoTokenizer.from_pretrained(tiny.model), str(model), seed=0, attention_dropout=0.5)
    lora = dict(model_name_or_path=str(model), finetuning_type="lora", lora_target="all")
    minorsft, _, _ = run(tiny, tmp_path, "minorsft", tmp_path / "cache", stage="minorsft", **lora)
    assert minorsft[0]["deviation"] == 0 and minorsft[0]["logps/policy"] == minorsft[0]["logps/ref"]
    assert minorsft[-1]["deviation"] != 0  # the adapters moved
    # sft keeps the stock (dropout) policy forward; its reference is the same deterministic base, online or not
    online, _, _ = run(tiny, tmp_path, "online", tmp_path / "cache", stage="sft", track_deviation=True, **lora)
    first, _, _ = run(
        tiny,
        tmp_path,
        "first",
        tmp_path / "cache",
        stage="sft",
        track_deviation=True,
        precompute_ref_logps=True,
        **lora,
    )
    assert online[0]["logps/ref"] == pytest.approx(minorsft[0]["logps/ref"], rel=1e-6)
    for step_online, step_first in zip(online, first, strict=True):
        assert step_first["logps/ref"] == pytest.approx(step_online["logps/ref"], rel=1e-6)
        # the pass left the RNG alone: the policy drew the same dropout masks after it
        assert step_first["loss"] == pytest.approx(step_online["loss"], rel=1e-6)
    assert online[0]["logps/policy"] != online[0]["logps/ref"]  # the policy did use dropout: the test has teeth


def test_each_split_gets_its_own_pass_with_persistent_workers_and_several_eval_sets(tiny, tmp_path):
    """Each split's reference pass runs over its own samples, with persistent loader workers and several eval sets.

    With `dataloader_persistent_workers` the Trainer keeps one eval loader, whatever its data set. Each eval set's
    deviation is logged under its own prefix.
    """
    common = dict(
        ref_model=tiny.ref_model,
        max_steps=1,
        do_eval=True,
        eval_dataset="four,minorsft_demo_eval",
        eval_on_each_dataset=True,
        eval_strategy="steps",
        eval_steps=1,
        per_device_eval_batch_size=4,
        dataloader_num_workers=1,
        dataloader_persistent_workers=True,
    )
    logs = {}
    for name, extra in (("online", {}), ("precomputed", dict(precompute_ref_logps=True))):
        out = tmp_path / name
        config = base_config(tiny, out, dataset="minorsft_demo", ref_logps_cache_dir=str(tmp_path / "cache"), **common)
        run_cli(dict(config, **extra), tmp_path / f"{name}_run")
        logs[name] = json.loads((out / "all_results.json").read_text())
    for split in ("four", "minorsft_demo_eval"):
        for key in (f"eval_{split}_deviation", f"eval_{split}_logps/ref"):
            assert logs["precomputed"][key] == pytest.approx(logs["online"][key], rel=1e-5, abs=1e-5), key


def test_a_pre_quantized_checkpoint_never_merges_adapters(tiny, tmp_path):
    """LLaMA-Factory merges earlier adapters into the base only where the model can take them (``adapter.py``).

    A checkpoint whose config holds a ``quantization_config`` (a pre-quantized model) cannot, whatever
    ``quantization_bit`` says: the run resumes the last adapter on the base with the others merged, as without
    ``create_new_adapter``.
    """
    from llamafactory.hparams import FinetuningArguments, ModelArguments

    from llamafactory_minorsft.train.reference_cache import merged_adapters

    quantized = tmp_path / "quantized"
    quantized.mkdir()
    config = json.loads((Path(tiny.model) / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    adapters = ["first", "second"]
    new = FinetuningArguments(finetuning_type="lora", create_new_adapter=True)
    resume = FinetuningArguments(finetuning_type="lora")
    assert merged_adapters(adapters, ModelArguments(model_name_or_path=tiny.model), new) == adapters
    assert merged_adapters(adapters, ModelArguments(model_name_or_path=tiny.model), resume) == ["first"]
    assert merged_adapters(adapters, ModelArguments(model_name_or_path=str(quantized)), new) == ["first"]
    on_the_fly = ModelArguments(model_name_or_path=tiny.model, quantization_bit=4)
    assert merged_adapters(adapters, on_the_fly, new) == ["first"]


def test_a_cache_dir_under_home_is_expanded(tiny, tmp_path, monkeypatch):
    """``ref_logps_cache_dir: ~/…`` is the user's home, not a directory named ``~`` in the working directory."""
    from datasets import Dataset
    from llamafactory.hparams import DataArguments, ModelArguments
    from transformers import Seq2SeqTrainingArguments

    from llamafactory_minorsft.hparams import PluginFinetuningArguments
    from llamafactory_minorsft.train.reference_cache import look_up

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    data = Dataset.from_dict({"input_ids": [[1, 2, 3]], "attention_mask": [[1, 1, 1]], "labels": [[-100, 2, 3]]})
    args = (
        ModelArguments(model_name_or_path=tiny.model),
        DataArguments(template="qwen"),
        Seq2SeqTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none"),
        PluginFinetuningArguments(
            stage="sft", track_deviation=True, precompute_ref_logps=True, ref_logps_cache_dir="~/cache"
        ),
    )
    entries = look_up(*args, {"train_dataset": data})
    assert entries["train"].path.startswith(str(tmp_path / "home" / "cache")), entries["train"].path
    # a reference model under home is loaded from there, as it was checked (not as a hub id "~/…")
    assert PluginFinetuningArguments(stage="minorsft", ref_model="~/ref").ref_model == str(tmp_path / "home" / "ref")


def test_the_cache_key_sees_every_file_and_loading_option_of_the_reference(tiny, tmp_path):
    """A cache made before the reference changed never serves it.

    The reference may be a run's `checkpoint-N` (its own checkpoints inside a model directory are not the model),
    `ref_model_adapters` may list several adapters (`a,b`), and LLaMA-Factory's loading options (`resize_vocab`)
    change the reference's forward.
    """
    import os
    import shutil

    from llamafactory.hparams import DataArguments, ModelArguments
    from transformers import Seq2SeqTrainingArguments

    from llamafactory_minorsft.hparams import PluginFinetuningArguments
    from llamafactory_minorsft.train.reference_cache import reference_identity

    checkpoint = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(tiny.model, checkpoint)
    adapters = [tmp_path / "a", tmp_path / "b"]
    for adapter in adapters:
        adapter.mkdir()
        (adapter / "adapter_model.safetensors").write_bytes(b"0")

    def identity(model_options=(), seed=42, cutoff_len=None, **finetuning) -> str:
        model_args = ModelArguments(model_name_or_path=tiny.model, **dict(model_options))
        model_args.model_max_length = cutoff_len  # as LLaMA-Factory's parser sets it
        args = (
            model_args,
            DataArguments(template="qwen"),
            Seq2SeqTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", seed=seed),
            PluginFinetuningArguments(stage="minorsft", **finetuning),
        )
        return json.dumps(reference_identity(*args), sort_keys=True)

    def retrained(path: Path) -> None:  # same size, a newer file
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))

    reference = dict(ref_model=str(checkpoint), ref_model_adapters=f"{adapters[0]},{adapters[1]}")
    before = identity(**reference)
    retrained(checkpoint / "model.safetensors")
    assert identity(**reference) != before
    before = identity(**reference)
    retrained(adapters[1] / "adapter_model.safetensors")
    assert identity(**reference) != before
    # checkpoints saved inside the model directory are not the model
    before = identity(ref_model=str(tmp_path / "run"))
    retrained(checkpoint / "model.safetensors")
    assert identity(ref_model=str(tmp_path / "run")) == before
    assert identity(model_options={"resize_vocab": True}) != identity()
    assert identity(model_options={"flash_attn": "auto"}) == identity()  # YAML's string, or the default's enum
    assert identity(seed=1) == identity(seed=2)  # a grid's seeds share the reference pass …
    # … unless the load draws weights at random: new rows (also for a template's tokens), a whole model, routers
    for random_weights in (
        {"add_special_tokens": "<a>", "resize_vocab": True},
        {"resize_vocab": True},
        {"train_from_scratch": True},
        {"mixture_of_depths": "convert"},
    ):
        assert identity(random_weights, seed=1) != identity(random_weights, seed=2), random_weights
    assert identity({"mixture_of_depths": "load"}, seed=1) == identity({"mixture_of_depths": "load"}, seed=2)
    assert identity({"rope_scaling": "linear"}, cutoff_len=64) != identity({"rope_scaling": "linear"}, cutoff_len=4096)
    assert identity(cutoff_len=64) == identity(cutoff_len=4096)  # without RoPE scaling, the tokens say it all
