"""Rows packed by LLaMA-Factory's ``neat_packing``, seen as the samples they hold.

``neat_packing`` puts several samples into one row without attention between them: the row's 2D attention mask
numbers its samples 1, 2, … (0: padding) before LLaMA-Factory's collator turns it into a block-diagonal 4D mask
(or, for FlashAttention-2, drops it and trims the padding). The per-sample quantities of these stages (m, log π(y|x),
r, the SFT-GO groups) are sums over one sample's answer tokens, so the loss code works on one row per sample: the
collator records each token's sample number (``SAMPLE_IDS``), and ``Samples`` gathers the row-shaped tensors of a
batch into (samples, positions) ones, differentiably.
"""

from dataclasses import dataclass
from typing import Any

import torch

from ..losses import IGNORE_INDEX


#: the batch key of each token's sample number within its row (1, 2, …; 0: padding), as the packed mask gives it
SAMPLE_IDS = "sample_ids"


def split_samples(labels: list[int], sample_ids: list[int]) -> list[list[int]]:
    """The labels of each sample of a packed row, in order (padding dropped)."""
    samples: dict[int, list[int]] = {}
    for label, sample in zip(labels, sample_ids):
        if sample:
            samples.setdefault(sample, []).append(label)
    return [samples[key] for key in sorted(samples)]


def unlink_samples(feature: dict[str, Any]) -> dict[str, Any]:
    """A packed row whose samples do not predict each other: each sample's first token gets no label.

    Position t predicts token t + 1. Where a sample starts, that token belongs to the next sample and is predicted
    from the previous one, which it cannot attend to; unpacked, a sample's first token is never predicted. Its label
    is IGNORE_INDEX already unless `train_on_prompt` is on.
    """
    ids, labels = feature["attention_mask"], list(feature["labels"])
    for t in range(1, len(labels)):
        if ids[t] != ids[t - 1]:
            labels[t] = IGNORE_INDEX
    return {**feature, "labels": labels}


def sample_ids_tensor(features: list[dict[str, Any]], input_ids: torch.Tensor) -> torch.Tensor:
    """(rows, length) sample numbers aligned with the collated ``input_ids``.

    The collator pads on the right, or for FlashAttention-2 (one row) trims the padding away.
    """
    rows, length = input_ids.shape
    ids = torch.zeros((rows, length), dtype=torch.long)
    for row, feature in enumerate(features):
        sample_ids = torch.tensor(feature["attention_mask"], dtype=torch.long)
        if sample_ids.numel() > length:  # trimmed: FlashAttention-2 keeps the non-padding tokens
            sample_ids = sample_ids[sample_ids != 0]
        if sample_ids.numel() > length:
            raise RuntimeError("neat_packing: the collated batch is shorter than its packed rows.")
        ids[row, : sample_ids.numel()] = sample_ids
    return ids


@dataclass
class Samples:
    """The samples of a packed batch: where each one's positions lie in the (rows, length − 1) tensors.

    Position t of a row belongs to the sample of the token it predicts (t + 1). Samples are numbered row by row, in
    their order in the row; ``index[s, j]`` is the flat position of sample s's j-th position, ``valid`` marks the
    filled ones.
    """

    index: torch.Tensor  # (samples, positions), into the flattened (rows, length − 1) tensors
    valid: torch.Tensor  # (samples, positions)
    rows: torch.Tensor  # (samples,): the row of each sample
    num_rows: int

    @classmethod
    def of(cls, sample_ids: torch.Tensor) -> "Samples":
        predicted = sample_ids[:, 1:]
        rows, cols = (predicted > 0).nonzero(as_tuple=True)  # row-major; a sample's positions are contiguous
        keys = rows * (int(predicted.max()) + 1) + predicted[rows, cols]
        _, sample = torch.unique_consecutive(keys, return_inverse=True)
        counts = torch.bincount(sample, minlength=int(sample.max()) + 1 if sample.numel() else 0)
        starts = counts.cumsum(0) - counts
        offsets = torch.arange(rows.numel(), device=rows.device) - starts[sample]
        shape = (counts.numel(), int(counts.max()) if counts.numel() else 0)
        index = torch.zeros(shape, dtype=torch.long, device=rows.device)
        valid = torch.zeros(shape, dtype=torch.bool, device=rows.device)
        index[sample, offsets] = rows * predicted.size(1) + cols
        valid[sample, offsets] = True
        return cls(index, valid, rows[starts], predicted.size(0))

    def __len__(self) -> int:
        return self.index.size(0)

    def take(self, values: torch.Tensor, fill: float | int | bool = 0) -> torch.Tensor:
        """(samples, positions) from a (rows, length − 1) tensor; ``fill`` where a sample has fewer positions."""
        picked = values.reshape(-1)[self.index]
        return torch.where(self.valid, picked, torch.full_like(picked, fill))

    def row_sums(self, values: torch.Tensor) -> torch.Tensor:
        """(rows, …) sums of a (samples, …) tensor over the samples of each row."""
        sums = values.new_zeros((self.num_rows, *values.shape[1:]))
        return sums.index_add_(0, self.rows, values)

    def labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Each sample's labels as an unpacked row would hold them: (samples, positions + 1), IGNORE_INDEX first."""
        targets = self.take(labels[:, 1:], fill=IGNORE_INDEX)
        return torch.cat([torch.full_like(targets[:, :1], IGNORE_INDEX), targets], dim=1)


def count_packed_answered(labels: torch.Tensor, sample_ids: torch.Tensor) -> int:
    """Samples with at least one answer token in a packed batch (``count_answered_samples`` of its samples)."""
    mask = labels[:, 1:] != IGNORE_INDEX
    rows, cols = mask.nonzero(as_tuple=True)
    keys = rows * (int(sample_ids.max()) + 1) + sample_ids[:, 1:][rows, cols]
    return int(torch.unique(keys).numel())


def dataset_samples(dataset) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of every sample of a tokenized data set, in order; a packed row gives each of its samples.

    A row's samples are numbered by its attention mask (all ones: one sample). Labels are unlinked
    (``unlink_samples``), so a sample's ids and ``labels[1:]`` are the same packed or not.
    """
    samples = []
    for input_ids, labels, sample_ids in zip(dataset["input_ids"], dataset["labels"], dataset["attention_mask"]):
        labels = unlink_samples({"attention_mask": sample_ids, "labels": labels})["labels"]
        samples += zip(split_samples(input_ids, sample_ids), split_samples(labels, sample_ids))
    return samples


def samples_per_row(dataset) -> list[int]:
    """How many samples each row of a tokenized data set holds."""
    return [max(sample_ids, default=0) for sample_ids in dataset["attention_mask"]]


def unpacked(dataset):
    """A data set of one row per sample of ``dataset`` (its rows split), for a per-sample pass such as the reference's."""
    from datasets import Dataset

    samples = dataset_samples(dataset)
    return Dataset.from_dict(
        {
            "input_ids": [ids for ids, _ in samples],
            "attention_mask": [[1] * len(ids) for ids, _ in samples],
            "labels": [labels for _, labels in samples],
        }
    )
