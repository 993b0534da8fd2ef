"""Callbacks of this package's workflow."""

import json
import os

from transformers import TrainerCallback


DEVIATION_LOG = "trainer_deviation.jsonl"  # beside LLaMA-Factory's trainer_log.jsonl, read by the live plot


class DeviationLogCallback(TrainerCallback):
    r"""Append the deviations of every log to ``trainer_deviation.jsonl`` (main process).

    ``deviation``, ``eval_deviation`` and, with ``eval_on_each_dataset``, ``eval_<name>_deviation``. LLaMA-Factory's
    ``trainer_log.jsonl`` holds a fixed set of keys; this file beside it feeds LLaMA-Board's live deviation plot.
    """

    def on_init_end(self, args, state, control, **kwargs):
        if args.should_save and getattr(args, "overwrite_output_dir", False):
            self.remove(args)  # as LLaMA-Factory's LogCallback does with trainer_log.jsonl (an eval-only run too)

    def on_train_begin(self, args, state, control, **kwargs):
        path = os.path.join(args.output_dir, DEVIATION_LOG)
        if args.should_save and state.global_step == 0:
            self.remove(args)  # a fresh run; a resumed one keeps appending, like trainer_log.jsonl
        elif args.should_save and os.path.exists(path):
            os.utime(path)  # the live plot shows a log written since the run (re)started: this one is the run's

    @staticmethod
    def remove(args) -> None:
        path = os.path.join(args.output_dir, DEVIATION_LOG)
        if os.path.exists(path):
            os.remove(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        entry = {
            key: value
            for key, value in (logs or {}).items()
            if key == "deviation" or (key.startswith("eval_") and key.endswith("deviation"))
        }
        if args.should_save and entry:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, DEVIATION_LOG), "a", encoding="utf-8") as f:
                f.write(json.dumps({"current_steps": state.global_step, **entry}) + "\n")
