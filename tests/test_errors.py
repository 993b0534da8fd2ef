"""Bad input through the stock CLI: a clear error naming the option, before the model loads, nothing written."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import base_config, cli_env, run_cli
from llamafactory_minorsft.tools.tiny import build_model, build_tokenizer


DEEPSPEED_Z3 = Path(__file__).resolve().parents[1] / "examples_yaml" / "deepspeed" / "ds_z3_config.json"
CASES = {
    "zero_beta": (dict(pref_beta=0.0), "`pref_beta` is β of the log-ratio r of `stage: minorsft` (the coefficient"),
    "negative_beta": (dict(stage="sft_dpo", pref_beta=-0.1), "of `stage: sft_dpo` (the loss −log σ(β·r))"),
    "ranking_dataset": (dict(dataset="pairs"), "ranking"),
    "missing_ref_model": (dict(ref_model="/nonexistent/reference-model"), "`ref_model` path"),
    "unknown_stage": (dict(stage="minor_sft"), "Unknown `stage: minor_sft`"),
    "track_deviation_on_dpo": (dict(stage="dpo", dataset="pairs", track_deviation=True), "`track_deviation`"),
    # plain packing attends across samples; neat_packing reaches this package's checks (not LLaMA-Factory's
    # "cannot be set as True except SFT")
    "packing": (dict(packing=True), "`packing: true` cannot be used with `stage: minorsft`: it packs samples"),
    "packing_points_to_neat_packing": (dict(stage="sft_go", packing=True), "Use `neat_packing: true` instead"),
    "neat_packing_llmlingua2": (
        dict(stage="sft_go", neat_packing=True, sft_go_grouping="llmlingua2", sft_go_classifier="/tmp"),
        "`neat_packing` with `sft_go_grouping: llmlingua2` is not supported yet",
    ),
    "sft_go_eta": (dict(stage="sft_go", sft_go_eta=1.5), "`sft_go_eta` must be a fraction strictly between 0 and 1"),
    "sft_go_lambda": (dict(stage="sft_go", sft_go_lambda=-0.1), "`sft_go_lambda` must be a number in [0, 1]"),
    "ref_vocabulary_mismatch": (dict(ref_model="OTHER_TOKENIZER"), "vocabulary"),
    "precompute_streaming": (dict(precompute_ref_logps=True, streaming=True, max_steps=1), "`streaming: true`"),
    "track_deviation_on_pt": (dict(stage="pt", track_deviation=True), "`track_deviation` means nothing"),
    "sft_go_no_classifier": (dict(stage="sft_go", sft_go_grouping="llmlingua2"), "needs `sft_go_classifier`"),
    "pad_tokens_in_loss": (dict(ignore_pad_token_for_loss=False), "`ignore_pad_token_for_loss: false` cannot"),
    "pad_tokens_tracked_sft": (
        dict(stage="sft", track_deviation=True, ignore_pad_token_for_loss=False),
        "`stage: sft` + `track_deviation`: pad tokens",
    ),
    "sft_go_rho1_without_ref_model": (dict(stage="sft_go", sft_go_grouping="rho1"), "`sft_go_grouping: rho1` needs"),
    "sft_go_group_reduction": (dict(stage="sft_go", sft_go_group_reduction="token"), "`sft_go_group_reduction` must"),
    "sft_loss_reduction_on_minorsft": (dict(sft_loss_reduction="sample"), "`sft_loss_reduction` is an option of"),
    "sft_loss_reduction_value": (dict(stage="sft", sft_loss_reduction="samples"), "`sft_loss_reduction` must be one"),
    # LLaMA-Factory's loss options and Unsloth (issue 19): a loss option that the run's own loss would drop
    "dft_with_minorsft": (dict(use_dft_loss=True), "`use_dft_loss` cannot be used with `stage: minorsft`"),
    "dft_with_sft_sample": (
        dict(stage="sft", sft_loss_reduction="sample", use_dft_loss=True),
        "`use_dft_loss` cannot be used with `stage: sft` + `sft_loss_reduction: sample`",
    ),
    "eaft_with_sft_go": (
        dict(stage="sft_go", use_eaft_loss=True),
        "`use_eaft_loss` cannot be used with `stage: sft_go`",
    ),
    "asft_with_sft_dpo": (
        dict(stage="sft_dpo", use_asft_loss=True),
        "`use_asft_loss` cannot be used with `stage: sft_dpo`",
    ),
    "asft_with_track_deviation": (
        dict(stage="sft", track_deviation=True, use_asft_loss=True),
        "`use_asft_loss` cannot be used with `stage: sft` + `track_deviation`",
    ),
    "label_smoothing_minorsft": (dict(label_smoothing_factor=0.1), "`label_smoothing_factor` cannot be used"),
    # refused before LLaMA-Factory's own check, which first asks for Unsloth to be installed
    "unsloth": (dict(use_unsloth=True), "`use_unsloth` cannot be used with `stage: minorsft`"),
    # options that the new stages would silently ignore
    "sft_go_option_on_minorsft": (
        dict(sft_go_eta=0.3),
        "`sft_go_eta` is an option of `stage: sft_go`, not `minorsft`",
    ),
    "dpo_loss_on_sft_dpo": (
        dict(stage="sft_dpo", pref_loss="hinge"),
        "`pref_loss` is an option of stock `stage: dpo`",
    ),
    "dpo_ftx_on_minorsft": (dict(pref_ftx=1.0), "`pref_ftx` is an option of stock `stage: dpo`"),
    "ref_model_adapters_without_ref_model": (
        dict(ref_model_adapters="/tmp"),
        "`ref_model_adapters` are applied to `ref_model`, which is not set",
    ),
    # before the reference pass, not after it: this file is no directory
    "cache_dir_not_a_directory": (
        dict(precompute_ref_logps=True, ref_logps_cache_dir=f"{__file__}/cache"),
        "`ref_logps_cache_dir`",
    ),
    # evaluation alone merges the adapters: no adapter-disabled model is left to be the reference
    "lora_eval_only_without_ref_model": (
        dict(finetuning_type="lora", lora_target="all", do_train=False, do_eval=True, eval_dataset="four"),
        "with `finetuning_type: lora` and `do_train: false` needs `ref_model`",
    ),
    # reference options on runs that use no reference would be ignored
    "ref_model_on_sft_go_tfidf": (
        dict(stage="sft_go", ref_model="REF"),
        "`ref_model` sets the reference model, which `stage: sft_go` does not use",
    ),
    "ref_model_on_sft_sample": (
        dict(stage="sft", sft_loss_reduction="sample", ref_model="REF"),
        "`ref_model` sets the reference model, which `stage: sft` + `sft_loss_reduction: sample` does not use",
    ),
    # new tokens start random in each load: a reference loaded apart would not be the initial model
    "new_tokens_with_a_reference_copy": (
        dict(add_special_tokens="<a>,<b>", resize_vocab=True),
        "`add_special_tokens` cannot be used with `stage: minorsft` and a reference model loaded apart",
    ),
    "tfidf_streaming": (
        dict(stage="sft_go", streaming=True, max_steps=1),
        "`sft_go_grouping: tfidf` scores every training answer before training",
    ),
    "tfidf_without_a_training_set": (
        dict(stage="sft_go", dataset=None, do_train=False, do_eval=True, eval_dataset="four"),
        "`sft_go_grouping: tfidf` takes its IDF from the training answers of `dataset`, which is not set",
    ),
    "ref_model_is_an_adapter": (
        dict(ref_model="ADAPTER"),
        "is a LoRA adapter, not a model. Set `ref_model` to its base model and `ref_model_adapters`",
    ),
    "unsloth_tracked_sft": (
        dict(stage="sft", track_deviation=True, use_unsloth=True),
        "`use_unsloth` cannot be used with `stage: sft` + `track_deviation`",
    ),
    "ref_model_is_a_file": (dict(ref_model="FILE"), "is a file, not a model directory. Point `ref_model` at"),
    "ref_model_without_config": (dict(ref_model="EMPTY"), "is a directory without a config.json, not a model"),
    # a reference loaded apart would be other random weights, or miss the tokens the template adds
    "train_from_scratch_with_a_reference_copy": (
        dict(train_from_scratch=True),
        "`train_from_scratch` cannot be used with `stage: minorsft` and a reference model loaded apart",
    ),
    "template_tokens_with_a_reference_copy": (
        dict(stage="sft", track_deviation=True, template="llama3", resize_vocab=True),
        "`resize_vocab` would grow the model's 512 embedding rows to the tokenizer's",
    ),
}
#: options that LLaMA-Factory 0.9.4 does not have (it rejects them as unknown keys itself)
NEWER_OPTIONS = ("use_eaft_loss", "use_asft_loss")


@pytest.fixture(scope="module")
def other_tokenizer_model(tmp_path_factory) -> str:
    """A tiny model whose tokenizer was trained on other text: another vocabulary than the policy's."""
    path = str(tmp_path_factory.mktemp("other_tokenizer"))
    build_model(build_tokenizer(["entirely different words for another vocabulary"] * 4, path, vocab_size=300), path)
    return path


@pytest.mark.compat
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_early_and_clearly(tiny, tmp_path, case, request):
    overrides, message = CASES[case]
    from llamafactory.extras.env import VERSION

    if VERSION == "0.9.4" and any(name in overrides for name in NEWER_OPTIONS):
        pytest.skip(f"LLaMA-Factory 0.9.4 has no {', '.join(name for name in NEWER_OPTIONS if name in overrides)}")
    if VERSION == "0.9.4" and overrides.get("neat_packing"):  # refused there whatever the stage, as stock sft
        message = "`neat_packing` cannot be used with"
    if overrides.get("ref_model") == "OTHER_TOKENIZER":
        overrides = dict(overrides, ref_model=request.getfixturevalue("other_tokenizer_model"))
    if overrides.get("ref_model") == "ADAPTER":  # a LoRA output directory: adapter files, no config.json
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
        overrides = dict(overrides, ref_model=str(adapter))
    if overrides.get("ref_model") == "REF":
        overrides = dict(overrides, ref_model=tiny.ref_model)
    if overrides.get("ref_model") == "FILE":
        overrides = dict(overrides, ref_model=str(Path(tiny.ref_model) / "model.safetensors"))
    if overrides.get("ref_model") == "EMPTY":
        (tmp_path / "empty").mkdir()
        overrides = dict(overrides, ref_model=str(tmp_path / "empty"))
    out = tmp_path / "out"
    proc = run_cli(base_config(tiny, out, **overrides), tmp_path / "run", check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert message in output, output[-3000:]
    assert "trainable params" not in output  # LLaMA-Factory logs this once the model is loaded
    assert not out.exists()


def test_flash_attention_2_on_transformers_5_6_0_is_refused_before_the_model_loads(tiny, tmp_path):
    """The real transformers 5.6.0, installed beside this environment's, with `flash_attn: fa2`: refused early.

    Run where LLaMA-Factory accepts 5.6.0 (0.9.5's range ends there; main excludes it, 0.9.4 needs 4.x).
    """
    from llamafactory.extras.env import VERSION

    if VERSION != "0.9.5":
        pytest.skip(f"LLaMA-Factory {VERSION} does not accept transformers 5.6.0 itself")
    target = tmp_path / "transformers-5.6.0"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(target)]
    pip.append("transformers==5.6.0")  # --no-compile: the few modules a run imports compile on import
    assert subprocess.run(pip, capture_output=True, text=True).returncode == 0
    env = cli_env(PYTHONPATH=str(target))
    probe = [sys.executable, "-c", "import transformers; print(transformers.__version__)"]
    assert subprocess.run(probe, env=env, capture_output=True, text=True).stdout.strip() == "5.6.0"
    for flash_attn in ("fa2", "sdpa"):
        out = tmp_path / flash_attn
        config = base_config(tiny, out, flash_attn=flash_attn)
        proc = run_cli(config, tmp_path / f"{flash_attn}_run", check=False, env=env)
        output = proc.stdout + proc.stderr
        if flash_attn == "sdpa":  # the same stack trains: the guard is about fa2 alone
            assert proc.returncode == 0 and (out / "trainer_state.json").exists(), output[-3000:]
            continue
        assert proc.returncode != 0
        assert "`flash_attn: fa2` crashes on transformers 5.6.0" in output, output[-3000:]
        assert "transformers#45588" in output
        assert "trainable params" not in output and not out.exists()


def test_zero3_reference_on_deepspeed_0_16_is_refused_before_the_model_loads(tiny, tmp_path):
    """A ZeRO-3 reference on deepspeed 0.16.9 is refused before the model loads.

    The real deepspeed 0.16.9 (LLaMA-Factory 0.9.4's cap), installed beside this environment's, with ZeRO-3 and a
    reference model: refused early, on every process. Run on the default stack, whose LLaMA-Factory has no cap.
    """
    from llamafactory.extras.env import VERSION

    if VERSION != "0.9.5":
        pytest.skip("run on the default stack (LLaMA-Factory 0.9.4 caps deepspeed itself)")
    target = tmp_path / "deepspeed-0.16.9"
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "--no-compile",
        "--target",
        str(target),
        "deepspeed==0.16.9",
    ]
    assert subprocess.run(pip, capture_output=True, text=True).returncode == 0
    out = tmp_path / "out"
    config = base_config(tiny, out, per_device_train_batch_size=2, deepspeed=str(DEEPSPEED_Z3))
    # DeepSpeed JIT-builds its CPU shm op into one cache per torch build, whatever its own version: 0.16.9's op there
    # makes a concurrent 0.19.8 run fail with "no attribute 'vector_kernel_level'", so it builds into its own
    env = cli_env(
        PYTHONPATH=str(target),
        FORCE_TORCHRUN="1",
        NPROC_PER_NODE="2",
        TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"),
    )
    proc = run_cli(config, tmp_path / "run", check=False, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "ZeRO-3 with a reference model needs deepspeed >= 0.17.0, but 0.16.9 is installed" in output, output[-3000:]
    assert "trainable params" not in output and not out.exists()


def test_zero3_reference_checks_read_the_raw_config_and_the_version(tmp_path, monkeypatch):
    """The early check (raw args) reaches the version check exactly for a ZeRO-3 config and a reference stage.

    The end-to-end refusal above runs the early check; the parsed one (also the fork patch's) compares versions.
    """
    import json
    from types import SimpleNamespace

    from llamafactory_minorsft import hparams

    with pytest.raises(ValueError, match=r"needs deepspeed >= 0\.17\.0, but 0\.16\.9 is installed"):
        hparams.check_zero3_reference("0.16.9")
    hparams.check_zero3_reference("0.17.0")

    checked = []
    monkeypatch.setattr(hparams, "check_zero3_reference", checked.append)
    z3 = tmp_path / "z3.json"
    z3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    monkeypatch.chdir(tmp_path)  # a relative path is read from the working directory, as DeepSpeed reads it
    cases = {
        "z3.json": ("minorsft", True),
        str(z3): ("sft_dpo", True),
        "missing.json": ("minorsft", False),  # LLaMA-Factory reports the missing file itself
        str(DEEPSPEED_Z3.with_name("ds_z2_config.json")): ("minorsft", False),
    }
    for deepspeed, (stage, refused) in cases.items():
        checked.clear()
        hparams.check_zero3_reference_early(SimpleNamespace(stage=stage, deepspeed=deepspeed, track_deviation=False))
        assert bool(checked) == refused, deepspeed
    for config, stage, refused in [
        ({"zero_optimization": {"stage": 3}}, "minorsft", True),
        ({"zero_optimization": {"stage": 3}}, "sft", False),  # plain sft: no reference
        ({"zero_optimization": None}, "minorsft", False),
        ({"zero_optimization": {"stage": "auto"}}, "minorsft", False),
    ]:
        checked.clear()
        hparams.check_zero3_reference_early(SimpleNamespace(stage=stage, deepspeed=config, track_deviation=False))
        assert bool(checked) == refused, config


def test_new_tokens_with_lora_are_refused_only_where_the_reference_is_loaded_again(tiny, tmp_path):
    """New tokens with LoRA: refused only where the reference is loaded again.

    LoRA's reference is the adapter-disabled policy, new embedding rows included; under ZeRO-3 its precompute pass
    loads the base again (fresh random rows), which is refused. Checked in process, with ZeRO-3 enabled the way
    transformers knows it (a live `HfDeepSpeedConfig`).
    """
    from llamafactory.hparams import DataArguments, ModelArguments
    from transformers import Seq2SeqTrainingArguments
    from transformers.integrations import HfDeepSpeedConfig

    from llamafactory_minorsft.hparams import PluginFinetuningArguments, verify_plugin_args

    def verify(**finetuning):
        verify_plugin_args(
            ModelArguments(model_name_or_path=tiny.model, add_special_tokens="<a>,<b>", resize_vocab=True),
            DataArguments(template="qwen"),
            Seq2SeqTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", do_train=True),
            PluginFinetuningArguments(stage="minorsft", finetuning_type="lora", **finetuning),
            [],
        )

    verify(precompute_ref_logps=True)  # no ZeRO-3: the reference pass disables the adapters
    zero3 = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    verify()  # online: the adapter-disabled policy, under ZeRO-3 too
    with pytest.raises(ValueError, match="`add_special_tokens` cannot be used with `stage: minorsft` and a reference"):
        verify(precompute_ref_logps=True)
    del zero3


def test_a_resized_vocabulary_is_refused_only_with_a_reference_loaded_again(tiny, tmp_path):
    """`resize_vocab` growing the vocabulary (a template's tokens, the tokenizer's own): refused where needed.

    Its new rows are random, and a reference loaded again (full tuning, `ref_model`) would not have them; LoRA's
    reference is the resized policy itself.
    """
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.model import load_tokenizer
    from transformers import AutoTokenizer

    from llamafactory_minorsft.hparams import PluginFinetuningArguments, check_resized_vocabulary

    def check(template="llama3", resize_vocab=True, model=tiny.model, **finetuning):
        model_args = ModelArguments(model_name_or_path=model, resize_vocab=resize_vocab)
        data_args = DataArguments(template=template)
        tokenizer = load_tokenizer(model_args)["tokenizer"]
        before = len(tokenizer)
        get_template_and_fix_tokenizer(tokenizer, data_args)
        finetuning_args = PluginFinetuningArguments(**finetuning)
        check_resized_vocabulary(tokenizer, len(tokenizer) - before, model_args, data_args, finetuning_args)

    message = r"`resize_vocab` would grow the model's 512 embedding rows to the tokenizer's \d+ tokens \(`template: llama3` added \d+\)"
    for finetuning in (
        dict(stage="minorsft", finetuning_type="full"),
        dict(stage="sft_dpo", finetuning_type="freeze"),
    ):
        with pytest.raises(ValueError, match=message):
            check(**finetuning)
    with pytest.raises(ValueError, match=message):
        check(stage="minorsft", finetuning_type="lora", ref_model=tiny.ref_model)
    check(stage="minorsft", finetuning_type="lora")  # the adapter-disabled policy has the new rows
    check(stage="minorsft", finetuning_type="full", resize_vocab=False)  # no new rows: LLaMA-Factory's index error
    check(stage="minorsft", finetuning_type="full", template="qwen")  # the tiny tokenizer has the qwen template's
    check(stage="sft", finetuning_type="full")  # no reference

    longer = tmp_path / "longer"  # a tokenizer with more tokens than the model has rows, whatever the template
    shutil.copytree(tiny.model, longer)
    tokenizer = AutoTokenizer.from_pretrained(longer)
    tokenizer.add_tokens([f"<new{i}>" for i in range(600 - len(tokenizer))])
    tokenizer.save_pretrained(longer)
    with pytest.raises(ValueError, match=r"to the tokenizer's 600 tokens \(the tokenizer's own\)"):
        check(template="qwen", model=str(longer), stage="minorsft", finetuning_type="full")


def test_random_weights_at_load_are_refused_where_the_reference_is_loaded_apart(tiny, tmp_path):
    from llamafactory.hparams import DataArguments, ModelArguments
    from transformers import Seq2SeqTrainingArguments

    from llamafactory_minorsft.hparams import PluginFinetuningArguments, verify_plugin_args

    def verify(model_options=None, **finetuning):
        verify_plugin_args(
            ModelArguments(model_name_or_path=tiny.model, **(model_options or dict(train_from_scratch=True))),
            DataArguments(template="qwen"),
            Seq2SeqTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", do_train=True),
            PluginFinetuningArguments(**finetuning),
            [],
        )

    # LLaMA-Factory loads `ref_model` with `train_from_scratch` too: random weights, not the model's
    for finetuning in (
        dict(stage="minorsft", finetuning_type="full"),
        dict(stage="sft", track_deviation=True, finetuning_type="freeze"),
        dict(stage="minorsft", finetuning_type="lora", ref_model=tiny.ref_model),
    ):
        with pytest.raises(ValueError, match="`train_from_scratch` cannot be used with `stage: "):
            verify(**finetuning)
    verify(stage="minorsft", finetuning_type="lora")  # the reference is the policy with its adapters disabled
    verify(stage="sft", finetuning_type="full")  # no reference
    with pytest.raises(ValueError, match="`mixture_of_depths: convert` cannot be used with `stage: minorsft`"):
        verify(stage="minorsft", finetuning_type="full", model_options=dict(mixture_of_depths="convert"))
