"""Generate (or check) the fork patch against LLaMA-Factory v0.9.5's source tree.

    .venv/bin/python patches/make_patch.py            # rewrite patches/llamafactory-v0.9.5-minorsft.patch
    .venv/bin/python patches/make_patch.py --check    # exit 1 if the committed patch differs from a fresh one

The pristine tree is rebuilt from the installed ``llamafactory==0.9.5`` wheel: every file of its RECORD is copied
to ``src/llamafactory/...`` and checked against the RECORD's sha256, so a locally modified install is refused.
The edits below are made on a copy, each at an anchor that must occur exactly once; the stage names and labels
come from ``llamafactory_minorsft`` itself, so the patch cannot drift from the plugin.
"""

import argparse
import base64
import difflib
import hashlib
import os
import shutil
import sys
import tempfile
from importlib import metadata


VERSION = "0.9.5"
HERE = os.path.dirname(os.path.abspath(__file__))
PATCH = os.path.join(HERE, f"llamafactory-v{VERSION}-minorsft.patch")
MARK = "# llamafactory-minorsft"


def pristine_tree(dest: str) -> str:
    """Rebuild ``dest/src/llamafactory`` from the installed release, verified file by file; returns ``dest``."""
    dist = metadata.distribution("llamafactory")
    if dist.version != VERSION:
        raise SystemExit(f"llamafactory {dist.version} is installed; the fork patch is made against {VERSION}.")

    for entry in dist.files:
        path = str(entry)
        if not path.startswith("llamafactory/") or "__pycache__" in path:
            continue
        source = entry.locate()
        if entry.hash is not None:
            with open(source, "rb") as f:
                digest = base64.urlsafe_b64encode(hashlib.sha256(f.read()).digest()).rstrip(b"=").decode()
            if digest != entry.hash.value:
                raise SystemExit(f"{source} differs from the llamafactory {VERSION} release (RECORD hash); reinstall it.")
        target = os.path.join(dest, "src", path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(source, target)

    return dest


def _edits() -> dict[str, list[tuple[str, str]]]:
    """File → [(anchor, replacement)]: the native additions, calling into ``llamafactory_minorsft``."""
    from llamafactory_minorsft import REFERENCE_SFT_STAGES
    from llamafactory_minorsft.webui import STAGE_LABELS

    stages = "[" + ", ".join(f'"{stage}"' for stage in REFERENCE_SFT_STAGES) + "]"
    stage_lines = "".join(f'    "{label}": "{stage}",  {MARK}\n' for label, stage in STAGE_LABELS.items())
    return {
        "hparams/parser.py": [
            (
                "from .finetuning_args import FinetuningArguments\n",
                "from .finetuning_args import FinetuningArguments\n"
                f"from llamafactory_minorsft.hparams import ReferenceSFTFinetuningArguments  {MARK}: new stages + options\n",
            ),
            ("    TrainingArguments,\n    FinetuningArguments,\n    GeneratingArguments,\n]",
             "    TrainingArguments,\n    ReferenceSFTFinetuningArguments,\n    GeneratingArguments,\n]"),
            ("_INFER_ARGS = [ModelArguments, DataArguments, FinetuningArguments, GeneratingArguments]",
             "_INFER_ARGS = [ModelArguments, DataArguments, ReferenceSFTFinetuningArguments, GeneratingArguments]"),
            ("_EVAL_ARGS = [ModelArguments, DataArguments, EvaluationArguments, FinetuningArguments]",
             "_EVAL_ARGS = [ModelArguments, DataArguments, EvaluationArguments, ReferenceSFTFinetuningArguments]"),
        ],
        "train/tuner.py": [
            (
                "    model_args, data_args, training_args, finetuning_args, generating_args = get_train_args(args)\n\n"
                "    callbacks.append(LogCallback())\n",
                "    model_args, data_args, training_args, finetuning_args, generating_args = get_train_args(args)\n"
                f"    if finetuning_args.uses_reference_sft:  {MARK}: checked before anything loads\n"
                "        from llamafactory_minorsft.integration import verify_reference_sft_run\n\n"
                "        verify_reference_sft_run(model_args, data_args, training_args, finetuning_args)\n\n"
                "    callbacks.append(LogCallback())\n",
            ),
            (
                '    if finetuning_args.stage == "sft" and finetuning_args.use_hyper_parallel:\n',
                f"    if finetuning_args.uses_reference_sft:  {MARK}: minorsft, sft_dpo, sft_go, track_deviation\n"
                "        from llamafactory_minorsft.train.workflow import run_reference_sft\n\n"
                "        run_reference_sft(model_args, data_args, training_args, finetuning_args, callbacks)\n"
                '    elif finetuning_args.stage == "sft" and finetuning_args.use_hyper_parallel:\n',
            ),
            (
                "        if dist.is_initialized():\n            dist.destroy_process_group()\n",
                f"        if finetuning_args.uses_reference_sft:  {MARK}: avoids Gloo's exit race, see its docstring\n"
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


def make_patch() -> str:
    with tempfile.TemporaryDirectory() as tmp:
        root = pristine_tree(tmp)
        chunks = []
        for rel, edits in _edits().items():
            path = os.path.join(root, "src", "llamafactory", rel)
            with open(path, encoding="utf-8") as f:
                before = f.read()
            after = before
            for anchor, replacement in edits:
                if after.count(anchor) != 1:
                    raise SystemExit(f"{rel}: anchor found {after.count(anchor)} times, expected once:\n{anchor}")
                after = after.replace(anchor, replacement)
            name = f"src/llamafactory/{rel}"
            chunks.append(f"diff --git a/{name} b/{name}\n")
            chunks += difflib.unified_diff(
                before.splitlines(keepends=True), after.splitlines(keepends=True), f"a/{name}", f"b/{name}", n=3
            )
        return "".join(chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if the committed patch is not what we generate")
    args = parser.parse_args()
    patch = make_patch()
    if args.check:
        with open(PATCH, encoding="utf-8") as f:
            if f.read() != patch:
                sys.exit(f"{PATCH} is out of date: run .venv/bin/python patches/make_patch.py and commit it.")
        print(f"{PATCH} is up to date")
        return

    with open(PATCH, "w", encoding="utf-8") as f:
        f.write(patch)
    print(f"wrote {PATCH}")


if __name__ == "__main__":
    main()
