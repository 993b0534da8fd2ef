"""``llamafactory-minorsft`` console script: ``tiny`` (build the offline tiny model and data) and ``demo``."""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="llamafactory-minorsft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("tiny", help="build a tiny Qwen2 model, tokenizer and instruction data, offline")
    tiny.add_argument("output_dir")
    tiny.add_argument("--num-samples", type=int, default=256)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--hidden-size", type=int, default=64)
    tiny.add_argument("--num-layers", type=int, default=2)
    demo = sub.add_parser("demo", help="train SFT, MinorSFT and SFT-using-DPO on the tiny model and compare")
    demo.add_argument("--output-dir", default="demo_output")
    demo.add_argument("--examples-dir", default="examples_yaml/tiny")
    args = parser.parse_args(argv)

    if args.command == "tiny":
        from .tiny import build_tiny_setup

        paths = build_tiny_setup(
            args.output_dir, seed=args.seed, num_samples=args.num_samples, hidden_size=args.hidden_size,
            intermediate_size=2 * args.hidden_size, num_hidden_layers=args.num_layers,
        )  # fmt: skip
        for name, path in paths.items():
            print(f"{name}: {path}")
        return 0

    from .demo import run_demo

    return run_demo(args.output_dir, args.examples_dir)


if __name__ == "__main__":
    sys.exit(main())
