"""``cache_root``: the one place every cached file's location comes from."""

from __future__ import annotations

from pathlib import Path

import platformdirs

from edgemtp.engine.tuning import cost_cache_path
from edgemtp.onnx_backend.loading import cached_export_dir
from edgemtp.paths import cache_root
from edgemtp.tui.baseline import default_cache_file


def test_edgemtp_cache_overrides_the_platform_location(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEMTP_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    # The modules that cache something follow the override.
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    assert cached_export_dir(checkpoint, bits=8, group_size=32).parent == tmp_path / "onnx"
    assert cost_cache_path().parent == tmp_path
    assert default_cache_file().parent == tmp_path


def test_without_edgemtp_cache_the_platform_location_is_used(monkeypatch):
    monkeypatch.delenv("EDGEMTP_CACHE", raising=False)
    assert cache_root() == Path(platformdirs.user_cache_dir("edgemtp"))


def test_an_empty_edgemtp_cache_counts_as_unset(monkeypatch):
    monkeypatch.setenv("EDGEMTP_CACHE", "")
    assert cache_root() == Path(platformdirs.user_cache_dir("edgemtp"))
