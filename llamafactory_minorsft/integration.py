"""Everything that patches LLaMA-Factory internals, in one place: a LLaMA-Factory upgrade is this file's work.

Each patch is applied right after its module is imported (the post-import hooks of ``hooks``, installed by
``_autoload``) or by :func:`register_all`:

- ``llamafactory.hparams.parser``: its parser dataclass lists get ``PluginFinetuningArguments``
  instead of ``FinetuningArguments`` (new stage names and options, and their checks), and SFT's data options
  reach the new stages, which are SFT (``_parse_train_args`` and ``_verify_model_args``: see ``hold_sft_options``);
- ``llamafactory.train.tuner``: ``_training_function`` dispatches this package's runs (``is_plugin_run``) to
  their workflows and every other run, unchanged, to the stock function;
- LLaMA-Board: ``extras.constants.TRAINING_STAGES`` gets the stage labels (MinorSFT, SFT using DPO, SFT-GO),
  ``webui.locales.LOCALES`` the new controls' translations, ``webui.components.train.create_train_tab`` the
  new controls (placed after its RLHF accordion, and the stock controls in ``STAGE_HIDDEN_ELEMS`` hidden for the
  new stages), ``webui.runner.Runner._parse_train_args`` their arguments, ``webui.control.get_trainer_info``
  the live deviation plot. The web UI relies on LLaMA-Board's element names (``STOCK_TRAIN_ELEMS``, read as
  ``train.<name>`` ids), checked when the tab is built;
- ``llamafactory.model.loader.apply_liger_kernel``, only while this package's workflow loads its model
  (``logits_kept``): Liger's kernels without its fused loss, which returns no logits.

Before touching anything, each patch finds the installed LLaMA-Factory in ``LAYOUTS`` and checks that every
attribute it replaces is there, so an unknown LLaMA-Factory fails loudly instead of being half-patched.

``LAYOUTS`` is all this package knows about LLaMA-Factory versions: what differs between the tested releases is
one row each, and the rest of the code is the same for all of them.
"""

import argparse
import functools
import json
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from . import DISABLE_ENV
from .stages import NEW_STAGES, is_plugin_run


#: Set to 1 to patch a LLaMA-Factory version that is not in ``LAYOUTS`` (every patch target is still checked).
ALLOW_UNTESTED_ENV = "LLAMAFACTORY_MINORSFT_ALLOW_UNTESTED"


@dataclass(frozen=True)
class Layout:
    """What one LLaMA-Factory version offers the patches."""

    label: str  # as the README and the errors name it
    parser_lists: tuple[str, ...]  # parser lists that hold ``FinetuningArguments`` (``_TRAIN_MCA_ARGS`` is extra)
    profiler_callbacks: bool  # ``tuner`` has TorchProfilerCallback and ModuleProfilerCallback
    neat_packing: bool = True  # ``neat_packing`` trains (0.9.4 refuses it with transformers >= 4.53, its own pin)


_LISTS = ("_TRAIN_ARGS", "_INFER_ARGS", "_EVAL_ARGS")

#: ``llamafactory.extras.env.VERSION`` → layout. Tested: the 0.9.4 and 0.9.5 releases, main at commit ff6d4d12e.
LAYOUTS = {
    "0.9.4": Layout("0.9.4", _LISTS, profiler_callbacks=False, neat_packing=False),
    "0.9.5": Layout("0.9.5", _LISTS, profiler_callbacks=True),
    "0.9.6.dev0": Layout("main (0.9.6.dev0, commit ff6d4d12e)", _LISTS + ("_TRAIN_MBRIDGE_ARGS",), True),
}
SUPPORTED_LLAMAFACTORY_VERSIONS = tuple(LAYOUTS)


class UnsupportedLlamaFactoryError(RuntimeError):
    pass


@functools.cache
def layout() -> Layout:
    """The layout of the installed LLaMA-Factory, or an error that names it, the supported ones and the override."""
    from llamafactory.extras.env import VERSION
    from packaging.version import Version

    if VERSION in LAYOUTS:
        return LAYOUTS[VERSION]

    from llamafactory.extras.misc import is_env_enabled

    supported = ", ".join(row.label for row in LAYOUTS.values())
    if not is_env_enabled(ALLOW_UNTESTED_ENV):
        raise UnsupportedLlamaFactoryError(
            f"llamafactory-minorsft does not support LLaMA-Factory {VERSION}; it supports {supported}. Install one "
            f"of those, or set {ALLOW_UNTESTED_ENV}=1 to try this version anyway "
            f"(every patch target is still checked), or set {DISABLE_ENV}=1 to run LLaMA-Factory without the plugin."
        )

    # the newest tested layout not newer than the installed version (else the oldest)
    older = [key for key in LAYOUTS if Version(key) <= Version(VERSION)]
    chosen = LAYOUTS[max(older, key=Version) if older else min(LAYOUTS, key=Version)]
    # a plain warning: this runs inside LLaMA-Factory's own imports, before its logging can be imported
    warnings.warn(
        f"{ALLOW_UNTESTED_ENV}=1: patching LLaMA-Factory {VERSION}, which llamafactory-minorsft has not been tested "
        f"with (tested: {supported}), as LLaMA-Factory {chosen.label}.",
        stacklevel=2,
    )
    return chosen


def _has(obj, dotted: str) -> bool:
    for name in dotted.split("."):
        if not hasattr(obj, name):
            return False
        obj = getattr(obj, name)
    return True


def _require(module, *names: str) -> None:
    missing = [name for name in names if not _has(module, name)]
    if missing:
        raise UnsupportedLlamaFactoryError(
            f"{module.__name__} lacks {', '.join(missing)}: this is not the LLaMA-Factory {layout().label} layout "
            "that llamafactory-minorsft patches. Nothing was patched."
        )


def _should_patch(module, *names: str) -> bool:
    """False if ``module`` is patched already; else check the version and that ``names`` exist (or raise).

    Each patch sets ``module._minorsft_patched`` only once it is complete.
    """
    if getattr(module, "_minorsft_patched", False):
        return False

    layout()
    _require(module, *names)
    return True


def patch_parser(parser) -> None:
    """Swap ``FinetuningArguments`` for ``PluginFinetuningArguments`` in the parser lists (in place)."""
    if not _should_patch(parser, *layout().parser_lists, "_parse_train_args", "_verify_model_args"):
        return

    from llamafactory.hparams.finetuning_args import FinetuningArguments

    from .hparams import PluginFinetuningArguments

    lists = [getattr(parser, name) for name in layout().parser_lists]
    lists += [parser._TRAIN_MCA_ARGS] if getattr(parser, "_TRAIN_MCA_ARGS", None) else []  # empty without mcore
    if all(PluginFinetuningArguments in arg_list for arg_list in lists):  # a fork (patches/) has the stages natively
        parser._minorsft_patched = parser._minorsft_fork = True
        return

    if not all(FinetuningArguments in arg_list for arg_list in lists):
        raise UnsupportedLlamaFactoryError(
            f"{parser.__name__}: FinetuningArguments not found in its parser lists, so llamafactory-minorsft cannot "
            f"add its stages. Set {DISABLE_ENV}=1 to run this LLaMA-Factory without the plugin's hooks."
        )

    for arg_list in lists:
        arg_list[arg_list.index(FinetuningArguments)] = PluginFinetuningArguments

    hold_sft_options(parser)
    parser._minorsft_patched = True


#: SFT's data options, which ``get_train_args`` refuses for every stage but `sft` ("cannot be set as True except SFT")
SFT_DATA_OPTIONS = ("train_on_prompt", "mask_history", "neat_packing")
_HELD = "_minorsft_held_options"


def hold_sft_options(parser) -> None:
    """Let SFT's data options reach the new stages, which train on SFT data (and check them themselves).

    ``get_train_args`` calls ``_parse_train_args``, then refuses these options for every stage but `sft`, then
    calls ``_verify_model_args``. For the new stages the options are held back after the parse and given back at
    ``_verify_model_args``, so that every caller of ``get_train_args`` receives them as set.
    """
    parse, verify = parser._parse_train_args, parser._verify_model_args

    @functools.wraps(parse)
    def _parse_train_args(*args, **kwargs):
        parsed = parse(*args, **kwargs)
        data_args, finetuning_args = parsed[1], parsed[3]
        if finetuning_args.stage in NEW_STAGES:
            setattr(data_args, _HELD, {name: getattr(data_args, name) for name in SFT_DATA_OPTIONS})
            for name in SFT_DATA_OPTIONS:
                setattr(data_args, name, False)
        return parsed

    @functools.wraps(verify)
    def _verify_model_args(model_args, data_args, *args, **kwargs):
        for name, value in vars(data_args).pop(_HELD, {}).items():
            setattr(data_args, name, value)
        return verify(model_args, data_args, *args, **kwargs)

    parser._parse_train_args, parser._verify_model_args = _parse_train_args, _verify_model_args


BOOLEAN_FLAGS = ("track_deviation", "use_unsloth")


def peek_args(args: dict[str, Any] | list[str]) -> SimpleNamespace:
    """The raw train args that route a run, without parsing them: stage, sft_loss_reduction, deepspeed and the flags."""
    names = ("stage", "sft_loss_reduction", "deepspeed", *BOOLEAN_FLAGS)
    if isinstance(args, dict):
        raw = {name: args.get(name) for name in names}
    else:
        peek = argparse.ArgumentParser(add_help=False)
        peek.add_argument("--stage")
        peek.add_argument("--sft_loss_reduction")
        peek.add_argument("--deepspeed")
        for name in BOOLEAN_FLAGS:
            peek.add_argument(f"--{name}", nargs="?", const="true", default="false")
        raw = vars(peek.parse_known_args(args)[0])

    for name in BOOLEAN_FLAGS:  # a bool in a config, a string on the command line (HfArgumentParser's rule)
        flag = raw[name]
        raw[name] = flag if isinstance(flag, bool) else str(flag).lower() in ("yes", "true", "t", "y", "1")
    raw["stage"] = raw["stage"] or "sft"  # FinetuningArguments' default
    return SimpleNamespace(**raw)


def peek_is_plugin_run(args: dict[str, Any] | list[str]) -> bool:
    """``is_plugin_run`` of raw train args (a config dict, or CLI strings), without parsing them."""
    return is_plugin_run(peek_args(args))


def _plugin_training_function(tuner, config: dict[str, Any]) -> None:
    """``tuner._training_function`` for this package's runs: same callbacks, our workflows."""
    from llamafactory.train.trainer_utils import get_swanlab_callback
    from transformers import EarlyStoppingCallback

    from .train.teardown import shut_down_process_group
    from .train.tuner import run_stage

    callbacks: list[Any] = config.get("callbacks")
    raw = peek_args(config.get("args"))
    if raw.use_unsloth:  # before LLaMA-Factory's parser, which first requires Unsloth to be installed
        from .hparams import refuse_unsloth

        refuse_unsloth(raw)
    if raw.deepspeed:  # before the parser, whose TrainingArguments start DeepSpeed (building its CPU ops first)
        from .hparams import check_zero3_reference_early

        check_zero3_reference_early(raw)

    model_args, data_args, training_args, finetuning_args, generating_args = tuner.get_train_args(config.get("args"))
    verify_plugin_run(model_args, data_args, training_args, finetuning_args)

    # the stock callbacks of tuner._training_function (PiSSA is rejected for these stages)
    callbacks.append(tuner.LogCallback())
    if finetuning_args.use_swanlab:
        callbacks.append(get_swanlab_callback(finetuning_args))

    if finetuning_args.early_stopping_steps is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=finetuning_args.early_stopping_steps))

    if layout().profiler_callbacks and getattr(training_args, "enable_torch_profiler", False):
        callbacks.append(tuner.TorchProfilerCallback(training_args))

    if layout().profiler_callbacks and getattr(training_args, "profile_modules", None):
        callbacks.append(tuner.ModuleProfilerCallback(training_args.profile_modules))

    callbacks.append(tuner.ReporterCallback(model_args, data_args, finetuning_args, generating_args))  # add to last
    run_stage(model_args, data_args, training_args, finetuning_args, callbacks)

    try:
        shut_down_process_group()  # the stock function only destroys it: see train/teardown.py for why
    except Exception as err:  # as the stock function: a failed clean-up must not fail a finished run
        from llamafactory.extras.logging import get_logger

        get_logger(__name__).warning(f"Failed to destroy process group: {err}.")


def verify_plugin_run(model_args, data_args, training_args, finetuning_args) -> None:
    """The cross-argument checks of this package's runs, before anything loads (also called by the fork patch)."""
    from .hparams import verify_plugin_args

    verify_plugin_args(model_args, data_args, training_args, finetuning_args, _dataset_attrs(data_args))


def _dataset_attrs(data_args) -> list:
    from llamafactory.data.parser import get_dataset_list

    return get_dataset_list(data_args.dataset, data_args.dataset_dir) + get_dataset_list(
        data_args.eval_dataset, data_args.dataset_dir
    )


@contextmanager
def logits_kept():
    """Within, LLaMA-Factory's ``load_model`` treats the run as a stage that needs the logits (``require_logits``).

    With `enable_liger_kernel`, ``load_model`` applies Liger's fused linear cross-entropy, which returns no logits, to
    `stage: sft` (and `pt`); every other stage gets Liger's kernels without it. This package's sft runs read their
    log-probs from the logits or the head, as its other stages do.
    """
    from llamafactory.model import loader

    _require(loader, "apply_liger_kernel")
    stock = loader.apply_liger_kernel

    def apply_liger_kernel(config, model_args, is_trainable, require_logits):
        return stock(config, model_args, is_trainable, require_logits=True)

    loader.apply_liger_kernel = apply_liger_kernel
    try:
        yield
    finally:
        loader.apply_liger_kernel = stock


def patch_tuner(tuner) -> None:
    """Route this package's runs of ``tuner._training_function`` to their workflows."""
    profilers = ("TorchProfilerCallback", "ModuleProfilerCallback") if layout().profiler_callbacks else ()
    if not _should_patch(tuner, "_training_function", "get_train_args", "LogCallback", "ReporterCallback", *profilers):
        return
    if "is_plugin_run" in tuner._training_function.__code__.co_names:  # a fork (patches/) dispatches the runs itself
        tuner._minorsft_patched = tuner._minorsft_fork = True
        return
    stock_training_function = tuner._training_function

    @functools.wraps(stock_training_function)
    def _training_function(config: dict[str, Any]) -> None:
        if peek_is_plugin_run(config.get("args")):
            return _plugin_training_function(tuner, config)

        return stock_training_function(config)

    tuner._training_function = _training_function
    tuner._minorsft_patched = True


def patch_constants(constants) -> None:
    """Add the stage labels to the web UI's stage dropdown (a label → stage dict, imported by name)."""
    if _should_patch(constants, "TRAINING_STAGES"):
        from .webui import STAGE_LABELS

        constants.TRAINING_STAGES.update(STAGE_LABELS)
        constants._minorsft_patched = True


def patch_webui_locales(locales) -> None:
    if _should_patch(locales, "LOCALES"):
        from .webui import LOCALES

        locales.LOCALES.update(LOCALES)
        locales._minorsft_patched = True


#: LLaMA-Board train-tab elements the web UI patches read, hide or place the new controls by
STOCK_TRAIN_ELEMS = ("training_stage", "rlhf_tab", "pref_beta")
#: stock RLHF controls that do nothing for the new stages, hidden while one is selected
STAGE_HIDDEN_ELEMS = ("pref_ftx", "pref_loss", "reward_model", "ppo_score_norm", "ppo_whiten_rewards")


def patch_webui_train_tab(train_tab) -> None:
    """Build the train tab with the new controls, placed and shown by stage.

    Build the train tab with the new controls among its inputs (preview, start, save and load), placed after
    the RLHF accordion, and show or hide controls by stage.
    """
    if not _should_patch(train_tab, "create_train_tab"):
        return

    from llamafactory.extras.constants import TRAINING_STAGES

    from .webui import create_elems, place_after, render_elems, stage_visibility

    stock_create_train_tab = train_tab.create_train_tab

    @functools.wraps(stock_create_train_tab)
    def create_train_tab(engine):
        elems = create_elems()
        manager = engine.manager
        # the tab starts its input set from get_base_elems(): ours join there, before any event is bound
        manager.get_base_elems = lambda: type(manager).get_base_elems(manager) | set(elems.values())
        try:
            elem_dict = stock_create_train_tab(engine)
        finally:
            del manager.get_base_elems

        elem_dict.update(render_elems(elems))
        missing = [name for name in (*STOCK_TRAIN_ELEMS, *STAGE_HIDDEN_ELEMS) if name not in elem_dict]
        if missing:
            raise UnsupportedLlamaFactoryError(f"LLaMA-Board's train tab lacks {', '.join(missing)}.")

        place_after(elem_dict["rlhf_tab"], [elem_dict["ref_tab"], elem_dict["sft_go_tab"]])
        hidden = [elem_dict[name] for name in STAGE_HIDDEN_ELEMS]
        elem_dict["training_stage"].change(
            lambda label: stage_visibility(TRAINING_STAGES[label], len(hidden)),
            [elem_dict["training_stage"]],
            [*hidden, elem_dict["ref_tab"], elem_dict["sft_go_tab"], elem_dict["track_deviation"]],
            queue=False,
        )
        return elem_dict

    train_tab.create_train_tab = create_train_tab
    train_tab._minorsft_patched = True


def patch_webui_runner(runner) -> None:
    if not _should_patch(runner, "Runner._parse_train_args"):
        return

    from .webui import add_args

    stock_parse_train_args = runner.Runner._parse_train_args

    @functools.wraps(stock_parse_train_args)
    def _parse_train_args(self, data):
        args = stock_parse_train_args(self, data)
        return add_args(args, lambda elem_id: data[self.manager.get_elem_by_id(elem_id)])

    runner.Runner._parse_train_args = _parse_train_args
    runner._minorsft_patched = True


def patch_webui_control(control) -> None:
    """Show the deviation under the live loss plot when the run logs one."""
    if not _should_patch(control, "get_trainer_info", "gr", "TRAINER_LOG"):
        return

    from .webui import deviation_log_is_current, loss_and_deviation_plot, read_deviation_log

    stock_get_trainer_info = control.get_trainer_info

    @functools.wraps(stock_get_trainer_info)
    def get_trainer_info(lang, output_path, do_train):
        running_log, running_progress, running_info = stock_get_trainer_info(lang, output_path, do_train)
        deviation_log = read_deviation_log(output_path) if do_train and "loss_viewer" in running_info else []
        if deviation_log:
            with open(os.path.join(output_path, control.TRAINER_LOG), encoding="utf-8") as f:
                trainer_log = [json.loads(line) for line in f if line.strip()]
            if deviation_log_is_current(output_path, trainer_log):  # not one a finished run left in the folder
                running_info["loss_viewer"] = control.gr.Plot(loss_and_deviation_plot(trainer_log, deviation_log))

        return running_log, running_progress, running_info

    control.get_trainer_info = get_trainer_info
    control._minorsft_patched = True


#: module name → patch, for the post-import hooks of ``_autoload``
HOOKED_MODULES = {
    "llamafactory.hparams.parser": patch_parser,
    "llamafactory.train.tuner": patch_tuner,
    "llamafactory.extras.constants": patch_constants,
    "llamafactory.webui.locales": patch_webui_locales,
    "llamafactory.webui.components.train": patch_webui_train_tab,
    "llamafactory.webui.runner": patch_webui_runner,
    "llamafactory.webui.control": patch_webui_control,
}


def register_all() -> None:
    """Patch the training modules now and the web UI's when it is imported (idempotent)."""
    import importlib

    from .hooks import install

    layout()  # an unsupported version fails here, before any hook is installed
    install()  # patches what is imported already, and hooks the rest
    for module_name in HOOKED_MODULES:
        if not module_name.startswith("llamafactory.webui"):  # importing the web UI would import gradio
            importlib.import_module(module_name)
