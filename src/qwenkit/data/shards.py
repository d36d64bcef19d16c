"""Tokenized shards: the on-disk token format that training reads and the data pipeline writes.

One shard ``NAME`` is three files:

* ``NAME.bin``: every document's token ids back to back, little-endian uint32;
* ``NAME.idx``: a 16-byte header (magic ``QKTOKIDX`` + little-endian uint64 version) followed by
  ``num_docs + 1`` little-endian uint64 token offsets: document ``i`` is
  ``bin[offsets[i]:offsets[i + 1]]`` and the last entry is the total token count;
* ``NAME.json``: the manifest (tokenizer name, vocab size, document and token counts, the size
  and sha256 of the two data files).

A folder of shards may also hold a ``dataset.json`` (:func:`write_dataset_manifest`) listing the
shards in order; without it every ``*.json`` shard manifest in the folder is read, sorted by name.
Opening checks the structure (magic, sizes, offsets) cheaply; ``verify=True`` also checks the
sha256 sums and scans every token id against the vocabulary. Reading a document always checks its
ids against the vocabulary.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qwenkit.errors import DataError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IDX_MAGIC",
    "ShardReader",
    "ShardWriter",
    "TokenShards",
    "write_dataset_manifest",
]

logger = logging.getLogger(__name__)

FORMAT_NAME = "qwenkit-token-shard"
FORMAT_VERSION = 1
IDX_MAGIC = b"QKTOKIDX"
_IDX_HEADER = len(IDX_MAGIC) + 8
_TOKEN_DTYPE = np.dtype("<u4")
_OFFSET_DTYPE = np.dtype("<u8")
DATASET_MANIFEST = "dataset.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """Write one shard: ``append`` documents of token ids, then ``close`` (or use ``with``).

    The files are written under temporary names and renamed on a successful close, so a crashed
    writer never leaves a shard that looks complete.
    """

    def __init__(self, directory: str | os.PathLike[str], name: str, *, vocab_size: int,
                 tokenizer: str = "") -> None:  # fmt: skip
        if not name or "/" in name or name == Path(DATASET_MANIFEST).stem:
            raise ValueError(f"bad shard name {name!r}")
        if vocab_size <= 0 or vocab_size > 2**32:
            raise ValueError(f"vocab_size must be in [1, 2**32], got {vocab_size}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.vocab_size = int(vocab_size)
        self.tokenizer = tokenizer
        self._bin_tmp = self.directory / f"{name}.bin.tmp"
        self._bin = open(self._bin_tmp, "wb")
        self._offsets: list[int] = [0]
        self._closed = False

    @property
    def num_docs(self) -> int:
        return len(self._offsets) - 1

    @property
    def num_tokens(self) -> int:
        return self._offsets[-1]

    def append(self, token_ids: Sequence[int] | np.ndarray) -> None:
        """Add one document. Raises ``ValueError`` for ids outside ``[0, vocab_size)``."""
        if self._closed:
            raise ValueError(f"shard {self.name} is already closed")
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.ndim != 1:
            raise ValueError(f"a document must be a flat sequence of token ids, got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = int(ids[(ids < 0) | (ids >= self.vocab_size)][0])
            raise ValueError(f"token id {bad} in document {self.num_docs} is outside [0, {self.vocab_size})")
        self._bin.write(ids.astype(_TOKEN_DTYPE).tobytes())
        self._offsets.append(self._offsets[-1] + int(ids.size))

    def extend(self, documents: Iterable[Sequence[int] | np.ndarray]) -> None:
        for doc in documents:
            self.append(doc)

    def close(self) -> Path:
        """Finish the shard; returns the path of its ``NAME.json`` manifest."""
        if self._closed:
            return self.directory / f"{self.name}.json"
        self._bin.close()
        idx_tmp = self.directory / f"{self.name}.idx.tmp"
        with open(idx_tmp, "wb") as f:
            f.write(IDX_MAGIC + np.array([FORMAT_VERSION], dtype=_OFFSET_DTYPE).tobytes())
            f.write(np.asarray(self._offsets, dtype=_OFFSET_DTYPE).tobytes())
        bin_path, idx_path = self.directory / f"{self.name}.bin", self.directory / f"{self.name}.idx"
        os.replace(self._bin_tmp, bin_path)
        os.replace(idx_tmp, idx_path)
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "tokenizer": self.tokenizer,
            "vocab_size": self.vocab_size,
            "num_docs": self.num_docs,
            "num_tokens": self.num_tokens,
            "files": {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in (bin_path, idx_path)},
        }
        out = self.directory / f"{self.name}.json"
        out.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        self._closed = True
        logger.info("wrote shard %s: %d documents, %d tokens", out, self.num_docs, self.num_tokens)
        return out

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # leave no half-written shard behind
            self._bin.close()
            self._bin_tmp.unlink(missing_ok=True)
            self._closed = True


class ShardReader:
    """One shard, memory-mapped: ``len``, ``shard[i] -> np.ndarray`` (uint32 ids), ``lengths``.

    Raises :class:`~qwenkit.errors.DataError` naming the file for any structural problem.
    """

    def __init__(self, manifest_path: str | os.PathLike[str], *, verify: bool = False) -> None:
        self.manifest_path = Path(manifest_path)
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{self.manifest_path}: shard manifest not found") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{self.manifest_path}: invalid JSON ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise DataError(f"{self.manifest_path}: not a {FORMAT_NAME} manifest")
        if manifest.get("version") != FORMAT_VERSION:
            raise DataError(f"{self.manifest_path}: unsupported shard version {manifest.get('version')!r}")
        try:
            self.vocab_size = int(manifest["vocab_size"])
            self.tokenizer = str(manifest.get("tokenizer", ""))
            num_docs, num_tokens = int(manifest["num_docs"]), int(manifest["num_tokens"])
            if not isinstance(manifest["files"], dict):
                raise TypeError("'files' must be an object")
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{self.manifest_path}: manifest lacks or mangles field {e}") from None
        self.manifest = manifest
        stem = self.manifest_path.with_suffix("")
        self.bin_path, self.idx_path = stem.with_suffix(".bin"), stem.with_suffix(".idx")
        self.name = stem.name
        for p in (self.bin_path, self.idx_path):
            if not p.is_file():
                raise DataError(f"{p}: missing (listed by {self.manifest_path})")

        idx_size = self.idx_path.stat().st_size
        with open(self.idx_path, "rb") as f:
            header = f.read(_IDX_HEADER)
        if len(header) < _IDX_HEADER or header[: len(IDX_MAGIC)] != IDX_MAGIC:
            raise DataError(f"{self.idx_path}: bad magic (not a {FORMAT_NAME} index)")
        version = int(np.frombuffer(header[len(IDX_MAGIC):], dtype=_OFFSET_DTYPE)[0])
        if version != FORMAT_VERSION:
            raise DataError(f"{self.idx_path}: unsupported index version {version}")
        if (idx_size - _IDX_HEADER) % 8:
            raise DataError(f"{self.idx_path}: size {idx_size} is not a 16-byte header plus uint64 offsets")
        n_offsets = (idx_size - _IDX_HEADER) // 8
        if n_offsets != num_docs + 1:
            raise DataError(f"{self.idx_path}: has {n_offsets} offsets, the manifest says {num_docs} documents "
                            f"({num_docs + 1} offsets); the file is truncated or does not match")  # fmt: skip
        bin_size = self.bin_path.stat().st_size
        if bin_size % 4:
            raise DataError(f"{self.bin_path}: size {bin_size} is not a multiple of 4 (uint32 tokens); truncated?")
        if bin_size // 4 != num_tokens:
            raise DataError(f"{self.bin_path}: holds {bin_size // 4} tokens, the manifest says {num_tokens}")
        self.offsets = np.memmap(self.idx_path, dtype=_OFFSET_DTYPE, mode="r", offset=_IDX_HEADER, shape=(n_offsets,))
        if self.offsets[0] != 0:
            raise DataError(f"{self.idx_path}: the first offset is {int(self.offsets[0])}, expected 0")
        steps = np.diff(self.offsets.astype(np.int64))
        if (steps < 0).any():
            i = int(np.argmax(steps < 0))
            raise DataError(f"{self.idx_path}: offsets decrease at document {i}")
        if int(self.offsets[-1]) != num_tokens:
            raise DataError(f"{self.idx_path}: offsets end at token {int(self.offsets[-1])}, past or before the "
                            f"end of {self.bin_path.name} ({num_tokens} tokens)")  # fmt: skip
        self.lengths = steps
        # np.memmap cannot map an empty file
        self.tokens = (np.memmap(self.bin_path, dtype=_TOKEN_DTYPE, mode="r") if num_tokens
                       else np.zeros(0, dtype=_TOKEN_DTYPE))  # fmt: skip
        if verify:
            self.verify()

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def verify(self) -> None:
        """Check the sha256 sums against the manifest and every token id against the vocabulary."""
        for p in (self.bin_path, self.idx_path):
            want = (self.manifest["files"].get(p.name) or {}).get("sha256")
            if want is None:
                raise DataError(f"{self.manifest_path}: no sha256 for {p.name}")
            if _sha256(p) != want:
                raise DataError(f"{p}: sha256 does not match {self.manifest_path.name}; the file is corrupt")
        chunk = 1 << 24
        for start in range(0, self.num_tokens, chunk):
            part = self.tokens[start : start + chunk]
            if int(part.max()) >= self.vocab_size:
                pos = start + int(np.argmax(part >= self.vocab_size))
                self._bad_token(pos)

    def _bad_token(self, pos: int) -> None:
        doc = int(np.searchsorted(self.offsets, pos, side="right")) - 1
        raise DataError(f"{self.bin_path}: token id {int(self.tokens[pos])} at position {pos} (document {doc}) "
                        f"is >= vocab_size {self.vocab_size}")  # fmt: skip

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for shard {self.name} ({n} documents)")
        i %= n
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        doc = self.tokens[start:stop]
        if doc.size and int(doc.max()) >= self.vocab_size:
            self._bad_token(start + int(np.argmax(doc >= self.vocab_size)))
        return doc

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"ShardReader({self.name!r}, docs={len(self)}, tokens={self.num_tokens})"


class TokenShards:
    """All shards of a folder (or a list of manifests) as one sequence of documents.

    ``len``, ``shards[i] -> np.ndarray`` of uint32 ids, ``lengths`` (int64 per document),
    ``num_tokens``, ``vocab_size`` and ``tokenizer`` (every shard must agree on the last two).
    """

    def __init__(self, shards: Sequence[ShardReader]) -> None:
        if not shards:
            raise DataError("no shards given")
        vocab = {s.vocab_size for s in shards}
        if len(vocab) > 1:
            raise DataError(f"shards disagree on vocab_size: {sorted(vocab)}")
        names = {s.tokenizer for s in shards}
        if len(names) > 1:
            raise DataError(f"shards were written with different tokenizers: {sorted(names)}")
        self.shards = list(shards)
        self.vocab_size = vocab.pop()
        self.tokenizer = names.pop()
        self._starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.lengths = (np.concatenate([s.lengths for s in self.shards]) if self._starts[-1]
                        else np.zeros(0, dtype=np.int64))  # fmt: skip

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, verify: bool = False) -> TokenShards:
        """Open a folder of shards, a ``dataset.json``, or one shard's ``NAME.json``."""
        p = Path(path)
        if p.is_file():
            if p.name != DATASET_MANIFEST:
                return cls([ShardReader(p, verify=verify)])
            folder, listed = p.parent, cls._listed(p)
        elif p.is_dir():
            folder = p
            if (p / DATASET_MANIFEST).is_file():
                listed = cls._listed(p / DATASET_MANIFEST)
            else:
                listed = sorted(q.name for q in p.glob("*.json"))
        else:
            raise DataError(f"{p}: no such file or folder")
        if not listed:
            raise DataError(f"{p}: no shard manifests (*.json) found")
        return cls([ShardReader(folder / name, verify=verify) for name in listed])

    @staticmethod
    def _listed(dataset_json: Path) -> list[str]:
        try:
            data = json.loads(dataset_json.read_text(encoding="utf-8"))
            return [str(s) for s in data["shards"]]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{dataset_json}: expected {{\"shards\": [\"NAME.json\", ...]}} ({e})") from None

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range ({n} documents)")
        i %= n
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self.shards[k][i - int(self._starts[k])]

    def __iter__(self) -> Iterator[np.ndarray]:
        for s in self.shards:
            yield from s

    def __repr__(self) -> str:
        return f"TokenShards(shards={len(self.shards)}, docs={len(self)}, tokens={self.num_tokens})"


def write_dataset_manifest(directory: str | os.PathLike[str], shard_names: Sequence[str] | None = None) -> Path:
    """Write ``dataset.json`` listing the folder's shards in order, with their totals.

    ``shard_names`` are shard names (``NAME``); default every shard manifest of the folder, sorted.
    """
    folder = Path(directory)
    if shard_names is None:
        manifests = sorted(q.name for q in folder.glob("*.json") if q.name != DATASET_MANIFEST)
    else:
        manifests = [f"{n}.json" for n in shard_names]
    shards = TokenShards([ShardReader(folder / m) for m in manifests])
    out = folder / DATASET_MANIFEST
    out.write_text(json.dumps({
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "tokenizer": shards.tokenizer,
        "vocab_size": shards.vocab_size, "num_docs": len(shards), "num_tokens": shards.num_tokens,
        "shards": manifests,
    }, indent=2) + "\n", encoding="utf-8")  # fmt: skip
    return out
