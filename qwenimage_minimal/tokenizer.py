"""The Qwen2 tokenizer: byte-level BPE, built with the `tokenizers` library from the official files.

The official `tokenizer/` folder has no `tokenizer.json`, only the raw ingredients, so we assemble
the pipeline ourselves:

1. Special tokens (`<|im_start|>`, `<|image_pad|>`, ...) are cut out of the text first, whole;
   they are never split or normalised.
2. The rest is NFC-normalised (so a composed and a decomposed "é" give the same ids).
3. A regex splits it into pre-tokens: English contractions, runs of letters (with one leading
   non-letter such as a space), single digits (so numbers are split digit by digit), runs of
   punctuation, newlines, and whitespace.
4. Each pre-token is turned into bytes, each byte into one of 256 printable stand-in characters
   (GPT-2's byte-level trick, so any string, even invalid Unicode, is representable), and BPE
   merges them by rank using `merges.txt`; `vocab.json` gives the ids.

The 151,643 base tokens plus 22 special tokens (151643..151664) make Qwen2.5's vocabulary.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from .weights import CheckpointError, parse_json

# Qwen2's pre-tokenizer pattern (the same as in the official tokenizer.json of Qwen2/2.5).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PAD_TOKEN = "<|endoftext|>"
# Qwen2.5's 22 added tokens, ids 151643..151664 right after the BPE vocabulary. The first 14 are
# "special" (skipped by decode(skip_special_tokens=True)); the tool-call and fill-in-the-middle
# ones are plain added tokens. Both kinds are always matched whole.
QWEN25_ADDED_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
FIRST_ADDED_ID = 151643


class QwenTokenizer:
    def __init__(self, tokenizer: Tokenizer, pad_token: str = PAD_TOKEN):
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.token_to_id(pad_token)
        if self.pad_id is None:
            raise CheckpointError(f"the tokenizer has no pad token {pad_token!r}")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def __call__(self, texts: list[str], max_length: int | None = None):
        """Batch-encode: (input_ids, attention_mask), both (B, longest) long tensors, right-padded
        with <|endoftext|>. Texts longer than `max_length` tokens are cut (keeping the start) with a
        warning that says which ones."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a non-empty list of str")
        ids = [self.encode(t) for t in texts]
        if max_length is not None:
            long = [i for i, x in enumerate(ids) if len(x) > max_length]
            if long:
                warnings.warn(
                    f"text(s) {long} are longer than {max_length} tokens "
                    f"({[len(ids[i]) for i in long]}); truncated to the first {max_length}",
                    stacklevel=2,
                )
                ids = [x[:max_length] for x in ids]
        return self.pad(ids)

    def pad(self, ids: list[list[int]]):
        """Right-pad token id lists with <|endoftext|>: (input_ids, attention_mask), both (B, longest)."""
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for b, x in enumerate(ids):
            input_ids[b, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[b, : len(x)] = 1
        return input_ids, mask


def added_tokens(folder: Path) -> list[tuple[int, str, bool]]:
    """(id, content, special) for the tokens added on top of the BPE vocabulary, from
    tokenizer_config.json's `added_tokens_decoder`, else `added_tokens.json`."""
    config_path, added_path = folder / "tokenizer_config.json", folder / "added_tokens.json"
    try:
        if config_path.is_file():
            decoder = parse_json(config_path.read_bytes(), config_path).get("added_tokens_decoder")
            if decoder:
                return sorted(
                    (int(i), t["content"], bool(t.get("special", True))) for i, t in decoder.items()
                )
        if added_path.is_file():
            return sorted(
                (int(i), content, True)
                for content, i in parse_json(added_path.read_bytes(), added_path).items()
            )
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(
            f"{folder}: the added tokens in tokenizer_config.json / added_tokens.json are "
            f"malformed ({type(e).__name__}: {e})"
        ) from None
    raise CheckpointError(
        f"{folder}: no special tokens found (need tokenizer_config.json with "
        "added_tokens_decoder, or added_tokens.json)"
    )


def read_tokenizer_file(read, name):
    """The `tokenizers` library's parse errors, turned into an error that names the file."""
    try:
        return read()
    except Exception as e:  # tokenizers raises plain Exceptions for unreadable files
        raise CheckpointError(f"{name} cannot be read as a tokenizer file ({e}); download it again") from None


def load(path) -> QwenTokenizer:
    """Load an official `tokenizer/` folder (vocab.json + merges.txt + special tokens).

    A `tokenizer.json`, if present, is used as is (it describes the same pipeline in one file)."""
    folder = Path(path)
    if (folder / "tokenizer.json").is_file():
        tok = read_tokenizer_file(
            lambda: Tokenizer.from_file(str(folder / "tokenizer.json")), folder / "tokenizer.json"
        )
        tok.no_truncation()  # a saved tokenizer.json may carry truncation/padding settings; we do our own
        tok.no_padding()
        return QwenTokenizer(tok)
    missing = [f for f in ("vocab.json", "merges.txt") if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(
            f"{folder}: tokenizer file(s) {missing} not found; expected the official "
            "tokenizer/ folder (vocab.json, merges.txt, tokenizer_config.json)"
        )
    specials = added_tokens(folder)  # read first: a folder without them is an error, not a silent vocab

    if not isinstance(parse_json((folder / "vocab.json").read_bytes(), folder / "vocab.json"), dict):
        raise CheckpointError(f"{folder / 'vocab.json'} must map tokens to ids; download it again")
    bpe = read_tokenizer_file(
        lambda: models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")),
        f"{folder / 'merges.txt'} (with its vocab.json)",
    )
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> stand-in chars
        ]
    )
    tok.decoder = decoders.ByteLevel()
    base = tok.get_vocab_size()
    for token_id, content, special in specials:
        token = AddedToken(
            content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False
        )
        tok.add_tokens([token]) if not special else tok.add_special_tokens([token])
        if tok.token_to_id(content) != token_id:
            raise CheckpointError(
                f"{folder}: added token {content!r} should have id {token_id} but got "
                f"{tok.token_to_id(content)} (vocab.json has {base} entries)"
            )
    return QwenTokenizer(tok)
