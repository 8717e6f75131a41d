"""Build a small but real Qwen-style tokenizer folder offline, for tests.

``make_tokenizer_folder(path, chat_template)`` trains a byte-level BPE (the same normalizer,
pre-tokenizer regex and decoder as Qwen2's ``tokenizer.json``) on the paragraphs below, appends
Qwen's control tokens as added tokens after the learned vocabulary (as Qwen does), and writes
``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json``. It takes well under a
second, so model tests can call it freely:

    from tokenizer_utils import make_tokenizer_folder
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

# Qwen2's pre-tokenizer split (transformers/models/qwen2/tokenization_qwen2.py: PRETOKENIZE_REGEX).
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
VOCAB_SIZE = 420  # 256 byte symbols + ~160 merges: small, yet multi-byte characters get merged tokens
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
NON_SPECIAL_ADDED_TOKENS = ("<tool_call>", "</tool_call>")  # Qwen marks these special=false: kept by decode
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away into the forest.",
    "Long context models read whole books, code bases and logs at once, then answer questions about them.",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i * 2))\n",
    "Attention is computed in chunks: intra-chunk, successive-chunk and inter-chunk positions.",
    "你好，世界！今天天气很好。我们在北京学习中文和机器学习。模型可以阅读很长的文本。",
    "日本語のテキストも少し含めます。東京は大きな都市です。",
    "Emoji test: 😀😃😄 🚀🚀 👍🏽 ❤️ and accents: café, naïve, façade, über, señor.",
    "Numbers 1234567890 and symbols: @#$%^&*()[]{}<>~`|\\ plus tabs\tand  double  spaces.",
    "The assistant calls a tool, reads the tool response, and writes a short final answer.",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
]


def build_tokenizer() -> Tokenizer:
    """A trained byte-level BPE tokenizer with Qwen's pipeline and control tokens."""
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # Qwen's post-processor is ByteLevel with trim_offsets=False: it adds no BOS/EOS.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT * 4, trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in NON_SPECIAL_ADDED_TOKENS])
    return tokenizer


def make_tokenizer_folder(path: str | Path, chat_template: str | None) -> Path:
    """Write a Qwen-like tokenizer into ``path`` (created if needed) and return it.

    ``chat_template`` goes into tokenizer_config.json as a string; None writes no template.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save(str(folder / "tokenizer.json"))

    added = {}
    for token in SPECIAL_TOKENS + NON_SPECIAL_ADDED_TOKENS:
        added[str(tokenizer.token_to_id(token))] = {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": token in SPECIAL_TOKENS,
        }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": PAD_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8"
    )

    # Qwen2.5-Instruct's generation_config lists both <|im_end|> and <|endoftext|>.
    generation = {
        "bos_token_id": tokenizer.token_to_id("<|endoftext|>"),
        "eos_token_id": [tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")],
        "pad_token_id": tokenizer.token_to_id("<|endoftext|>"),
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.8,
    }
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    return folder
