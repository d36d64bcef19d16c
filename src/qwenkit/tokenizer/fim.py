"""Fill-in-the-middle prompts for Qwen2.5-Coder.

Formats (Qwen2.5-Coder README):

* file level: ``<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>``; the model writes
  the middle and ends with ``<|endoftext|>`` (or ``<|fim_pad|>``);
* repository level::

    <|repo_name|>{repo_name}
    <|file_sep|>{file_path1}
    {file_content1}
    <|file_sep|>{file_path2}
    {file_content2}
    <|file_sep|>{path}
    <|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>

The prompts are raw strings (no chat template); tokenize them with ``Tokenizer.encode`` so the
control tokens become single ids.
"""
from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "FIM_END_TOKENS",
    "FIM_MIDDLE",
    "FIM_PAD",
    "FIM_PREFIX",
    "FIM_SUFFIX",
    "FILE_SEP",
    "REPO_NAME",
    "fim_prompt",
    "repo_fim_prompt",
    "repo_prompt",
]

FIM_PREFIX = "<|fim_prefix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_SUFFIX = "<|fim_suffix|>"
FIM_PAD = "<|fim_pad|>"
REPO_NAME = "<|repo_name|>"
FILE_SEP = "<|file_sep|>"
# Control tokens that end a generated middle: Qwen2.5-Coder writes <|endoftext|> (some
# checkpoints <|fim_pad|>); <|file_sep|> would start the next file of a repository prompt.
FIM_END_TOKENS = ("<|endoftext|>", FIM_PAD, FILE_SEP)
_CONTROL = (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD, REPO_NAME, FILE_SEP, "<|endoftext|>")


def _check(name: str, value: object, *, allow_newline: bool = True) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a str, got {type(value).__name__}")
    for tok in _CONTROL:
        if tok in value:
            raise ValueError(f"{name} contains the control token {tok!r}")
    if not allow_newline and ("\n" in value or "\r" in value):
        raise ValueError(f"{name} must be a single line, got {value!r}")
    return value


def fim_prompt(prefix: str, suffix: str) -> str:
    """``<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>``.

    Raises ``ValueError`` if ``prefix`` / ``suffix`` are not strings or contain FIM/repo
    control tokens (which would corrupt the layout).
    """
    return f"{FIM_PREFIX}{_check('prefix', prefix)}{FIM_SUFFIX}{_check('suffix', suffix)}{FIM_MIDDLE}"


def repo_prompt(repo_name: str, files: Sequence[tuple[str, str]]) -> str:
    """``<|repo_name|>{repo_name}\\n`` followed by ``<|file_sep|>{path}\\n{content}\\n`` per file
    (repository-level completion context, no FIM hole)."""
    parts = [f"{REPO_NAME}{_check('repo_name', repo_name, allow_newline=False)}\n"]
    for item in files:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise ValueError(f"files must be (path, content) pairs, got {item!r}")
        path, content = item
        parts.append(f"{FILE_SEP}{_check('path', path, allow_newline=False)}\n{_check('content', content)}\n")
    return "".join(parts)


def repo_fim_prompt(
    repo_name: str,
    files: Sequence[tuple[str, str]],
    prefix: str,
    suffix: str,
    path: str,
) -> str:
    """Repository-level FIM: the context files, then ``<|file_sep|>{path}\\n`` and a FIM hole
    (``prefix`` / ``suffix`` of the file being edited)."""
    head = repo_prompt(repo_name, files)
    return f"{head}{FILE_SEP}{_check('path', path, allow_newline=False)}\n{fim_prompt(prefix, suffix)}"
