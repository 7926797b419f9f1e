"""Read a Prometheus endpoint the way Prometheus does: the text format, over HTTP."""

from __future__ import annotations

import urllib.request


def scrape(url: str, timeout: float = 10) -> dict[str, float]:
    """`name{labels}` (labels as the exporter wrote them, sorted by name) -> value; comments left out."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        text = resp.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples
