import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer, CLIPTokenizer

from sera_training.build_tokenizer import build_clip_tokenizer, byte_level_base_vocabulary, main


REPO_ROOT = Path(__file__).resolve().parents[1]


CORPUS = [
    "the dog on the left",
    "left dog",
    "man in the red shirt",
    "the man's hat, 2nd from left",
    "woman holding an umbrella",
    "the umbrella on the right",
    "right most zebra",
    "Giraffe behind the fence!",
    "small white cup near the laptop",
    "the laptop on the left side of the table",
] * 3


def words_of(text):
    """CLIP's word split: runs of letters, single digits, runs of other symbols (after lowercasing)."""
    return re.findall(r"'s|[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower())


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer(CORPUS, vocab_size=600, model_max_length=77)


def test_is_a_clip_tokenizer_with_clip_special_tokens(tokenizer):
    assert isinstance(tokenizer, CLIPTokenizer)
    assert tokenizer.bos_token == "<|startoftext|>"
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.model_max_length == 77
    # like CLIP, the special tokens come last, <|endoftext|> with the highest id
    assert tokenizer.eos_token_id == len(tokenizer) - 1
    assert tokenizer.bos_token_id == len(tokenizer) - 2
    assert len(byte_level_base_vocabulary()) + 2 < len(tokenizer) <= 600


def test_encoding_layout_and_padding(tokenizer):
    encoding = tokenizer("The Dog on the LEFT", padding="max_length", max_length=17)
    ids = encoding["input_ids"]
    assert len(ids) == 17
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.convert_ids_to_tokens(ids[1:6]) == ["the</w>", "dog</w>", "on</w>", "the</w>", "left</w>"]
    assert ids[6:] == [tokenizer.eos_token_id] * 11
    assert encoding["attention_mask"] == [1] * 7 + [0] * 10


def test_every_corpus_word_round_trips(tokenizer):
    for expression in CORPUS:
        for word in words_of(expression):
            ids = tokenizer(word, add_special_tokens=False)["input_ids"]
            assert tokenizer.decode(ids) == word
        ids = tokenizer(expression)["input_ids"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == " ".join(words_of(expression))
    # frequent words were learned as single tokens
    for word in ("left", "the", "umbrella", "laptop"):
        expected = [tokenizer.convert_tokens_to_ids(word + "</w>")]
        assert tokenizer(word, add_special_tokens=False)["input_ids"] == expected


@pytest.mark.parametrize("text", ["xylophone", "quokka jumping", "café crème", "日本の犬", "🐶 on the left"])
def test_unknown_words_fall_back_to_characters(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    # the unknown token is <|endoftext|>: it must only appear as the real end of the sequence
    assert ids.count(tokenizer.eos_token_id) == 1 and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_save_and_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    for loader in (AutoTokenizer, CLIPTokenizer):
        reloaded = loader.from_pretrained(tmp_path)
        assert isinstance(reloaded, CLIPTokenizer)
        assert reloaded.get_vocab() == tokenizer.get_vocab()
        for text in ("the dog on the left", "xylophone café"):
            assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_vocab_size_limits():
    with pytest.raises(ValueError, match="too small"):
        build_clip_tokenizer(CORPUS, vocab_size=500)
    # exactly the byte symbols and the special tokens: still encodes everything, one byte at a time
    minimal = build_clip_tokenizer(CORPUS, vocab_size=514)
    assert len(minimal) == 514
    ids = minimal("left", add_special_tokens=False)["input_ids"]
    assert minimal.convert_ids_to_tokens(ids) == ["l", "e", "f", "t</w>"]


def test_command_line(tmp_path, capsys):
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text("\n".join(CORPUS) + "\n\n", encoding="utf-8")
    main([str(corpus_file), str(tmp_path / "tokenizer"), "--vocab-size", "560", "--model-max-length", "32"])
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert isinstance(reloaded, CLIPTokenizer)
    assert len(reloaded) <= 560 and reloaded.model_max_length == 32
    assert f"{len(CORPUS)} expressions" in capsys.readouterr().out
