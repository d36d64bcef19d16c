"""Stop strings on streamed text: where one matched, and how much text a stream must hold back
so that a stop string split across tokens never leaks."""
from __future__ import annotations


def find_stop(text: str, stops: list[str], search_from: int = 0) -> tuple[int, str] | None:
    """Earliest occurrence of any stop string starting at or after `search_from`."""
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s, search_from)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def stop_holdback(stops: list[str]) -> int:
    """Characters to withhold from a stream so a stop string split across tokens never leaks."""
    return max((len(s) - 1 for s in stops), default=0)
