"""Per-sample values computed before training that travel as columns of the tokenized data set.

As columns they follow their samples through every sampler (shuffling, data-parallel sharding, resuming
mid-epoch). Scalar columns become a (batch,) tensor; per-answer-token columns (one value per answer token
after the causal shift, in order) become a (batch, max tokens) tensor padded with NaN, which
``answer_values`` scatters back onto the answer positions and checks against the labels.
"""

import itertools
from typing import TYPE_CHECKING, Any, Optional

import torch

from ..losses import IGNORE_INDEX
from .packing import SAMPLE_IDS, sample_ids_tensor, unlink_samples


if TYPE_CHECKING:
    from datasets import Dataset


REF_LOGPS = "ref_logps"  # log πref(y|x) of the sample (precompute_ref_logps)
REF_TOKEN_LOGPS = "ref_token_logps"  # log πref of each answer token (precompute_ref_logps + SFT-GO Rho-1)
TOKEN_IMPORTANCE = "token_importance"  # SFT-GO LLMLingua-2 keep-probability of each answer token
SCALAR_COLUMNS = (REF_LOGPS,)
TOKEN_COLUMNS = (REF_TOKEN_LOGPS, TOKEN_IMPORTANCE)
EXTRA_COLUMNS = SCALAR_COLUMNS + TOKEN_COLUMNS
#: batch keys that are not model inputs
NON_MODEL_KEYS = ("labels", *EXTRA_COLUMNS, SAMPLE_IDS)


def answer_tokens(labels: list[int]) -> list[int]:
    """The answer tokens of one tokenized sample, as the loss sees them (labels[1:], not IGNORE_INDEX)."""
    return [label for label in labels[1:] if label != IGNORE_INDEX]


class ExtraColumnsCollator:
    """LLaMA-Factory's SFT collator, plus the extra columns the data set carries.

    With ``packed`` (`neat_packing`), also each token's sample number (``SAMPLE_IDS``), and no label on a sample's
    first token (``unlink_samples``).
    """

    def __init__(self, collator, packed: bool = False) -> None:
        self.collator = collator
        self.packed = packed

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        present = [name for name in EXTRA_COLUMNS if name in features[0]]
        extra = {name: [feature[name] for feature in features] for name in present}
        if self.packed:  # a list per packed row: one value (or list) per sample, in order
            extra = {name: [value for row in values for value in row] for name, values in extra.items()}
        features = [unlink_samples(feature) for feature in features] if self.packed else features
        masks = [{"attention_mask": list(feature["attention_mask"])} for feature in features] if self.packed else []
        batch = self.collator([{k: v for k, v in feature.items() if k not in present} for feature in features])
        if self.packed:
            batch[SAMPLE_IDS] = sample_ids_tensor(masks, batch["input_ids"])
        for name, values in extra.items():
            if name in SCALAR_COLUMNS:
                batch[name] = torch.tensor(values, dtype=torch.float32)
            else:
                padded = torch.full((len(values), max(1, max(len(v) for v in values))), torch.nan)
                for row, value in enumerate(values):
                    padded[row, : len(value)] = torch.tensor(value, dtype=torch.float32)
                batch[name] = padded

        return batch


def answer_values(padded: torch.Tensor, mask: torch.Tensor, name: str) -> torch.Tensor:
    """Scatter a NaN-padded (batch, max tokens) column onto the answer positions ``mask`` (batch, length).

    Raises if a row's number of values differs from its number of answer tokens: the column was computed for
    other data (a stale cache would otherwise be silently misaligned).
    """
    counts = mask.sum(-1, keepdim=True)
    filled = ~torch.isnan(padded)
    positions = torch.arange(padded.size(1), device=padded.device).unsqueeze(0)
    too_short = int(counts.max()) > padded.size(1) if counts.numel() else False
    if too_short or not torch.equal(filled, positions < counts.to(padded.device)):
        raise RuntimeError(f"Column {name!r} does not match the answer tokens of its batch; rebuild it.")

    values = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    values[mask] = padded[filled].to(mask.device)
    return values


def add_reference_columns(
    dataset: "Dataset", values: dict[str, torch.Tensor], per_token: bool, per_row: Optional[list[int]] = None
) -> "Dataset":
    """Add the precomputed reference log-probs (one value per sample, in order) as columns.

    The ``ref_logps`` column, and with ``per_token`` the ``ref_token_logps`` column (flat values split back
    into one list per sample). With ``per_row`` (the samples of each packed row) a row gets the list of its samples'.
    """
    columns = {REF_LOGPS: values["logps"].tolist()}
    if per_token:
        per_sample = values["token_logps"].split(values["num_tokens"].tolist())
        columns[REF_TOKEN_LOGPS] = [row.tolist() for row in per_sample]
    starts = list(itertools.accumulate(per_row, initial=0)) if per_row is not None else []
    for name, column in columns.items():
        if per_row is not None:
            column = [column[start : start + count] for start, count in zip(starts, per_row)]
        dataset = dataset.add_column(name, column)
    return dataset
