"""Offline tiny Qwen2 models, a byte-level BPE tokenizer with Qwen's ChatML tokens, and project data.

No hub access is needed: the tokenizer is trained on the generated data in a second, the model is a
randomly initialised ``Qwen2ForCausalLM``. ``template: qwen`` works with it, so the stock data pipeline,
``llamafactory-cli train``, ``export`` and ``chat`` run unchanged on CPU.
"""

import json
import os
import random
from typing import Optional


QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DEFAULT_SIZE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)

_NAMES = ["Ada", "Bo", "Cyd", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kit", "Lu", "Max", "Ned", "Oli", "Pam"]
_ITEMS = ["apples", "books", "coins", "pens", "stones", "cards", "shells", "keys"]
_COLORS = ["red", "blue", "green", "amber", "violet", "white", "black", "golden"]
_WORDS = ["river", "planet", "garden", "window", "silver", "forest", "candle", "market", "bridge", "thunder"]


def _sample(rng: random.Random) -> dict[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randrange(1, 50), rng.randrange(1, 50)
        return {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
    if kind == 1:
        word = rng.choice(_WORDS)
        return {"instruction": "Reverse the word.", "input": word, "output": f"The reverse of {word} is {word[::-1]}."}
    if kind == 2:
        name, n, item = rng.choice(_NAMES), rng.randrange(2, 9), rng.choice(_ITEMS)
        return {
            "instruction": f"{name} has {n} {item} and gives one away. How many are left?",
            "input": "",
            "output": f"{name} has {n - 1} {item} left.",
        }
    name, color = rng.choice(_NAMES), rng.choice(_COLORS)
    return {
        "instruction": f"Write one sentence about {name} and the color {color}.",
        "input": "",
        "output": f"{name} painted the old door {color}, and the whole street smiled.",
    }


def make_instruction_data(num_samples: int = 256, seed: int = 0) -> list[dict[str, str]]:
    """A small alpaca-format instruction set (arithmetic, word reversal, counting, short sentences)."""
    rng = random.Random(seed)
    return [_sample(rng) for _ in range(num_samples)]


def make_mc_questions(num_questions: int = 32, seed: int = 0) -> list[dict[str, str]]:
    """Arithmetic multiple-choice questions in the ceval-exam layout (question, A, B, C, D, answer)."""
    rng = random.Random(seed)
    questions = []
    for _ in range(num_questions):
        a, b = rng.randrange(1, 50), rng.randrange(1, 50)
        options = {a + b}
        while len(options) < 4:
            options.add(a + b + rng.choice([-3, -2, -1, 1, 2, 3, 10]))
        options = rng.sample(sorted(options), 4)
        letters = "ABCD"
        questions.append(
            {
                "question": f"What is {a} plus {b}?",
                **{letter: str(option) for letter, option in zip(letters, options)},
                "answer": letters[options.index(a + b)],
            }
        )
    return questions


def write_dataset(data_dir: str, name: str, samples: list[dict], dataset_info_extra: Optional[dict] = None) -> None:
    """Write ``samples`` as ``<name>.json`` and register it in ``dataset_info.json`` (merged, not replaced)."""
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f"{name}.json"), "w", encoding="utf-8") as f:
        json.dump(samples, f, ensure_ascii=False, indent=1)

    info_path = os.path.join(data_dir, "dataset_info.json")
    info = {}
    if os.path.exists(info_path):
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)

    info[name] = {"file_name": f"{name}.json", **(dataset_info_extra or {})}
    with open(info_path, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)


def build_tokenizer(texts: list[str], output_dir: str, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer with Qwen's special tokens and save it as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=4096,
        padding_side="right",
    )
    tokenizer.save_pretrained(output_dir)
    return tokenizer


def build_model(tokenizer, output_dir: str, seed: int = 0, dtype: str = "float32", **size) -> None:
    """A randomly initialised Qwen2ForCausalLM sized for CPU tests, saved next to the tokenizer.

    ``dtype``: the saved weights' dtype. `bfloat16` is how every released Qwen2 checkpoint is stored: LLaMA-Factory
    then loads it in bf16 and upcasts only the trainable parameters.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # `size` may also set `vocab_size` (at least the tokenizer's; extra ids are never produced) and `tie_word_embeddings`
    size = {"vocab_size": len(tokenizer), "tie_word_embeddings": True, **DEFAULT_SIZE, **size}
    config = Qwen2Config(
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        **size,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))  # initialised in float32, then cast
    model.config.dtype = dtype
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


def build_tiny_setup(
    output_dir: str, seed: int = 0, num_samples: int = 256, dtype: str = "float32", **size
) -> dict[str, str]:
    """Build everything tests and the demo need under ``output_dir``; returns the paths.

    - ``model``: tiny Qwen2 policy (seed ``seed``); ``ref_model``: same tokenizer, other weights (seed + 1);
    - ``data``: a LLaMA-Factory ``dataset_dir`` with ``minorsft_demo`` (train) and ``minorsft_demo_eval``.
    """
    data = make_instruction_data(num_samples, seed)
    eval_data = make_instruction_data(max(16, num_samples // 8), seed + 1000)
    paths = {name: os.path.join(output_dir, name) for name in ("model", "ref_model", "data")}
    write_dataset(paths["data"], "minorsft_demo", data)
    write_dataset(paths["data"], "minorsft_demo_eval", eval_data)

    texts = [" ".join(s.values()) for s in data + eval_data] + ["system user assistant You are a helpful assistant."]
    tokenizer = build_tokenizer(texts, paths["model"])
    build_model(tokenizer, paths["model"], seed=seed, dtype=dtype, **size)
    build_model(tokenizer, paths["ref_model"], seed=seed + 1, dtype=dtype, **size)
    return paths


def build_token_classifier(texts: list[str], output_dir: str, seed: int = 0, vocab_size: int = 300) -> None:
    """A tiny 2-label token classifier (an LLMLingua-2 stand-in for SFT-GO's `llmlingua2` grouping).

    It has its own, smaller BPE vocabulary, so its tokens do not line up with the LLM's and the scores must
    be mapped through character offsets, as with a real LLMLingua-2 (XLM-RoBERTa) model.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForTokenClassification

    tokenizer = build_tokenizer(texts, output_dir, vocab_size=vocab_size)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=2,
        id2label={0: "drop", 1: "keep"},
        label2id={"drop": 0, "keep": 1},
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(seed)
    Qwen2ForTokenClassification(config).save_pretrained(output_dir)
