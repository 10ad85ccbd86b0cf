"""Shared fixtures: tiny random checkpoints from ``edgemtp.factory``, built once per session.

Use ``tiny_checkpoint(variant, **options)`` in any test; the same arguments return the same
directory (treat it as read-only). ``FACTORY_VARIANTS`` lists every variant name, handy for
``@pytest.mark.parametrize("variant", FACTORY_VARIANTS)``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from edgemtp.factory import VARIANTS, make_tiny

FACTORY_VARIANTS = list(VARIANTS)  # "llama", "llama_untied", "deepseek_v3", "deepseek_v3_no_qlora", "glm4_moe", ...


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """Keep the user's cache directory free of test conversions (ONNX exports of temporary
    checkpoints, step costs): the session runs with its own ``EDGEMTP_CACHE``, on every OS.
    Only the default model's conversions, minutes of work that do not depend on the test, stay
    shared with the real cache through a link. Tests that set ``EDGEMTP_CACHE`` themselves
    still get their own directory."""
    from edgemtp.paths import cache_root

    real_default = cache_root() / "default"
    real_default.mkdir(parents=True, exist_ok=True)
    cache = tmp_path_factory.mktemp("cache") / "edgemtp"
    cache.mkdir()
    (cache / "default").symlink_to(real_default, target_is_directory=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEMTP_CACHE", str(cache))
        yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Callable[..., Path]:
    """Factory fixture: ``tiny_checkpoint("deepseek_v3", mtp_layers=2, fp8=True) -> Path``.

    Accepts every ``make_tiny`` keyword (mtp_layers, fp8, seed, dtype, fp8_block,
    shard_bytes, config overrides). Checkpoints are cached for the whole session.
    """
    root = tmp_path_factory.mktemp("tiny_checkpoints")
    built: dict[str, Path] = {}

    def build(variant: str = "llama", **options) -> Path:
        key = json.dumps([variant, options], sort_keys=True)
        if key not in built:
            built[key] = make_tiny(root / f"{variant}-{len(built)}", variant, **options)
        return built[key]

    return build


@pytest.fixture
def inject_costs(monkeypatch):
    """``inject_costs(costs_for_max_k)``: the adaptive policies price steps with these costs
    (``costs_for_max_k(max_k) -> Costs``) instead of measuring them, and keep them: the loop's
    own timings of a toy model would otherwise replace them and make the outcome timing-dependent."""
    from edgemtp.engine import tuning

    def inject(costs_for_max_k):
        monkeypatch.setattr("edgemtp.engine.generate.load_or_measure_costs",
                            lambda backend, drafter, name, max_k: costs_for_max_k(max_k))
        for policy in (tuning.AdaptiveDraftLength, tuning.HybridPolicy):
            monkeypatch.setattr(policy, "record_timing", lambda self, timing: None)

    return inject


@pytest.fixture
def llama_copy(tiny_checkpoint, tmp_path):
    """A writable copy of the tiny llama checkpoint, for tests that damage it."""
    path = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("llama"), path)
    return path


def edit_config(path, **changes):
    """Change keys of a checkpoint's config.json in place."""
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
