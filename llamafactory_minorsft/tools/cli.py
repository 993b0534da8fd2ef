"""``llamafactory-minorsft`` console script: ``tiny``, ``demo``, ``grid`` and ``eval-mc``."""

import argparse
import os
import sys


def main(argv=None) -> int:
    try:
        return _main(argv)
    except ValueError as err:  # bad input: one clear line, no traceback
        print(f"llamafactory-minorsft: error: {err}", file=sys.stderr)
        return 2


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="llamafactory-minorsft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("tiny", help="build a tiny Qwen2 model, tokenizer and instruction data, offline")
    tiny.add_argument("output_dir")
    tiny.add_argument("--num-samples", type=positive_int, default=256)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--hidden-size", type=positive_int, default=64)
    tiny.add_argument("--num-layers", type=positive_int, default=2)
    tiny.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the saved weights' dtype")
    demo = sub.add_parser("demo", help="train SFT, MinorSFT and SFT-using-DPO on the tiny model and compare")
    demo.add_argument("--output-dir", default="demo_output")
    demo.add_argument(
        "--examples-dir", default="examples_yaml/tiny", help="the tiny configs (from the repository root)"
    )
    grid = sub.add_parser("grid", help="run a hyperparameter grid of LLaMA-Factory trainings, evaluate, plot")
    grid.add_argument("grid_file")
    grid.add_argument("--output-dir", help="overrides the grid file's output_dir")
    grid.add_argument("--dry-run", action="store_true", help="print the runs and exit")
    mc = sub.add_parser("eval-mc", help="multiple-choice accuracy on local ceval-layout files (CSV/JSON/JSONL)")
    mc.add_argument("--model", required=True, help="model path (for LoRA: the base model)")
    mc.add_argument("--adapter", help="LoRA adapter path")
    mc.add_argument("--template", required=True, help="LLaMA-Factory chat template, e.g. qwen")
    mc.add_argument(
        "--prompt",
        choices=["ceval", "instruction"],
        default="ceval",
        help="the paper's ceval-exam prompt, or its FinanceIQ/fineval instruction",
    )
    mc.add_argument("--batch-size", type=positive_int, default=8)
    mc.add_argument("--output", help="write the results as JSON here")
    mc.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    # the tiny model has 4 attention heads, and rotary embeddings need an even head size
    if args.command == "tiny" and args.hidden_size % 8:
        parser.error(
            f"tiny --hidden-size: must be a multiple of 8 (4 attention heads of an even size), got {args.hidden_size}"
        )

    if args.command == "grid":
        from .grid import run_grid

        return run_grid(args.grid_file, args.output_dir, args.dry_run)

    if args.command == "eval-mc":
        import json

        from ..paths import looks_like_local_path
        from .eval_mc import MultipleChoiceScorer, evaluate_files, format_table, load_questions

        for path in args.files:  # a bad file fails before the model loads
            load_questions(path)
        stems = [os.path.splitext(os.path.basename(path))[0] for path in args.files]
        if len(set(stems)) != len(stems):
            raise ValueError("eval-mc: two files of one name; their results are keyed by name. Rename one.")
        if args.output and os.path.isdir(args.output):
            raise ValueError(f"eval-mc --output {args.output}: is a directory. Name the JSON file to write.")
        if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
            raise ValueError(f"eval-mc --output {args.output}: its directory does not exist. Create it first.")
        for option, path in (("--model", args.model), ("--adapter", args.adapter)):
            if path and looks_like_local_path(path) and not os.path.isdir(os.path.expanduser(path)):
                raise ValueError(f"eval-mc {option} {path}: no such directory.")
        try:
            scorer = MultipleChoiceScorer(
                os.path.expanduser(args.model),
                args.template,
                args.adapter and os.path.expanduser(args.adapter),
                args.batch_size,
            )
        except OSError as err:  # LLaMA-Factory's "Failed to load tokenizer." keeps its reason in __cause__
            reason = str(err.__cause__ or err).strip().splitlines()[0]
            adapter = f" with --adapter {args.adapter}" if args.adapter else ""
            raise ValueError(f"eval-mc --model {args.model}{adapter}: cannot be loaded: {reason}") from None
        results = evaluate_files(scorer, args.files, args.prompt)
        print(format_table(results))
        if args.output:
            with open(args.output, "w", encoding="utf-8") as f:
                json.dump(results, f, indent=2)
        return 0

    if args.command == "tiny":
        from .tiny import build_tiny_setup

        try:
            paths = build_tiny_setup(
                args.output_dir,
                seed=args.seed,
                num_samples=args.num_samples,
                hidden_size=args.hidden_size,
                intermediate_size=2 * args.hidden_size,
                num_hidden_layers=args.num_layers,
                dtype=args.dtype,
            )
        except OSError as err:
            raise ValueError(f"tiny {args.output_dir}: cannot write there: {err}") from None
        for name, path in paths.items():
            print(f"{name}: {path}")
        return 0

    from .demo import run_demo

    return run_demo(args.output_dir, args.examples_dir)


if __name__ == "__main__":
    sys.exit(main())
