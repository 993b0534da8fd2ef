"""Command-line tools around LLaMA-Factory runs: the tiny offline set-up, the demo, grids, evaluation, figures."""
