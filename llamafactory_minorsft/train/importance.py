"""SFT-GO token importance that is fixed before training: TF-IDF statistics and LLMLingua-2 keep-probabilities."""

from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from ..sft_go import map_scores_by_offsets, smooth_idf, spans_from_pieces
from .columns import TOKEN_IMPORTANCE, answer_tokens


if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizer


def training_idf(dataset: "Dataset", vocab_size: int) -> torch.Tensor:
    """Smoothed IDF of every token id, one document per training answer."""
    return smooth_idf([answer_tokens(labels) for labels in dataset["labels"]], vocab_size)


def token_pieces(tokenizer: "PreTrainedTokenizer", token_ids: list[int]) -> list[str]:
    """Each token's own text (byte-level BPE pieces decoded one by one), so each has a character span."""
    return [tokenizer.convert_tokens_to_string([token]) for token in tokenizer.convert_ids_to_tokens(token_ids)]


class KeepProbabilityScorer:
    """LLMLingua-2 style keep-probabilities from a 2-label token-classification model (label 1 = keep)."""

    def __init__(self, path: str, batch_size: int = 16) -> None:
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if not self.tokenizer.is_fast:
            raise ValueError(f"`sft_go_classifier` {path!r} needs a fast tokenizer: its character offsets map scores.")
        self.model = AutoModelForTokenClassification.from_pretrained(path).eval()
        if self.model.config.num_labels != 2:
            raise ValueError(
                f"`sft_go_classifier` {path!r} has {self.model.config.num_labels} labels; a keep/drop classifier "
                "with 2 labels (1 = keep, as LLMLingua-2) is needed."
            )
        limit = getattr(self.model.config, "max_position_embeddings", 512) or 512
        self.max_length = min(512, limit)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> list[tuple[list[tuple[int, int]], list[float]]]:
        """(character spans, keep-probabilities) of the classifier's tokens for each text; long texts in windows."""
        results = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            encoded = self.tokenizer(
                chunk, return_offsets_mapping=True, truncation=True, max_length=self.max_length,
                return_overflowing_tokens=True, padding=True, return_tensors="pt",
            )  # fmt: skip
            offsets = encoded.pop("offset_mapping")
            owners = encoded.pop("overflow_to_sample_mapping")
            inputs = {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            keep = torch.softmax(self.model(**inputs).logits.float(), dim=-1)[..., 1]
            per_text = [([], []) for _ in chunk]
            for row, owner in enumerate(owners.tolist()):
                attended = encoded["attention_mask"][row].bool()
                per_text[owner][0].extend(tuple(span) for span in offsets[row][attended].tolist())
                per_text[owner][1].extend(keep[row][attended].tolist())
            results += per_text

        return results


def add_llmlingua2_importance(
    dataset: "Dataset", tokenizer: "PreTrainedTokenizer", scorer: KeepProbabilityScorer, desc: str
) -> "Dataset":
    """A ``token_importance`` column: each answer token's keep-probability, mapped through character offsets."""
    answers = [answer_tokens(labels) for labels in dataset["labels"]]
    texts_and_spans = [spans_from_pieces(token_pieces(tokenizer, ids)) for ids in answers]
    importance = []
    batch = 64
    for start in tqdm(range(0, len(answers), batch), desc=desc):
        window = texts_and_spans[start : start + batch]
        scored = scorer([text for text, _ in window])
        importance += [map_scores_by_offsets(spans, *source) for (_, spans), source in zip(window, scored)]

    return dataset.add_column(TOKEN_IMPORTANCE, importance)
