"""Where edgemtp keeps what it can rebuild: default-model conversions, ONNX exports, step costs."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_root() -> Path:
    """The user cache directory: ``$EDGEMTP_CACHE`` when set, else platformdirs' per-OS location.

    Every module asks here, so one variable moves the whole cache. platformdirs reads
    ``XDG_CACHE_HOME`` only on Linux (macOS always gives ``~/Library/Caches``); ``EDGEMTP_CACHE``
    works on every OS, which is what lets tests and users put the cache elsewhere.
    """
    override = os.environ.get("EDGEMTP_CACHE")
    return Path(override) if override else Path(platformdirs.user_cache_dir("edgemtp"))
