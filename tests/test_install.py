"""Installing this package into an environment that already has LLaMA-Factory keeps that LLaMA-Factory.

``setup.py`` requires ``llamafactory>=0.9.4``: pip must accept what is installed (main reports the pre-release
0.9.6.dev0) rather than replace it with a release from the registry.
"""

import json
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.compat
def test_pip_install_keeps_the_installed_llamafactory(tmp_path):
    # a user's environment: a fresh venv that sees this environment's packages (LLaMA-Factory among them) through a
    # .pth file, so that pip resolves against them while this environment itself stays untouched
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = (venv / "lib").glob("python*/site-packages")
    (site / "user_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    source = tmp_path / "source"  # a copy: the build must not write into the checkout other tests run from
    shutil.copytree(
        REPO / "llamafactory_minorsft", source / "llamafactory_minorsft", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("setup.py", "README.md", "llamafactory_minorsft.pth"):
        shutil.copy(REPO / name, source / name)

    python = str(venv / "bin" / "python")
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [python, "-m", "pip", "install", "--no-index", "--no-build-isolation", "--report", str(report), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    installed = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
    assert installed == ["llamafactory-minorsft"]

    probe = "import importlib.metadata as m, llamafactory; print(m.version('llamafactory'), llamafactory.__file__)"
    probed = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True)
    version, location = probed.stdout.split()
    assert version == metadata.version("llamafactory")
    assert location.startswith(sysconfig.get_paths()["purelib"])
    assert not list(site.glob("llamafactory-*.dist-info"))  # nothing of LLaMA-Factory went into the user's venv


def test_setup_refuses_an_unknown_llamafactory_version(tmp_path):
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "setup.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "LLAMAFACTORY_VERSION": "0.9.3"},
    )
    assert proc.returncode == 2
    assert "LLAMAFACTORY_VERSION=0.9.3 is not supported. Valid values: 0.9.5 (default, .venv), main" in proc.stderr
    assert "0.9.4 (.venv-lf-0.9.4)" in proc.stderr and not (REPO / ".venv-lf-0.9.3").exists()
