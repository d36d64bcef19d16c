"""OpenAI-compatible HTTP serving: `create_app(ServerSettings(...))`, or `qwenkit serve`."""
from __future__ import annotations

from typing import Any

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str) -> Any:  # lazy: importing qwenkit.serve.tool_parser stays light
    if name == "create_app":
        from qwenkit.serve.app import create_app

        return create_app
    if name == "ServerSettings":
        from qwenkit.serve.settings import ServerSettings

        return ServerSettings
    raise AttributeError(name)
