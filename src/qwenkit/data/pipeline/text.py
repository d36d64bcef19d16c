"""Text helpers for the pipeline steps: a download-free word tokenizer for datatrove's filters,
language by file extension, and the n-gram tokenization used by decontamination."""
from __future__ import annotations

import re
import unicodedata

from datatrove.utils.word_tokenizers import WordTokenizer

__all__ = ["CODE_LANGUAGES", "RegexWordTokenizer", "language_of", "normalize_text", "words"]

# datatrove's English word tokenizer is NLTK's punkt, which downloads its model at first use; the
# pipeline must run offline, so the Gopher / C4 / FineWeb filters and MinHash get this one instead.
_PUNCT = "".join(chr(c) for c in range(33, 127) if not chr(c).isalnum()) + "“”‘’«»…–—"
_SENT_END = re.compile(r"(?<=[.!?。！？])\s+|\n{2,}")


class RegexWordTokenizer(WordTokenizer):
    """Words = whitespace-separated tokens (Gopher's definition) without surrounding punctuation; a
    token of punctuation only stays as it is (the filters count those as symbols). Sentences end
    at . ! ? (and their CJK forms) followed by space, or at a blank line."""

    def __init__(self) -> None:
        super().__init__("en")

    def word_tokenize(self, text: str) -> list[str]:
        return [w.strip(_PUNCT) or w for w in text.split()]

    def sent_tokenize(self, text: str) -> list[str]:
        return [s.strip() for s in _SENT_END.split(text) if s and s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans, start = [], 0
        for m in _SENT_END.finditer(text):
            if text[start : m.start()].strip():
                spans.append((start, m.start()))
            start = m.end()
        if text[start:].strip():
            spans.append((start, len(text)))
        return spans


# extension -> language; prose languages are checked by the Gopher / C4 rules, the others by the code rules
_EXT = {
    ".py": "python", ".pyi": "python", ".pyx": "cython", ".pxd": "cython", ".c": "c", ".h": "c",
    ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp", ".hpp": "cpp", ".hh": "cpp", ".js": "javascript",
    ".mjs": "javascript", ".ts": "typescript", ".java": "java", ".go": "go", ".rs": "rust", ".rb": "ruby",
    ".sh": "shell", ".bash": "shell", ".ps1": "powershell", ".bat": "batch", ".json": "json",
    ".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".ini": "ini", ".cfg": "ini", ".xml": "xml",
    ".html": "html", ".htm": "html", ".css": "css", ".sql": "sql", ".lua": "lua", ".pl": "perl",
    ".php": "php", ".kt": "kotlin", ".swift": "swift", ".scala": "scala", ".r": "r", ".jl": "julia",
    ".tex": "tex", ".md": "markdown", ".markdown": "markdown", ".rst": "restructuredtext",
    ".txt": "text", "": "text",
}  # fmt: skip
PROSE_LANGUAGES = frozenset({"markdown", "restructuredtext", "text"})
CODE_LANGUAGES = frozenset(set(_EXT.values()) - PROSE_LANGUAGES)


def language_of(path: str) -> str:
    """The language of a file by its extension (``"unknown"`` when not listed)."""
    name = path.rsplit("/", 1)[-1].lower()
    ext = "" if "." not in name.lstrip(".") else "." + name.rsplit(".", 1)[-1]
    return _EXT.get(ext, "unknown")


def normalize_text(text: str) -> str:
    """NFC, newlines as ``\\n``, no byte-order mark. NFC (not NFKC) so code keeps its characters."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", text)


_NGRAM_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased word-character runs: the units of decontamination n-grams (punctuation and
    whitespace are ignored, so reformatting a benchmark solution does not hide it)."""
    return _NGRAM_WORD.findall(text.lower())
