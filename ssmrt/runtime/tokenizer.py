"""Text <-> token ids through the model's own tokenizer.json (the `tokenizers` library)."""

from __future__ import annotations

from pathlib import Path

from ..errors import SsmrtError

TOKENIZER_FILE = "tokenizer.json"


class TextTokenizer:
    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise SsmrtError("reading tokenizer.json needs the `tokenizers` package (pip install ssmrt[hf])") from None
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:
            raise SsmrtError(f"{path}: cannot be read as a tokenizer ({str(e).splitlines()[0]})") from None
        self.path = path

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


def load_tokenizer(directory) -> TextTokenizer | None:
    """The tokenizer beside a checkpoint or an artifact, or None when there is none."""
    d = Path(directory)
    path = (d if d.is_dir() else d.parent) / TOKENIZER_FILE
    return TextTokenizer(path) if path.is_file() else None


def byte_level_tokenizer_json() -> str:
    """A tokenizer.json mapping each UTF-8 byte to its own id (0..255), for byte-level models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # GPT-2's byte -> printable character table, which the ByteLevel pre-tokenizer and decoder use.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    tok = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()
