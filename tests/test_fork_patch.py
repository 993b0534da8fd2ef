"""The fork patches: up to date, and training with the plugin's hooks off.

The fork patches: all three up to date with the plugin; the one of the installed LLaMA-Factory applies to its
pristine tree and trains with the plugin's automatic registration off, so that the patched LLaMA-Factory code path
is the one that runs (``scripts/test.sh`` runs this on every supported version).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import base_config, cli_env, run_cli, step_logs


PATCHES = Path(__file__).resolve().parents[1] / "patches"
sys.path.insert(0, str(PATCHES))
import make_patch  # noqa: E402


INSTALLED = make_patch.installed_version()


def test_committed_patches_are_what_the_generator_makes(tmp_path):
    """All three, against their pristine trees: the releases' wheels and the main source archive."""
    proc = subprocess.run(
        [sys.executable, str(PATCHES / "make_patch.py"), "--check"],
        capture_output=True,
        text=True,
        env=cli_env(LLAMAFACTORY_MINORSFT_DISABLE="1"),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def patched_tree(tmp_path_factory) -> Path:
    root = Path(make_patch.pristine_tree(INSTALLED, str(tmp_path_factory.mktemp(f"llamafactory-{INSTALLED}"))))
    patch = make_patch.patch_path(INSTALLED)
    if shutil.which("patch"):  # the other documented way applies cleanly too (dry run)
        dry = subprocess.run(["patch", "-p1", "--dry-run", "-i", patch], cwd=root, capture_output=True, text=True)
        assert dry.returncode == 0, dry.stdout + dry.stderr
    proc = subprocess.run(["git", "apply", "--verbose", patch], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root


def fork_env(tree: Path, hooks: bool = False) -> dict:
    env = cli_env(LLAMAFACTORY_MINORSFT_DISABLE="0" if hooks else "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree / "src"), env.get("PYTHONPATH")]))
    return env


@pytest.mark.compat
@pytest.mark.parametrize("hooks", [False, True], ids=["hooks_off", "hooks_on"])
def test_patched_tree_runs_minorsft_with_the_plugin_hooks_off_or_on(tiny, tmp_path, patched_tree, hooks):
    """Hooks off is the documented way; with them on, the plugin sees the fork and leaves its parser and tuner be."""
    env = fork_env(patched_tree, hooks)
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            # this package's hparams first: the fork's parser, which imports it, must get a complete copy
            "import llamafactory_minorsft.hparams as h, llamafactory.train.tuner as t, llamafactory.hparams.parser as p,"
            " llamafactory.extras.constants as c; print(t.__file__);"
            " print(getattr(t, '_minorsft_fork', False) and getattr(p, '_minorsft_fork', False));"
            " print(hasattr(t._training_function, '__wrapped__')); print(c.TRAINING_STAGES['MinorSFT']);"
            " print(h.PluginFinetuningArguments in p._TRAIN_ARGS)",
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    tuner_file, fork_seen, wrapped, stage, ours = probe.stdout.split()
    assert tuner_file.startswith(str(patched_tree)) and (stage, ours) == ("minorsft", "True")
    assert (fork_seen, wrapped) == (str(hooks), "False")  # the fork's own tuner runs either way

    out = tmp_path / "out"
    config = base_config(tiny, out, dataset="minorsft_demo", cutoff_len=128, max_steps=2, learning_rate=1e-2)
    run_cli(dict(config, train_on_prompt=True), tmp_path, env=env)  # SFT's data options reach the patched stages
    logs = step_logs(out)
    assert len(logs) == 2 and all("deviation" in entry and "coef" in entry for entry in logs)

    # the same bad input is still refused early by the patched tuner
    bad = run_cli(base_config(tiny, tmp_path / "bad", pref_beta=0.0), tmp_path / "bad_run", env=env, check=False)
    assert bad.returncode != 0 and "`pref_beta`" in bad.stderr and not (tmp_path / "bad").exists()
