"""``precompute_ref_logps``: attach cached or freshly computed reference log-probs to the data sets.

The values travel as a ``ref_logps`` column of the tokenized data set (see ``columns``), plus a
``ref_token_logps`` column of per-token values where SFT-GO's Rho-1 grouping needs them.
"""

import os
import time
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist

from .. import reference_cache
from .columns import REF_LOGPS, REF_TOKEN_LOGPS


if TYPE_CHECKING:
    from datasets import Dataset

    from .trainer import ReferenceSFTTrainer


def reference_identity(model_args, data_args, finetuning_args) -> dict[str, Any]:
    """What the reference log-probs depend on besides the tokenized data (see ``reference_cache``)."""
    if finetuning_args.ref_model is not None:
        model, adapters, quantization = (
            finetuning_args.ref_model, finetuning_args.ref_model_adapters, finetuning_args.ref_model_quantization_bit
        )  # fmt: skip
    else:  # the initial model; for LoRA the base without adapters
        adapters = None if finetuning_args.finetuning_type == "lora" else model_args.adapter_name_or_path
        model, quantization = model_args.model_name_or_path, model_args.quantization_bit

    adapters = adapters if isinstance(adapters, list) or adapters is None else [adapters]
    return {
        "model": reference_cache.path_fingerprint(model),
        "adapters": [reference_cache.path_fingerprint(a) for a in adapters or []],
        "quantization_bit": quantization,
        "compute_dtype": str(model_args.compute_dtype),
        "template": data_args.template,
        "cutoff_len": data_args.cutoff_len,
        "per_token": wants_token_logps(finetuning_args),
    }


def wants_token_logps(finetuning_args) -> bool:
    """SFT-GO's Rho-1 grouping needs every answer token's reference log-prob, not only their sum."""
    return finetuning_args.stage == "sft_go" and finetuning_args.sft_go_grouping == "rho1"


def _split_datasets(dataset_module: dict[str, Any]) -> dict[str, "Dataset"]:
    splits = {}
    if dataset_module.get("train_dataset") is not None:
        splits["train"] = dataset_module["train_dataset"]

    eval_dataset = dataset_module.get("eval_dataset")
    if isinstance(eval_dataset, dict):
        splits.update({f"eval_{name}": dataset for name, dataset in eval_dataset.items()})
    elif eval_dataset is not None:
        splits["eval"] = eval_dataset

    return splits


def _all_processes_agree(flag: bool) -> bool:
    """True only if ``flag`` is True on every process (a cache hit must be collective, or the pass deadlocks)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag

    tensor = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return bool(tensor.item())


class PrecomputedReference:
    """Per-split cache look-up before the reference loads, and the pass for the splits that missed."""

    def __init__(self, model_args, data_args, finetuning_args, dataset_module: dict[str, Any]) -> None:
        self.splits = _split_datasets(dataset_module)
        self.per_token = wants_token_logps(finetuning_args)
        identity = reference_identity(model_args, data_args, finetuning_args)
        cache_dir = finetuning_args.ref_logps_cache_dir or reference_cache.default_cache_dir()
        self.paths = {
            split: os.path.join(cache_dir, f"{reference_cache.cache_key(identity, dataset)}.pt")
            for split, dataset in self.splits.items()
        }
        self.values: dict[str, Optional[dict[str, torch.Tensor]]] = {}
        for split, dataset in self.splits.items():
            cached = reference_cache.load(self.paths[split], len(dataset), per_token=self.per_token)
            self.values[split] = cached if _all_processes_agree(cached is not None) else None

    @property
    def needs_reference_model(self) -> bool:
        return any(value is None for value in self.values.values())

    def attach(self, trainer: "ReferenceSFTTrainer") -> dict[str, float]:
        """Fill the missing splits with one reference pass each (cached), add the columns, release the reference."""
        metrics = {}
        for split, dataset in self.splits.items():
            if self.values[split] is None:
                start = time.perf_counter()
                values = trainer.compute_reference_logps(
                    dataset, desc=f"Reference log-probs ({split})", per_token=self.per_token
                )
                metrics[f"ref_precompute_{split}_runtime"] = round(time.perf_counter() - start, 4)
                if trainer.is_world_process_zero():
                    reference_cache.save(self.paths[split], values["logps"], values["num_tokens"], {"split": split},
                                         token_logps=values.get("token_logps"))  # fmt: skip
                self.values[split] = values

        trainer.accelerator.wait_for_everyone()
        columns = {split: self._with_columns(dataset, self.values[split]) for split, dataset in self.splits.items()}
        if "train" in columns:
            trainer.train_dataset = columns["train"]
        if "eval" in columns:
            trainer.eval_dataset = columns["eval"]
        elif any(split.startswith("eval_") for split in columns):
            trainer.eval_dataset = {split[len("eval_") :]: columns[split] for split in columns if split.startswith("eval_")}

        trainer.release_reference()
        return metrics

    def _with_columns(self, dataset: "Dataset", values: dict[str, torch.Tensor]) -> "Dataset":
        dataset = dataset.add_column(REF_LOGPS, values["logps"].tolist())
        if self.per_token:  # split the flat per-token values back into one list per sample
            per_sample = values["token_logps"].split(values["num_tokens"].tolist())
            dataset = dataset.add_column(REF_TOKEN_LOGPS, [row.tolist() for row in per_sample])
        return dataset
