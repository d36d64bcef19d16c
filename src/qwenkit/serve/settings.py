"""Server options, parsed once (CLI or tests) into a frozen dataclass."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qwenkit.serve.vision import MediaSettings


@dataclass(frozen=True)
class ServerSettings:
    """`max_queue`: admitted requests beyond `max_num_seqs` that may wait for the engine; more
    get 429. `request_timeout`: seconds before a generation is aborted (None: no limit)."""

    model: str = ""
    served_model_name: str | None = None
    api_key: str | None = None
    max_num_seqs: int = 64
    max_queue: int = 256
    request_timeout: float | None = 600.0
    allowed_origins: tuple[str, ...] = ()
    structured_warmup: bool = True
    engine_args: dict[str, Any] = field(default_factory=dict)
    media: MediaSettings = field(default_factory=MediaSettings)  # image-input limits

    def __post_init__(self) -> None:
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError(f"request_timeout must be > 0, got {self.request_timeout}")

    @property
    def max_in_flight(self) -> int:
        return self.max_num_seqs + self.max_queue
