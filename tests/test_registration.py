"""Registration: automatic in every process, switchable off, explicit and idempotent, loud on other versions."""

import subprocess
import sys
import textwrap

from conftest import base_config, cli_env, run_cli, step_logs


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=cli_env(**env), capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def test_env_var_turns_automatic_registration_off(tiny, tmp_path):
    proc = run_cli(base_config(tiny, tmp_path / "out"), tmp_path, check=False,
                   env=cli_env(LLAMAFACTORY_MINORSFT_DISABLE="1"))  # fmt: skip
    assert proc.returncode != 0
    assert "Unknown task: minorsft" in proc.stderr  # LLaMA-Factory's own error: the stage is not registered


def test_explicit_register_is_idempotent_and_trains(tiny, tmp_path):
    config = base_config(tiny, tmp_path / "out", max_steps=2)
    proc = run_python(f"""
        import llamafactory_minorsft
        llamafactory_minorsft.register()
        llamafactory_minorsft.register()
        from llamafactory.hparams import parser
        from llamafactory.train import tuner
        from llamafactory_minorsft.hparams import ReferenceSFTFinetuningArguments
        assert parser._TRAIN_ARGS.count(ReferenceSFTFinetuningArguments) == 1
        assert not hasattr(tuner._training_function.__wrapped__, "__wrapped__"), "wrapped twice"
        tuner.run_exp({config!r})
    """, LLAMAFACTORY_MINORSFT_DISABLE="1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "deviation" in step_logs(tmp_path / "out")[0]


def test_untested_llamafactory_version_fails_loudly_without_half_patching():
    proc = run_python("""
        import llamafactory.extras.env as env
        env.VERSION = "0.9.6"
        import llamafactory_minorsft
        from llamafactory_minorsft.integration import UnsupportedLlamaFactoryError
        try:
            llamafactory_minorsft.register()
        except UnsupportedLlamaFactoryError as err:
            print("ERROR:", err)
        from llamafactory.hparams import parser, FinetuningArguments
        assert FinetuningArguments in parser._TRAIN_ARGS, "half-patched"
    """, LLAMAFACTORY_MINORSFT_DISABLE="1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ERROR: llamafactory-minorsft supports LLaMA-Factory 0.9.5 only, but LLaMA-Factory 0.9.6" in proc.stdout

    # automatic registration: the import of LLaMA-Factory itself fails, naming the supported version
    proc = run_python("""
        import llamafactory.extras.env as env
        env.VERSION = "0.9.6"
        import llamafactory.train.tuner
    """)
    assert proc.returncode != 0 and "supports LLaMA-Factory 0.9.5 only" in proc.stderr
