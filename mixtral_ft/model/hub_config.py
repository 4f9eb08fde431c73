"""A hub model's config.json for `plan` and the train pre-check: the cache, else one request, never retries.

huggingface_hub retries a failing request with back-off (36 s before `plan` could answer offline). A shape
estimate is not worth waiting for: with HF_HUB_OFFLINE set only the cache is read, and otherwise one GET
with a short timeout is made; any failure is raised at once for the caller to fall back on.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

TIMEOUT_S = 5.0


class ConfigUnavailable(Exception):
    """The config could not be read from the cache or in one request; the message says why."""


def offline() -> bool:
    return (os.environ.get("HF_HUB_OFFLINE") or "").strip().lower() in ("1", "true", "yes", "on")


def fetch_config(name: str, revision: str | None = None) -> dict:
    """config.json of hub model `name`: from the local cache, else (unless offline) one HTTP request."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", revision=revision)
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text(encoding="utf-8"))
    if offline():
        raise ConfigUnavailable("HF_HUB_OFFLINE is set and it is not in the cache")
    import httpx
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    print(
        f"reading {name}'s config.json from the Hub (one try, {TIMEOUT_S:g} s timeout)...",
        file=sys.stderr,
        flush=True,
    )
    endpoint = (os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
    url = hf_hub_url(name, "config.json", revision=revision, endpoint=endpoint)
    try:
        response = httpx.get(url, headers=build_hf_headers(), timeout=TIMEOUT_S, follow_redirects=True)
    except httpx.HTTPError as exc:
        raise ConfigUnavailable(f"Hub unreachable: {type(exc).__name__}") from None
    if response.status_code != 200:
        raise ConfigUnavailable(f"HTTP {response.status_code}")
    try:
        return response.json()
    except ValueError:
        raise ConfigUnavailable("the answer is not JSON") from None
