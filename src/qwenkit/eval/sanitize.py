"""Turn a raw completion into the code that is executed.

`sanitize` is evalplus's `sanitize.py` (the step between generation and evaluation in the
maker's eval_plus pipeline), re-implemented on Python's `ast` instead of tree-sitter:

1. `extract_code`: the longest run of lines (by non-blank line count) that parses, searched
   as evalplus does (spans of >= 2 lines, first maximum wins); a prefix-sum bound skips the
   spans that cannot win, so it is fast without changing the answer.
2. keep the top-level imports, then the first definition of each name among: classes,
   functions that contain a `return`, and plain `name = ...` assignments; with an entry point,
   only the definitions reachable from it (through the identifiers they mention).

Faithful quirks: a decorated top-level function is dropped (tree-sitter calls it a
`decorated_definition`, which evalplus ignores), as are functions without any `return`.
"""
from __future__ import annotations

import ast
import io
import keyword
import re
import tokenize

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
        return True
    except (SyntaxError, MemoryError, ValueError, RecursionError):
        return False


def extract_code(text: str) -> str:
    """evalplus `code_extract`: the longest syntactically valid block of whole lines."""
    lines = text.split("\n")
    n = len(lines)
    nonblank = [0]
    for line in lines:
        nonblank.append(nonblank[-1] + (1 if line.strip() else 0))
    best, best_len = (0, 0), 0
    for i in range(n):
        if nonblank[n] - nonblank[i] <= best_len:
            break  # no span starting here or later can beat the best
        for j in range(i + 1, n):
            length = nonblank[j + 1] - nonblank[i]
            if length <= best_len:
                continue
            if _parses("\n".join(lines[i : j + 1])):
                best, best_len = (i, j), length
    return "\n".join(lines[best[0] : best[1] + 1])


def _identifiers(source: str) -> set[str]:
    """Every identifier token in `source` (what tree-sitter's `identifier` nodes cover)."""
    names = set()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.NAME and not keyword.iskeyword(tok.string):
                names.add(tok.string)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return names


def _has_return(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Return) for n in ast.walk(node))


def _reachable(entry_point: str, deps: dict[str | None, set[str]]) -> set[str]:
    seen, queue = {entry_point}, [entry_point]
    while queue:
        for nxt in deps.get(queue.pop(0), ()):
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return seen


def sanitize(text: str, entry_point: str | None = None) -> str:
    code = extract_code(text)
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return code
    imports: list[str] = []
    defs: list[tuple[str | None, str]] = []
    seen: set[str | None] = set()
    for node in tree.body:
        segment = ast.get_source_segment(code, node)
        if segment is None:
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(segment)
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.decorator_list:
                continue  # a decorated_definition in tree-sitter terms: evalplus drops it
            if isinstance(node, ast.ClassDef) or _has_return(node):
                if node.name not in seen:
                    seen.add(node.name)
                    defs.append((node.name, segment))
            continue
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            name = target.id if isinstance(target, ast.Name) else None
            if name not in seen:
                seen.add(name)
                defs.append((name, segment))
    if entry_point:
        deps = {name: _identifiers(seg) for name, seg in defs}
        keep = _reachable(entry_point, deps)
        defs = [(name, seg) for name, seg in defs if name in keep]
    return "\n".join(imports + [seg for _, seg in defs])


def extract_fenced_code(text: str) -> str:
    """For free-form chat answers: the Python fenced blocks joined (or the text if none)."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    python = [b for lang, b in blocks if lang in ("python", "py", "python3", "")]
    return "\n".join(python) if python else text
