"""Caption tokenizers: text -> int64 ids [N, L] of a fixed context length, and back.

Two kinds share one interface (``encode``/``__call__``, ``decode``, ``pad_id``, ``sot_id``,
``eot_id``, ``vocab_size``, ``context_length``):

- ``ByteTokenizer``: UTF-8 bytes, no vocabulary to train or ship. Ids 0, 1, 2 are pad,
  start-of-text and end-of-text; byte ``b`` is id ``3 + b`` (vocabulary of 259).
- ``BPETokenizer``: byte-level BPE from the ``tokenizers`` library, trained on the ``txt`` of
  shards or loaded from a ``tokenizer.json``. Trained here, its special tokens take ids 0, 1, 2
  as pad, end-of-text, start-of-text (``TRAIN_ORDER``): end-of-text is not id 2, the id that
  Hugging Face's CLIP text model takes for its legacy pooling (the argmax of the ids) rather
  than the first end-of-text, so an export to ``transformers`` pools where this package does.
  A loaded file names them ``<|pad|>``, ``<|startoftext|>``, ``<|endoftext|>`` (any ids).

A row is ``[sot, t_1, ..., t_k, eot, pad, ...]``. Text longer than the context is truncated and
end-of-text is kept as the last token, so a model may pool at the eot position (as CLIP does).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from dist_contrast.errors import DataError, UserError

PAD, SOT, EOT = "<|pad|>", "<|startoftext|>", "<|endoftext|>"
SPECIAL_TOKENS = (PAD, SOT, EOT)
TRAIN_ORDER = (PAD, EOT, SOT)  # ids 0, 1, 2 of a tokenizer trained here
DEFAULT_CONTEXT_LENGTH = 32  # tokenizers built by hand; runs use data.context_length (77)
TOKENIZER_KINDS = ("bytes", "bpe")


class Tokenizer:
    """Fixed-length encoding over a subclass's ``_ids(text)`` and ``_text(ids)``."""

    pad_id: int
    sot_id: int
    eot_id: int
    vocab_size: int

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH) -> None:
        if context_length < 2:
            raise UserError(f"context length must be >= 2 (sot and eot), got {context_length}")
        self.context_length = context_length

    def _ids(self, text: str) -> list[int]:
        raise NotImplementedError

    def _text(self, ids: list[int]) -> str:
        raise NotImplementedError

    def encode(self, texts: str | Sequence[str]) -> torch.Tensor:
        """int64 ids [N, context_length] (N = 1 for a single string)."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.int64)
        room = self.context_length - 2
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self._ids(text)[:room], self.eot_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return out

    __call__ = encode

    def trim(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows [N, L] cut after the batch's last end-of-text: [N, n], n the longest row's
        length through its first end-of-text. Only padding is dropped, so a text tower that
        pools at end-of-text under a causal mask (CLIP's) gives the same features, and a short
        caption costs the tower n positions instead of the context length. Unchanged when a row
        has no end-of-text (cut by hand: such a row pools at its last position)."""
        is_eot = ids == self.eot_id
        if ids.dim() != 2 or ids.numel() == 0 or not bool(is_eot.any(dim=1).all()):
            return ids
        n = int(is_eot.int().argmax(dim=1).max()) + 1
        return ids if n == ids.shape[1] else ids[:, :n].contiguous()

    def decode(
        self, ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]]
    ) -> str | list[str]:
        """Text of one row (a str) or of each row of [N, L] (a list); stops at end-of-text,
        special tokens dropped."""
        rows = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if rows and isinstance(rows[0], list | tuple):
            return [self._decode_row(list(r)) for r in rows]
        return self._decode_row(rows)

    def _decode_row(self, row: list[int]) -> str:
        if self.eot_id in row:
            row = row[: row.index(self.eot_id)]
        specials = {self.pad_id, self.sot_id, self.eot_id}
        return self._text([int(t) for t in row if t not in specials])


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes + pad/sot/eot; nothing to train. A cut inside a multi-byte character
    decodes to U+FFFD."""

    pad_id, sot_id, eot_id = 0, 1, 2
    offset = 3
    vocab_size = offset + 256

    def _ids(self, text: str) -> list[int]:
        return [self.offset + b for b in text.encode("utf-8")]

    def _text(self, ids: list[int]) -> str:
        return bytes(t - self.offset for t in ids if t >= self.offset).decode("utf-8", "replace")


class BPETokenizer(Tokenizer):
    """Byte-level BPE (``tokenizers``), from a ``tokenizer.json`` or trained with ``train``."""

    def __init__(self, tokenizer, context_length: int = DEFAULT_CONTEXT_LENGTH) -> None:
        super().__init__(context_length)
        self.tokenizer = tokenizer
        ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        missing = [t for t, i in zip(SPECIAL_TOKENS, ids, strict=True) if i is None]
        if missing:
            raise DataError(f"tokenizer has no special token {', '.join(missing)}")
        self.pad_id, self.sot_id, self.eot_id = ids
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def load(cls, path: str | Path, context_length: int = DEFAULT_CONTEXT_LENGTH) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise DataError(
                f"tokenizer file '{path}' does not exist (train one with `dist-contrast "
                f"tokenizer train --shards SHARDS --vocab-size N --out {path}`)"
            )
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the library raises a bare Exception for a bad file
            raise DataError(
                f"'{path}' is not a tokenizer.json: {str(exc).splitlines()[0]}"
            ) from None
        return cls(tok, context_length)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        min_frequency: int = 2,
    ) -> BPETokenizer:
        """Learn merges over ``texts``; the vocabulary starts from the 256 byte symbols."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        floor = len(SPECIAL_TOKENS) + 256
        if vocab_size <= floor:
            raise UserError(f"vocab size must be > {floor} (256 bytes + 3 special tokens)")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(TRAIN_ORDER),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, context_length)

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` (via a temporary file, so a failed write leaves no stub)."""
        path = Path(path)
        if path.is_dir():
            raise DataError(f"tokenizer output '{path}' is a directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.tokenizer.save(str(tmp))
        os.replace(tmp, path)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def shard_captions(urls: Sequence[str]) -> Iterator[str]:
    """The ``txt`` of every sample of ``urls``, in order (local or remote shards, read as
    training reads them: regular files only, remote ones retried)."""
    from dist_contrast.data.tario import Faults, tar_samples

    for url in urls:
        faults = Faults(muted=True)
        try:
            for sample in tar_samples(url, faults):
                if "txt" in sample:
                    yield sample["txt"].decode("utf-8")
        except ValueError as exc:  # UnicodeError is a ValueError
            raise DataError(f"cannot read captions of shard '{url}': {exc}") from None
        if faults.last:
            reason = next(iter(faults.last.values()))
            raise DataError(f"cannot read captions of shard '{url}': {reason}")


def train_bpe_from_shards(
    shards: str | list[str], vocab_size: int, context_length: int = DEFAULT_CONTEXT_LENGTH
) -> tuple[BPETokenizer, int]:
    """A BPE tokenizer trained on the captions of the shards ``shards`` expands to, and the
    number of captions it saw."""
    from dist_contrast.data.shards import resolve_shards

    urls = resolve_shards(shards)
    seen = 0

    def counted() -> Iterator[str]:
        nonlocal seen
        for text in shard_captions(urls):
            seen += 1
            yield text

    tok = BPETokenizer.train(counted(), vocab_size, context_length)
    if seen == 0:
        raise DataError(f"no captions (txt) in the {len(urls)} shard(s) of '{shards}'")
    return tok, seen


def build_tokenizer(
    kind: str, path: str | None = None, context_length: int = DEFAULT_CONTEXT_LENGTH
) -> Tokenizer:
    """``bytes`` (no file) or ``bpe`` (a ``tokenizer.json`` from ``dist-contrast tokenizer
    train``)."""
    if kind == "bytes":
        if path:
            raise UserError(f"tokenizer 'bytes' takes no path (got '{path}'); did you mean 'bpe'?")
        return ByteTokenizer(context_length)
    if kind == "bpe":
        if not path:
            raise UserError(
                "tokenizer 'bpe' needs the path of a tokenizer.json "
                "(train one with `dist-contrast tokenizer train`)"
            )
        return BPETokenizer.load(path, context_length)
    raise UserError(f"unknown tokenizer '{kind}' (expected one of: {', '.join(TOKENIZER_KINDS)})")


def tokenizer_for(data, path: str | Path | None = None) -> Tokenizer | None:
    """The caption tokenizer a run's ``data`` config names (``data.tokenizer``,
    ``data.tokenizer_path``, ``data.context_length``), or None for ``none``. ``path`` replaces
    the ``tokenizer.json`` of a BPE tokenizer (an export's own copy)."""
    if data.tokenizer == "none":
        return None
    file = str(path or data.tokenizer_path) if data.tokenizer == "bpe" else None
    return build_tokenizer(data.tokenizer, file, data.context_length)
