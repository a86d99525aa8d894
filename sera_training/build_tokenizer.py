"""Train a small CLIP-style BPE tokenizer on referring expressions and wrap it as a `transformers.CLIPTokenizer`.

Used where the real CLIP vocabulary (49,408 tokens) cannot be downloaded or is far too big, e.g. for the tiny
models of the tests. The result behaves like `openai/clip-vit-base-patch16`'s tokenizer: same normalization
(NFC, lowercase, whitespace collapsed), same word splitting, byte-level BPE with `</w>` word ends, the same
special tokens, padding with `<|endoftext|>`, and `<|startoftext|>` / `<|endoftext|>` as the last two ids.

The vocabulary always holds the 256 byte symbols and their 256 word-final forms, so any text, including words
and scripts never seen in the corpus, encodes to real tokens (falling back to single characters / bytes) and
never to the unknown token.

Usage:

    python training/build_tokenizer.py corpus.txt OUT_DIR [--vocab_size 1000] [--model_max_length 77]

where `corpus.txt` holds one expression per line.
"""

import argparse
import json
from collections.abc import Iterable

from tokenizers import pre_tokenizers, trainers
from transformers import CLIPTokenizer


BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD_SUFFIX = "</w>"


def byte_level_base_vocabulary() -> list[str]:
    """The 512 symbols every CLIP vocabulary starts with: each byte symbol, then each with the word-end suffix."""
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    return byte_symbols + [symbol + END_OF_WORD_SUFFIX for symbol in byte_symbols]


def build_clip_tokenizer(corpus: Iterable[str], vocab_size: int = 1000, model_max_length: int = 77) -> CLIPTokenizer:
    """
    Train a byte-level BPE on `corpus` and return it as a `CLIPTokenizer`.

    Args:
        corpus (`Iterable[str]`):
            The expressions to learn merges from (e.g. every training expression).
        vocab_size (`int`, *optional*, defaults to 1000):
            Maximum size of the vocabulary, special tokens included. At least 514: the 512 byte symbols and the
            two special tokens. A small corpus may run out of merges first, giving a smaller vocabulary; read the
            real size from `len(tokenizer)`.
        model_max_length (`int`, *optional*, defaults to 77):
            The tokenizer's `model_max_length` (CLIP's text context length).

    Returns:
        `CLIPTokenizer`: a regular transformers tokenizer; `save_pretrained` / `from_pretrained` round-trip it.
    """
    base_vocabulary = byte_level_base_vocabulary()
    num_merges = vocab_size - len(base_vocabulary) - 2
    if num_merges < 0:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level vocabulary needs {len(base_vocabulary)} byte "
            "symbols plus 2 special tokens."
        )

    # Train on an empty CLIPTokenizer's own pipeline so that the merges see exactly the normalization and word
    # splitting used at inference.
    trainer_tokenizer = CLIPTokenizer().backend_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=len(base_vocabulary) + num_merges,
        end_of_word_suffix=END_OF_WORD_SUFFIX,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    trainer_tokenizer.train_from_iterator((str(text) for text in corpus), trainer=trainer)
    trained_merges = json.loads(trainer_tokenizer.to_str())["model"]["merges"]

    # Merges are ranked, and each one only uses symbols made by earlier ones, so the first `num_merges` are a
    # complete BPE on their own. The vocabulary is rebuilt from them so that all 512 byte symbols are present
    # even if the corpus never used them.
    merges = [tuple(pair) for pair in trained_merges[:num_merges]]
    vocabulary = {symbol: index for index, symbol in enumerate(base_vocabulary)}
    for left, right in merges:
        vocabulary.setdefault(left + right, len(vocabulary))
    # CLIP puts the special tokens last, so <|endoftext|> has the highest id.
    vocabulary[BOS_TOKEN] = len(vocabulary)
    vocabulary[EOS_TOKEN] = len(vocabulary)

    return CLIPTokenizer(
        vocab=vocabulary,
        merges=merges,
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=model_max_length,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train a small CLIP-style BPE tokenizer on referring expressions.")
    parser.add_argument("corpus", help="text file with one expression per line")
    parser.add_argument("output_dir", help="where to save the tokenizer (save_pretrained)")
    parser.add_argument(
        "--vocab_size", "--vocab-size", type=int, default=1000, help="maximum vocabulary size (default: 1000)"
    )
    parser.add_argument(
        "--model_max_length", "--model-max-length", type=int, default=77, help="model_max_length (default: 77)"
    )
    args = parser.parse_args(argv)

    with open(args.corpus, encoding="utf-8") as corpus_file:
        expressions = [line.strip() for line in corpus_file if line.strip()]
    if not expressions:
        parser.error(f"{args.corpus} holds no expressions.")
    tokenizer = build_clip_tokenizer(expressions, vocab_size=args.vocab_size, model_max_length=args.model_max_length)
    tokenizer.save_pretrained(args.output_dir)
    print(
        f"Trained on {len(expressions)} expressions: vocabulary of {len(tokenizer)} tokens "
        f"(bos_token_id={tokenizer.bos_token_id}, eos_token_id={tokenizer.eos_token_id}), saved to {args.output_dir}"
    )


if __name__ == "__main__":
    main()
