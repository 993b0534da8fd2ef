"""Callbacks of this package's workflow."""

import json
import os

from transformers import TrainerCallback


DEVIATION_LOG = "trainer_deviation.jsonl"  # beside LLaMA-Factory's trainer_log.jsonl, read by the live plot


class DeviationLogCallback(TrainerCallback):
    r"""Append ``deviation``/``eval_deviation`` of every log to ``trainer_deviation.jsonl`` (main process).

    LLaMA-Factory's ``trainer_log.jsonl`` holds a fixed set of keys; this file beside it feeds LLaMA-Board's
    live deviation plot.
    """

    def on_train_begin(self, args, state, control, **kwargs):
        path = os.path.join(args.output_dir, DEVIATION_LOG)
        if args.should_save and state.global_step == 0 and os.path.exists(path):
            os.remove(path)  # a fresh run; a resumed one keeps appending, like trainer_log.jsonl

    def on_log(self, args, state, control, logs=None, **kwargs):
        entry = {key: logs[key] for key in ("deviation", "eval_deviation") if key in (logs or {})}
        if args.should_save and entry:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, DEVIATION_LOG), "a", encoding="utf-8") as f:
                f.write(json.dumps({"current_steps": state.global_step, **entry}) + "\n")
