"""On-disk cache of precomputed reference log-probs (``precompute_ref_logps: true``).

For a fixed data set and a frozen reference, log πref(y|x) of each sample never changes, so one no-grad
pass before training replaces the reference forward of every step. The cache key covers everything the
values depend on: the reference weights (file names, sizes and modification times, plus config
contents), adapters and quantisation, the precision set-up, the template, and the tokenized samples
themselves (a digest of every sample's input_ids and labels, as a set: the samples of rows packed by `neat_packing`
count one by one, so packed and unpacked runs of the same data share an entry). A changed input gives another key;
a stale cache is never reused. Files are written atomically and checked on load, so a partial or corrupt file is
detected and rebuilt.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..losses import IGNORE_INDEX
from ..stages import needs_token_ref_logps
from .packing import dataset_samples


#: bump when the stored values or their meaning change (2: the pass runs under training's autocast; 3: one entry per
#: sample, keyed by the set of samples and stored in the order of their digests, so packed and unpacked runs share it;
#: 4: a LoRA run's key lists the adapters merged into its base; 5: files of format 4 may hold the values of a
#: length-grouped pass, attached to other samples)
CACHE_FORMAT = 5
CACHE_ENV = "LLAMAFACTORY_MINORSFT_CACHE"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model", ".txt", ".tiktoken")


#: LLaMA-Factory's options that add tokens to the vocabulary (their new embedding rows start random in each load)
NEW_TOKEN_OPTIONS = ("add_tokens", "add_special_tokens", "new_special_tokens_config")

_FORWARD_OPTIONS = (
    "model_revision",
    "resize_vocab",
    "add_tokens",
    "add_special_tokens",
    "new_special_tokens_config",
    "init_special_tokens",
    "rope_scaling",
    "flash_attn",
    "shift_attn",
    "mixture_of_depths",
    "use_unsloth",
    "enable_liger_kernel",
    "upcast_layernorm",
    "upcast_lmhead_output",
    "train_from_scratch",
    "quantization_method",
    "quantization_type",
    "double_quantization",
)


def default_cache_dir() -> str:
    return os.getenv(CACHE_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "llamafactory_minorsft", "ref_logps"
    )


def path_fingerprint(name_or_path: Optional[str]) -> Any:
    """Identity of a model or adapter: its files' names/sizes/mtimes (and config contents) if local, else its id."""
    if name_or_path is None:
        return None

    path = os.path.expanduser(name_or_path)
    if not os.path.isdir(path):
        return name_or_path  # a hub id: resolved by revision-less name, as LLaMA-Factory loads it

    files = []
    for root, dirs, names in os.walk(path):
        # checkpoints of a run saved into the model directory are not the model (a `checkpoint-N` model itself is)
        dirs[:] = [name for name in dirs if not name.startswith("checkpoint-")]
        for name in names:
            if name.endswith(_WEIGHT_SUFFIXES):
                full = os.path.join(root, name)
                stat = os.stat(full)
                entry = [os.path.relpath(full, path), stat.st_size, stat.st_mtime_ns]
                if name == "config.json" or name == "adapter_config.json":
                    with open(full, "rb") as f:
                        entry.append(hashlib.sha256(f.read()).hexdigest())
                files.append(entry)
    return {"path": os.path.abspath(path), "files": sorted(files)}


def row_media(dataset) -> Optional[list[str]]:
    """Each row's images, videos and audios (as JSON), or None when the data set has none."""
    names = [name for name in ("images", "videos", "audios") if name in dataset.column_names]
    rows = list(zip(*(dataset[name] for name in names))) if names else []
    if not any(item for row in rows for item in row):  # None or [] where a row has none
        return None
    return [json.dumps(row, sort_keys=True, default=str) for row in rows]


def sample_digests(dataset, samples: list[tuple[list[int], list[int]]]) -> list[bytes]:
    """A digest of every sample's input_ids, labels (after the first) and media, in order.

    ``samples``: the data set's ``dataset_samples``; a packed row gives one digest per sample it holds.
    """
    media = row_media(dataset)
    if media is not None and len(samples) != len(media):
        raise ValueError(
            "`precompute_ref_logps` with `neat_packing` is not supported for data with images, videos or audios: the "
            "reference pass goes sample by sample, and packed rows do not say which media belong to which sample. "
            "Set `neat_packing: false`, or `precompute_ref_logps: false`."
        )
    digests = []
    for index, (input_ids, labels) in enumerate(samples):
        digest = hashlib.blake2b(torch.tensor(input_ids, dtype=torch.int64).numpy().tobytes(), digest_size=16)
        digest.update(b"|" + torch.tensor(labels[1:], dtype=torch.int64).numpy().tobytes())
        if media is not None:  # the same tokens with other images are another sample
            digest.update(b"|" + media[index].encode())
        digests.append(digest.digest())
    return digests


def cache_key(reference: dict[str, Any], digests: list[bytes]) -> str:
    """The file name of a split: the reference and the set of samples, whatever their order or packing."""
    data = hashlib.sha256(b"".join(sorted(digests))).hexdigest()
    payload = {"format": CACHE_FORMAT, "reference": reference, "data": data}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def permuted(values: dict[str, torch.Tensor], order: list[int]) -> dict[str, torch.Tensor]:
    """``values`` of the samples in ``order`` (sample i of the result is sample ``order[i]``)."""
    index = torch.tensor(order, dtype=torch.long)
    result = {"logps": values["logps"][index], "num_tokens": values["num_tokens"][index]}
    if "token_logps" in values:
        per_sample = values["token_logps"].split(values["num_tokens"].tolist())
        result["token_logps"] = torch.cat([per_sample[i] for i in order]) if order else values["token_logps"]
    return result


def load(path: str, num_samples: int, per_token: bool = False) -> Optional[dict[str, torch.Tensor]]:
    """The cached values, or None when the file is missing, unreadable, partial or of another size.

    With ``per_token`` the file must also hold every answer token's log-prob (``token_logps``, flat, in
    sample order: Σ num_tokens values), as SFT-GO's Rho-1 grouping needs them.
    """
    if not os.path.exists(path):
        return None

    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
        logps, num_tokens = cached["logps"], cached["num_tokens"]
    except Exception:  # corrupt or truncated file: rebuild it
        return None

    if logps.shape != (num_samples,) or num_tokens.shape != (num_samples,) or torch.isnan(logps).any():
        return None

    values = {"logps": logps, "num_tokens": num_tokens}
    if per_token:
        token_logps = cached.get("token_logps")
        if not isinstance(token_logps, torch.Tensor) or token_logps.shape != (int(num_tokens.sum()),):
            return None
        if torch.isnan(token_logps).any():
            return None
        values["token_logps"] = token_logps

    return values


def save(path: str, values: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Write the values atomically.

    Write ``logps``, ``num_tokens`` (and ``token_logps``) atomically: a crash mid-write never leaves a file
    that ``load`` accepts.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp_path = f"{path}.tmp.{os.getpid()}"
    stored = {"logps": values["logps"].float().cpu(), "num_tokens": values["num_tokens"].long().cpu(), "info": info}
    if "token_logps" in values:
        stored["token_logps"] = values["token_logps"].float().cpu()
    torch.save(stored, tmp_path)
    os.replace(tmp_path, path)


def merged_adapters(adapters: list[str], model_args, finetuning_args) -> list[str]:
    """The adapters LLaMA-Factory merges into the base of a LoRA training run (``model/adapter.py``).

    It resumes the last one, unless ``create_new_adapter`` asks for a new one and the model can merge them all (not
    quantized, here or in its checkpoint, and not under ZeRO-3 or KTransformers).
    """
    from transformers import AutoConfig
    from transformers.integrations import is_deepspeed_zero3_enabled

    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path,
        trust_remote_code=model_args.trust_remote_code,
        cache_dir=model_args.cache_dir,
        revision=getattr(model_args, "model_revision", "main"),
        token=getattr(model_args, "hf_hub_token", None),
    )
    quantized = model_args.quantization_bit is not None or getattr(config, "quantization_config", None) is not None
    mergeable = not quantized and not is_deepspeed_zero3_enabled() and not getattr(model_args, "use_kt", False)
    return list(adapters) if finetuning_args.create_new_adapter and mergeable else list(adapters[:-1])


def reference_identity(model_args, data_args, training_args, finetuning_args) -> dict[str, Any]:
    """What the reference log-probs depend on besides the tokenized data."""
    if finetuning_args.ref_model is not None:
        model, adapters = finetuning_args.ref_model, finetuning_args.ref_model_adapters
        quantization = finetuning_args.ref_model_quantization_bit
    else:  # the initial model; for LoRA the adapter-disabled policy: the base and the adapters merged into it
        adapters = model_args.adapter_name_or_path
        if finetuning_args.finetuning_type == "lora" and adapters:
            adapters = merged_adapters(adapters, model_args, finetuning_args)
        model, quantization = model_args.model_name_or_path, model_args.quantization_bit

    if isinstance(adapters, str):  # `ref_model_adapters: a,b`, split as LLaMA-Factory splits it
        adapters = [adapter.strip() for adapter in adapters.split(",")]
    return {
        "model": path_fingerprint(model),
        "adapters": [path_fingerprint(a) for a in adapters or []],
        "quantization_bit": quantization,
        "compute_dtype": str(model_args.compute_dtype),
        # autocast (`bf16`/`fp16`) or weights in half precision (`pure_bf16`, DeepSpeed) round differently
        "precision": [bool(training_args.bf16), bool(training_args.fp16), bool(finetuning_args.pure_bf16)],
        "deepspeed": bool(training_args.deepspeed),
        "template": data_args.template,  # the cutoff is in the tokenized samples (packing lowers `cutoff_len` by 1)
        "per_token": needs_token_ref_logps(finetuning_args),
        "loading": loading_options(model_args, training_args),
    }


def loading_options(model_args, training_args) -> dict[str, str]:
    """LLaMA-Factory's model-loading options that change the reference's forward, where this version has them.

    A copy of these model arguments loads the reference. Not those set from the data (`block_diag_attn` follows
    `neat_packing`, which must share the cache), but what an option itself depends on: RoPE scaling's factor on
    `cutoff_len` (`model_max_length`), random weights on the seed, new tokens' on the tokens' descriptions.
    """
    options = {name: getattr(model_args, name) for name in _FORWARD_OPTIONS if hasattr(model_args, name)}
    options = {name: str(getattr(value, "value", value)) for name, value in options.items()}  # enums as their values
    if getattr(model_args, "rope_scaling", None) is not None:
        options["model_max_length"] = str(getattr(model_args, "model_max_length", None))
    if draws_random_weights(model_args):
        options["seed"] = str(training_args.seed)
        config = getattr(model_args, "new_special_tokens_config", None)
        if config and os.path.isfile(config):
            with open(config, "rb") as f:
                options["new_special_tokens_config"] = hashlib.sha256(f.read()).hexdigest()
    return options


def draws_random_weights(model_args) -> bool:
    """Whether a load draws weights from the seeded RNG.

    So it does for the rows `resize_vocab` adds (also for the tokens a template adds), a whole model
    (`train_from_scratch`), and Mixture-of-Depths' routers (`mixture_of_depths: convert`).
    """
    options = (*NEW_TOKEN_OPTIONS, "resize_vocab", "train_from_scratch")
    return (
        any(getattr(model_args, name, None) for name in options)
        or getattr(model_args, "mixture_of_depths", None) == "convert"
    )


def dataset_splits(train_dataset, eval_dataset) -> dict[str, Any]:
    """The data sets of a run by split name: ``train``, ``eval``, or ``eval_<name>`` for a dict of eval sets."""
    splits = {"train": train_dataset} if train_dataset is not None else {}
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


@dataclass
class CachedSplit:
    """One split's cache file, and its values (in sample order) when every process found them there.

    ``order`` lists the split's samples in the file's order (by digest): ``save`` stores values in it.
    """

    path: str
    values: Optional[dict[str, torch.Tensor]]
    order: list[int]
    num_tokens: list[int]  # each sample's answer length, from its labels

    def save(self, values: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        save(self.path, permuted(values, self.order), info)

    def check(self, values: dict[str, torch.Tensor]) -> None:
        """A reference pass gave each sample its own values: their answer lengths are the labels'."""
        if values["num_tokens"].tolist() != self.num_tokens:
            raise RuntimeError(
                "precompute_ref_logps: the reference pass returned values whose answer lengths are not those of the "
                "data set's samples in order, so they would be attached to the wrong samples. Please report this "
                "with your config; `precompute_ref_logps: false` computes the reference online meanwhile."
            )


def look_up(
    model_args, data_args, training_args, finetuning_args, dataset_module: dict[str, Any]
) -> dict[str, CachedSplit]:
    """The cache entry of every split, looked up before any reference model loads."""
    identity = reference_identity(model_args, data_args, training_args, finetuning_args)
    cache_dir = os.path.expanduser(finetuning_args.ref_logps_cache_dir or default_cache_dir())
    per_token = needs_token_ref_logps(finetuning_args)
    entries = {}
    splits = dataset_splits(dataset_module.get("train_dataset"), dataset_module.get("eval_dataset"))
    for split, dataset in splits.items():
        samples = dataset_samples(dataset)
        digests = sample_digests(dataset, samples)
        num_tokens = [sum(label != IGNORE_INDEX for label in labels[1:]) for _, labels in samples]
        order = sorted(range(len(digests)), key=digests.__getitem__)
        path = os.path.join(cache_dir, f"{cache_key(identity, digests)}.pt")
        cached = load(path, len(digests), per_token=per_token)
        if cached is not None:  # file order → sample order
            inverse = sorted(range(len(order)), key=order.__getitem__)
            cached = permuted(cached, inverse)
            if cached["num_tokens"].tolist() != num_tokens:  # a file of values out of order: made anew
                cached = None
        agreed = _all_processes_agree(cached is not None)
        entries[split] = CachedSplit(path, cached if agreed else None, order, num_tokens)

    return entries
