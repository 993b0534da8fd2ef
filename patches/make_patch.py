"""Generate (or check) the fork patches against pristine LLaMA-Factory source trees.

    python patches/make_patch.py                     # rewrite all three patches
    python patches/make_patch.py --check             # exit 1 if a committed patch differs from a fresh one
    python patches/make_patch.py --version 0.9.4     # one version only (0.9.4, 0.9.5 or main)

Pristine trees:
- a release (0.9.4, 0.9.5): the installed ``llamafactory`` distribution when it is that version, else its wheel from
  the package registry (``pip download``); every file is checked against the RECORD's sha256, so a locally
  modified install is refused;
- main: ``src/llamafactory`` of the source archive ``../shared/llamafactory-src/llamafactory-main-ff6d4d12e.tar.gz``,
  whose sha256 is checked.

The edits are the same for every version. Each is made at an anchor that must occur exactly once; the parser's
argument lists are rewritten wherever they name ``FinetuningArguments``. The stage names and labels come from
``llamafactory_minorsft`` itself, so a patch cannot drift from the plugin.
"""

import argparse
import base64
import csv
import difflib
import hashlib
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from importlib import metadata


HERE = os.path.dirname(os.path.abspath(__file__))
MARK = "# llamafactory-minorsft"
MAIN_COMMIT = "ff6d4d12e"
MAIN_ARCHIVE = os.path.join(HERE, "..", "..", "shared", "llamafactory-src", f"llamafactory-main-{MAIN_COMMIT}.tar.gz")
MAIN_ARCHIVE_SHA256 = "a557405e923e401e7f2009b07f189c735451b5d80282ef627938c1b9200d6dcd"
#: version → patch file
PATCHES = {
    "0.9.4": "llamafactory-v0.9.4-minorsft.patch",
    "0.9.5": "llamafactory-v0.9.5-minorsft.patch",
    "main": f"llamafactory-main-{MAIN_COMMIT}-minorsft.patch",
}
#: the parser lists every version has; main adds ``_TRAIN_MBRIDGE_ARGS``, and ``_TRAIN_MCA_ARGS`` is everywhere
REQUIRED_LISTS = ("_TRAIN_ARGS", "_INFER_ARGS", "_EVAL_ARGS", "_TRAIN_MCA_ARGS")


def patch_path(version: str) -> str:
    return os.path.join(HERE, PATCHES[version])


def installed_version() -> str | None:
    """The key of ``PATCHES`` that the installed LLaMA-Factory is, if any."""
    try:
        dist = metadata.distribution("llamafactory")
    except metadata.PackageNotFoundError:
        return None
    if dist.version == "0.9.6.dev0":
        return "main"
    return dist.version if dist.version in PATCHES else None


def _record_digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _write(dest: str, path: str, data: bytes) -> None:
    target = os.path.join(dest, "src", path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "wb") as f:
        f.write(data)


def _release_files(version: str):
    """(path, bytes, RECORD sha256) of every ``llamafactory/`` file of the release."""
    dist = metadata.distribution("llamafactory")
    if dist.version == version:
        for entry in dist.files:
            if entry.hash is not None:
                yield str(entry), entry.locate().read_bytes(), entry.hash.value
        return

    with tempfile.TemporaryDirectory() as tmp:  # not installed here: the registry's wheel
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", tmp]
        subprocess.run([*cmd, f"llamafactory=={version}"], check=True, stdout=subprocess.DEVNULL)
        (wheel,) = [os.path.join(tmp, name) for name in os.listdir(tmp) if name.endswith(".whl")]
        with zipfile.ZipFile(wheel) as archive:
            (record,) = [name for name in archive.namelist() if name.endswith(".dist-info/RECORD")]
            for path, digest, _ in csv.reader(io.TextIOWrapper(archive.open(record), encoding="utf-8")):
                if digest:
                    yield path, archive.read(path), digest.split("=", 1)[1]


def pristine_tree(version: str, dest: str) -> str:
    """Rebuild ``dest/src/llamafactory`` of ``version``, verified file by file; returns ``dest``."""
    if version == "main":
        with open(MAIN_ARCHIVE, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != MAIN_ARCHIVE_SHA256:
            raise SystemExit(f"{MAIN_ARCHIVE} is not LLaMA-Factory main at {MAIN_COMMIT} (sha256 differs).")
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            for member in archive.getmembers():
                path = member.name.split("/", 1)[-1]  # drop the archive's top folder
                if member.isfile() and path.startswith("src/llamafactory/"):
                    _write(dest, path[len("src/") :], archive.extractfile(member).read())
        return dest

    for path, data, digest in _release_files(version):
        if not path.startswith("llamafactory/") or "__pycache__" in path:
            continue
        if _record_digest(data) != digest:
            raise SystemExit(f"{path} differs from the llamafactory {version} release (RECORD hash); reinstall it.")
        _write(dest, path, data)
    return dest


def _swap_parser_lists(text: str) -> str:
    """``FinetuningArguments`` → ``PluginFinetuningArguments`` in every ``_*_ARGS = [...]`` list."""
    found = []

    def swap(match: re.Match) -> str:
        found.append(match.group(2))
        return match.group(1) + re.sub(r"\bFinetuningArguments\b", "PluginFinetuningArguments", match.group(3))

    text = re.sub(r"^(\s*(_\w+_ARGS) = )(\[[^\]]*\bFinetuningArguments\b[^\]]*\])", swap, text, flags=re.M)
    missing = set(REQUIRED_LISTS) - set(found)
    if missing:
        raise SystemExit(f"hparams/parser.py: {', '.join(sorted(missing))} not found with FinetuningArguments.")
    return text


def _edits() -> dict[str, list[tuple[str, str]]]:
    """File → [(anchor, replacement)]: the native additions, calling into ``llamafactory_minorsft``."""
    from llamafactory_minorsft import REFERENCE_STAGES
    from llamafactory_minorsft.webui import STAGE_LABELS

    stages = "[" + ", ".join(f'"{stage}"' for stage in REFERENCE_STAGES) + "]"
    stage_lines = "".join(f'    "{label}": "{stage}",  {MARK}\n' for label, stage in STAGE_LABELS.items())
    last_callback = "    callbacks.append(ReporterCallback(model_args, data_args, finetuning_args, generating_args))  # add to last\n\n"  # noqa: E501
    return {
        "hparams/parser.py": [
            (
                "from .finetuning_args import FinetuningArguments\n",
                "from .finetuning_args import FinetuningArguments\n"
                f"from llamafactory_minorsft.hparams import PluginFinetuningArguments  {MARK}: new stages + options\n",
            ),
            (
                '    if finetuning_args.stage != "sft":\n        if training_args.predict_with_generate:\n',
                f'    if finetuning_args.stage != "sft" and not finetuning_args.is_plugin_run:  {MARK}: SFT data options\n'
                "        if training_args.predict_with_generate:\n",
            ),
        ],
        "train/tuner.py": [
            (
                "    model_args, data_args, training_args, finetuning_args, generating_args = get_train_args(args)\n\n"
                "    callbacks.append(LogCallback())\n",
                "    model_args, data_args, training_args, finetuning_args, generating_args = get_train_args(args)\n"
                f"    if finetuning_args.is_plugin_run:  {MARK}: checked before anything loads\n"
                "        from llamafactory_minorsft.integration import verify_plugin_run\n\n"
                "        verify_plugin_run(model_args, data_args, training_args, finetuning_args)\n\n"
                "    callbacks.append(LogCallback())\n",
            ),
            (
                last_callback + "    if ",
                last_callback
                + f"    if finetuning_args.is_plugin_run:  {MARK}: minorsft, sft_dpo, sft_go, track_deviation\n"
                "        from llamafactory_minorsft.train.tuner import run_stage\n\n"
                "        run_stage(model_args, data_args, training_args, finetuning_args, callbacks)\n"
                "    elif ",
            ),
            (
                "        if dist.is_initialized():\n            dist.destroy_process_group()\n",
                f"        if finetuning_args.is_plugin_run:  {MARK}: avoids Gloo's exit race, see its docstring\n"
                "            from llamafactory_minorsft.train.teardown import shut_down_process_group\n\n"
                "            shut_down_process_group()\n"
                "        elif dist.is_initialized():\n            dist.destroy_process_group()\n",
            ),
        ],
        "extras/constants.py": [
            ('    "Pre-Training": "pt",\n}\n', '    "Pre-Training": "pt",\n' + stage_lines + "}\n"),
        ],
        "webui/runner.py": [
            (
                '        elif args["stage"] in ["dpo", "kto"]:\n',
                f'        elif args["stage"] in {stages}:  {MARK}: β of MinorSFT / SFT using DPO\n'
                '            args["pref_beta"] = get("train.pref_beta")\n'
                '        elif args["stage"] in ["dpo", "kto"]:\n',
            ),
        ],
    }


def make_patch(version: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        root = pristine_tree(version, tmp)
        chunks = []
        for rel, edits in _edits().items():
            path = os.path.join(root, "src", "llamafactory", rel)
            with open(path, encoding="utf-8") as f:
                before = f.read()
            after = before
            for anchor, replacement in edits:
                if after.count(anchor) != 1:
                    found = after.count(anchor)
                    raise SystemExit(f"{version} {rel}: anchor found {found} times, expected once:\n{anchor}")
                after = after.replace(anchor, replacement)
            if rel == "hparams/parser.py":
                after = _swap_parser_lists(after)
            name = f"src/llamafactory/{rel}"
            chunks.append(f"diff --git a/{name} b/{name}\n")
            chunks += difflib.unified_diff(
                before.splitlines(keepends=True), after.splitlines(keepends=True), f"a/{name}", f"b/{name}", n=3
            )
        return "".join(chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if a committed patch is not what we generate")
    parser.add_argument("--version", choices=list(PATCHES), action="append", help="only this version (repeatable)")
    args = parser.parse_args()
    stale = []
    for version in args.version or list(PATCHES):
        patch, path = make_patch(version), patch_path(version)
        if not args.check:
            with open(path, "w", encoding="utf-8") as f:
                f.write(patch)
            print(f"wrote {path}")
            continue

        with open(path, encoding="utf-8") as f:
            if f.read() != patch:
                stale.append(path)
            else:
                print(f"{path} is up to date")
    if stale:
        sys.exit(f"out of date: {', '.join(stale)}. Run `python patches/make_patch.py` and commit them.")


if __name__ == "__main__":
    main()
