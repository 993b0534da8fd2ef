"""Registration: automatic in every process, switchable off, explicit and idempotent, loud on other versions."""

import subprocess
import sys
import textwrap

import pytest

from conftest import base_config, cli_env, run_cli, step_logs


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=cli_env(**env), capture_output=True, text=True, timeout=600
    )


def test_env_var_turns_automatic_registration_off(tiny, tmp_path):
    proc = run_cli(
        base_config(tiny, tmp_path / "out"), tmp_path, check=False, env=cli_env(LLAMAFACTORY_MINORSFT_DISABLE="1")
    )
    assert proc.returncode != 0
    assert "Unknown task: minorsft" in proc.stderr  # LLaMA-Factory's own error: the stage is not registered


def test_explicit_register_is_idempotent_and_trains(tiny, tmp_path):
    config = base_config(tiny, tmp_path / "out", max_steps=2)
    proc = run_python(
        f"""
        import llamafactory_minorsft
        llamafactory_minorsft.register()
        llamafactory_minorsft.register()
        from llamafactory.hparams import parser
        from llamafactory.train import tuner
        from llamafactory_minorsft.hparams import PluginFinetuningArguments
        assert parser._TRAIN_ARGS.count(PluginFinetuningArguments) == 1
        assert not hasattr(tuner._training_function.__wrapped__, "__wrapped__"), "wrapped twice"
        tuner.run_exp({config!r})
    """,
        LLAMAFACTORY_MINORSFT_DISABLE="1",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "deviation" in step_logs(tmp_path / "out")[0]


@pytest.mark.compat
def test_untested_llamafactory_version_fails_loudly_without_half_patching():
    proc = run_python(
        """
        import llamafactory.extras.env as env
        env.VERSION = "0.9.7"
        import llamafactory_minorsft
        from llamafactory_minorsft.integration import UnsupportedLlamaFactoryError
        try:
            llamafactory_minorsft.register()
        except UnsupportedLlamaFactoryError as err:
            print("ERROR:", err)
        from llamafactory.hparams import parser, FinetuningArguments
        assert FinetuningArguments in parser._TRAIN_ARGS, "half-patched"
    """,
        LLAMAFACTORY_MINORSFT_DISABLE="1",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("ERROR:")]
    assert line == (
        "ERROR: llamafactory-minorsft does not support LLaMA-Factory 0.9.7; it supports 0.9.4, 0.9.5, main "
        "(0.9.6.dev0, commit ff6d4d12e). Install one of those, or set LLAMAFACTORY_MINORSFT_ALLOW_UNTESTED=1 to try "
        "this version anyway (every patch target is still checked), or set LLAMAFACTORY_MINORSFT_DISABLE=1 to run "
        "LLaMA-Factory without the plugin."
    )

    # automatic registration: the import of LLaMA-Factory itself fails with the same line
    proc = run_python("""
        import llamafactory.extras.env as env
        env.VERSION = "0.9.7"
        import llamafactory.train.tuner
    """)
    assert proc.returncode != 0 and "does not support LLaMA-Factory 0.9.7; it supports 0.9.4" in proc.stderr


@pytest.mark.compat
def test_allow_untested_patches_with_a_warning_and_still_checks_every_target(tiny, tmp_path):
    from llamafactory.extras.env import VERSION

    # an untested version right after the installed one: the layout of the installed one must serve
    untested = {"0.9.4": "0.9.4.post1", "0.9.5": "0.9.5.post1", "0.9.6.dev0": "0.9.6.dev1"}[VERSION]
    config = base_config(tiny, tmp_path / "out", max_steps=1)
    proc = run_python(
        f"""
        import llamafactory.extras.env as env
        env.VERSION = {untested!r}
        import llamafactory_minorsft
        llamafactory_minorsft.register()
        from llamafactory.train import tuner
        tuner.run_exp({config!r})
    """,
        LLAMAFACTORY_MINORSFT_DISABLE="1",
        LLAMAFACTORY_MINORSFT_ALLOW_UNTESTED="1",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"LLAMAFACTORY_MINORSFT_ALLOW_UNTESTED=1: patching LLaMA-Factory {untested}," in proc.stderr
    assert "deviation" in step_logs(tmp_path / "out")[0]

    # a missing patch target is still refused, and that module is left as it was
    proc = run_python(
        f"""
        import llamafactory.extras.env as env
        env.VERSION = {untested!r}
        from llamafactory.hparams import parser, FinetuningArguments
        del parser._EVAL_ARGS
        import llamafactory_minorsft
        from llamafactory_minorsft.integration import UnsupportedLlamaFactoryError
        try:
            llamafactory_minorsft.register()
        except UnsupportedLlamaFactoryError as err:
            print("ERROR:", err)
        assert FinetuningArguments in parser._TRAIN_ARGS, "half-patched"
    """,
        LLAMAFACTORY_MINORSFT_DISABLE="1",
        LLAMAFACTORY_MINORSFT_ALLOW_UNTESTED="1",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ERROR: llamafactory.hparams.parser lacks _EVAL_ARGS" in proc.stdout
    assert "Nothing was patched" in proc.stdout


@pytest.mark.compat
def test_start_up_imports_only_the_hook_and_every_hooked_module_is_patched():
    """Start-up imports the hook alone; importing LLaMA-Factory's hooked modules patches each of them.

    The finder's module names are those of ``integration.HOOKED_MODULES``.
    """
    proc = run_python(
        """
        import sys
        print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] in
              ("llamafactory_minorsft", "llamafactory", "torch", "transformers", "wrapt")))
        from llamafactory_minorsft.hooks import HOOKED, PostImportFinder
        assert isinstance(sys.meta_path[0], PostImportFinder)
        import llamafactory.hparams.parser, llamafactory.train.tuner, llamafactory.extras.constants
        from llamafactory_minorsft.integration import HOOKED_MODULES
        assert set(HOOKED_MODULES) == HOOKED, set(HOOKED_MODULES) ^ HOOKED
        from llamafactory.hparams import parser
        from llamafactory.train import tuner
        from llamafactory.extras import constants
        assert parser._minorsft_patched and tuner._minorsft_patched and "MinorSFT" in constants.TRAINING_STAGES
    """
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("LOADED")]
    assert line == (
        "LOADED ['llamafactory_minorsft', 'llamafactory_minorsft._autoload', 'llamafactory_minorsft.hooks', "
        "'llamafactory_minorsft.stages']"
    )


def test_importing_this_package_s_hparams_first_still_patches_the_parser():
    """This package's hparams imported before LLaMA-Factory still gets the parser patched.

    Its own import of LLaMA-Factory's hparams brings the parser in, whose patch imports this package's hparams: it
    gets a complete copy, the one that the first import returns.
    """
    proc = run_python(
        """
        import sys
        from llamafactory_minorsft import hparams
        from llamafactory.hparams import parser
        assert hparams is sys.modules["llamafactory_minorsft.hparams"]
        assert hparams.PluginFinetuningArguments in parser._TRAIN_ARGS, parser._TRAIN_ARGS
        assert parser._minorsft_patched and hasattr(parser._parse_train_args, "__wrapped__")
        print("patched")
        """
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "patched", proc.stderr[-2000:]
