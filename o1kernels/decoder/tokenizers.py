"""Tokenizers for search() and the CLI: the task's CharTokenizer or any Hugging Face tokenizer, one interface.

What search() reads: step_id (the token that ends a reasoning step), eos_id (int or None), decode(ids) -> str; the
CLI also calls encode(text, bos=...) -> ids. CharTokenizer (task.py) has them; HFTokenizer gives them to a
`transformers` tokenizer (AutoTokenizer, any PreTrainedTokenizerBase) or a `tokenizers.Tokenizer`, with the step
separator given as a token id or as a string that is one token (a vocabulary entry such as "<extra_0>", or text that
encodes to a single token such as "\\n\\n" in Llama-3's vocabulary).

Step texts are decoded one step at a time (special tokens dropped); with SentencePiece vocabularies a step's leading
space can be lost at its boundary, which only affects the printed text.
"""
from __future__ import annotations

from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class HFTokenizer:
    """A Hugging Face tokenizer with the interface search() needs.

    tokenizer: a transformers tokenizer or a tokenizers.Tokenizer. step_separator: token id (int) or string (one
    token). eos_id: overrides the tokenizer's eos_token_id (a tokenizers.Tokenizer has none; None = no eos).
    """

    def __init__(self, tokenizer, step_separator, *, eos_id: int | None = None):
        self.tokenizer = tokenizer
        self._is_transformers = hasattr(tokenizer, "convert_tokens_to_ids") and hasattr(tokenizer, "get_vocab")
        if not self._is_transformers and not (hasattr(tokenizer, "encode") and hasattr(tokenizer, "token_to_id")):
            raise TypeError("tokenizer must be a transformers tokenizer or a tokenizers.Tokenizer, got "
                            f"{type(tokenizer).__name__}")
        self.vocab_size = len(tokenizer) if self._is_transformers else tokenizer.get_vocab_size(with_added_tokens=True)
        self.step_id = self.token_id(step_separator, "step_separator")
        if eos_id is None and self._is_transformers:
            eos_id = tokenizer.eos_token_id
        self.eos_id = None if eos_id is None else self.token_id(eos_id, "eos_id")
        self.bos_id = tokenizer.bos_token_id if self._is_transformers else None

    def token_id(self, value, name: str = "token") -> int:
        """The id of `value`: a token id (checked) or a string that is one token (a vocabulary entry, or text that
        encodes to exactly one token); ValueError/TypeError naming `name` otherwise."""
        if _is_int(value):
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} must be a token id in [0, {self.vocab_size}), got {value}")
            return value
        if not isinstance(value, str) or not value:
            raise TypeError(f"{name} must be a token id or a non-empty string, got {value!r}")
        vocab_id = (self.tokenizer.get_vocab().get(value) if self._is_transformers
                    else self.tokenizer.token_to_id(value))
        if vocab_id is not None:
            return vocab_id
        ids = self.encode(value)
        if len(ids) != 1:
            raise ValueError(f"{name} {value!r} encodes to {len(ids)} tokens {ids[:8]}, not one: pass a token id, or a "
                             "string that is a single token of this vocabulary")
        return ids[0]

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, *, bos: bool = False) -> list[int]:
        """Text -> token ids; bos=True adds the tokenizer's special tokens (its BOS, if it has one)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if self._is_transformers:
            return list(self.tokenizer.encode(text, add_special_tokens=bos))
        return list(self.tokenizer.encode(text, add_special_tokens=bos).ids)

    def decode(self, ids) -> str:
        """Token ids -> text, special tokens dropped."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def as_search_tokenizer(tokenizer, step_separator=None):
    """`tokenizer` with step_id / eos_id / decode: returned as is when it has them (step_separator must then be None),
    wrapped in HFTokenizer when it is a Hugging Face tokenizer (step_separator required)."""
    native = all(hasattr(tokenizer, a) for a in ("step_id", "eos_id", "decode"))
    if native:
        if step_separator is not None:
            raise ValueError(f"step_separator is only for Hugging Face tokenizers; {type(tokenizer).__name__} has its "
                             f"own step_id ({tokenizer.step_id})")
        return tokenizer
    if step_separator is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no step_id: pass step_separator (a token id, or a "
                         "string that is one token) to use a Hugging Face tokenizer")
    return HFTokenizer(tokenizer, step_separator)


def has_tokenizer_files(path) -> bool:
    """True when directory `path` holds Hugging Face tokenizer files."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in TOKENIZER_FILES)


def load_raw_tokenizer(path):
    """The Hugging Face tokenizer in a directory: transformers' AutoTokenizer when transformers is installed, else
    tokenizers.Tokenizer from its tokenizer.json. OSError when the directory has no loadable tokenizer."""
    path = Path(path)
    if not has_tokenizer_files(path):
        raise FileNotFoundError(f"no tokenizer in {str(path)!r} (looked for {', '.join(TOKENIZER_FILES)})")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        AutoTokenizer = None
    if AutoTokenizer is not None:
        try:
            return AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError, KeyError) as exc:
            raise OSError(f"cannot load the tokenizer in {str(path)!r}: {exc}") from None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ImportError("loading a Hugging Face tokenizer needs transformers or tokenizers "
                          "(pip install 'o1kernels[hf]')") from None
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} has no tokenizer.json and transformers is not installed "
                                "(pip install 'o1kernels[hf]')")
    return Tokenizer.from_file(str(path / "tokenizer.json"))


def load_tokenizer(path, step_separator, *, eos_id: int | None = None) -> HFTokenizer:
    """HFTokenizer over load_raw_tokenizer(path). OSError when the directory has no loadable tokenizer, ValueError /
    TypeError when step_separator or eos_id is not one token of it."""
    return HFTokenizer(load_raw_tokenizer(path), step_separator, eos_id=eos_id)
