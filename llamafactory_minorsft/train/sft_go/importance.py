"""SFT-GO token importance that is fixed before training: TF-IDF statistics and LLMLingua-2 keep-probabilities."""

import contextlib
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from ...sft_go import map_scores_by_offsets, smooth_idf, spans_from_prefix_ends
from ..columns import TOKEN_IMPORTANCE, answer_tokens
from ..packing import split_samples


if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizer


def training_idf(dataset: "Dataset", vocab_size: int) -> torch.Tensor:
    """Smoothed IDF of every token id, one document per training answer (per sample of a packed row)."""
    rows = zip(dataset["labels"], dataset["attention_mask"])
    return smooth_idf(
        [answer_tokens(sample) for labels, ids in rows for sample in split_samples(labels, ids)], vocab_size
    )


def text_and_spans(tokenizer: "PreTrainedTokenizer", token_ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The answer decoded once, and each token's character span in it.

    Decoding byte-level BPE tokens one by one turns every multi-byte character (Chinese, emoji, accents) into
    "\ufffd". The whole answer is decoded once and re-encoded with the fast tokenizer's offsets, under which each
    token of a character spans that character. Where re-encoding gives other tokens (or the tokenizer is slow),
    the spans come from the decoded lengths of growing prefixes instead.
    """
    text = tokenizer.decode(token_ids)
    if tokenizer.is_fast:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if encoded["input_ids"] == list(token_ids):
            return text, [tuple(span) for span in encoded["offset_mapping"]]

    return text, prefix_spans(tokenizer, token_ids)


def prefix_spans(tokenizer: "PreTrainedTokenizer", token_ids: list[int]) -> list[tuple[int, int]]:
    """Character spans from decoding growing prefixes (quadratic: the fallback of ``text_and_spans``)."""
    # a prefix that ends inside a character decodes to a trailing "\ufffd": that character is not complete yet
    ends = [len(tokenizer.decode(token_ids[: k + 1]).rstrip("\ufffd")) for k in range(len(token_ids))]
    return spans_from_prefix_ends(ends)


class KeepProbabilityScorer:
    """LLMLingua-2 style keep-probabilities from a 2-label token-classification model (label 1 = keep)."""

    def __init__(self, path: str, batch_size: int = 16) -> None:
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if not self.tokenizer.is_fast:
            raise ValueError(f"`sft_go_classifier` {path!r} needs a fast tokenizer: its character offsets map scores.")
        self.model, loading = AutoModelForTokenClassification.from_pretrained(path, output_loading_info=True)
        self.model.eval()
        if loading["missing_keys"]:  # transformers initialises them at random: the groups would be noise
            missing = sorted(loading["missing_keys"])
            raise ValueError(
                f"`sft_go_classifier` {path!r} is not a trained token classifier: its checkpoint lacks "
                f"{', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}, which would start random. Point it at "
                "a token-classification model trained to keep/drop tokens (as LLMLingua-2's)."
            )
        if self.model.config.num_labels != 2:
            raise ValueError(
                f"`sft_go_classifier` {path!r} has {self.model.config.num_labels} labels; a keep/drop classifier "
                "with 2 labels (1 = keep, as LLMLingua-2) is needed."
            )
        limit = getattr(self.model.config, "max_position_embeddings", 512) or 512
        self.max_length = min(512, limit)
        self.batch_size = batch_size

    def gathered(self):
        """The context to score in: the classifier's whole weights on every process.

        Under DeepSpeed ZeRO-3 transformers loads the classifier partitioned across the processes (`zero.Init`), so
        each process gathers its weights for the scoring pass (once, on every process together: it is a
        collective), and they are partitioned again after it.
        """
        parameters = [p for p in self.model.parameters() if hasattr(p, "ds_id")]  # ZeRO-3's partitioned ones
        if not parameters:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(parameters, modifier_rank=None)

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> list[tuple[list[tuple[int, int]], list[float]]]:
        """(character spans, keep-probabilities) of the classifier's tokens for each text; long texts in windows."""
        results = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            encoded = self.tokenizer(
                chunk,
                return_offsets_mapping=True,
                truncation=True,
                max_length=self.max_length,
                return_overflowing_tokens=True,
                padding=True,
                return_tensors="pt",
            )
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
    texts_and_spans = [text_and_spans(tokenizer, ids) for ids in answers]
    importance = []
    batch = 64
    for start in tqdm(range(0, len(answers), batch), desc=desc):
        window = texts_and_spans[start : start + batch]
        scored = scorer([text for text, _ in window])
        importance += [map_scores_by_offsets(spans, *source) for (_, spans), source in zip(window, scored)]

    return dataset.add_column(TOKEN_IMPORTANCE, importance)
