"""Shared fixtures: tiny random checkpoints from ``edgemtp.factory``, built once per session.

Use ``tiny_checkpoint(variant, **options)`` in any test; the same arguments return the same
directory (treat it as read-only). ``FACTORY_VARIANTS`` lists every variant name, handy for
``@pytest.mark.parametrize("variant", FACTORY_VARIANTS)``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from edgemtp.factory import VARIANTS, make_tiny

FACTORY_VARIANTS = list(VARIANTS)  # "llama", "llama_untied", "deepseek_v3", "deepseek_v3_no_qlora", "glm4_moe", ...

# The default trunk's perplexity in every format (tests/test_fidelity.py) scores 20,480 tokens five
# times: 17 of the suite's 33 minutes on this 2-core AVX2 machine, mostly on one core (8-bit
# MatMulNBits runs a long step a row at a time here). It starts in a process of its own as soon as
# the tests are collected and its tests run last, so it runs beside the rest of the suite.
PERPLEXITY_TEST = "test_default_trunk_perplexity"
PERPLEXITY_TEXT = Path(__file__).parents[2] / "shared/data/corpus/gutenberg/austen-persuasion.txt"
_MEASURE = ("import json, sys; from pathlib import Path; from scripts.perplexity_table import TOKENS, measure_all; "
            "results = measure_all(Path(sys.argv[1]), Path(sys.argv[2]).read_text(encoding='utf-8'), TOKENS); "
            "print(json.dumps([[key if isinstance(key, str) else list(key), value] for key, value in results.items()]))")
perplexity_run = pytest.StashKey[tuple[subprocess.Popen, Path]]()


def pytest_collection_modifyitems(session, config, items):
    perplexity_tests = [item for item in items if PERPLEXITY_TEST in item.nodeid]
    # They run last, so that waiting for the measurement holds up no other test.
    items[:] = [item for item in items if PERPLEXITY_TEST not in item.nodeid] + perplexity_tests
    if PERPLEXITY_TEXT.is_file() and perplexity_tests:
        workdir = Path(tempfile.mkdtemp(prefix="edgemtp-perplexity-"))
        env = {**os.environ, "EDGEMTP_CACHE": str(workdir / "cache")}
        process = subprocess.Popen([sys.executable, "-c", _MEASURE, str(workdir), str(PERPLEXITY_TEXT)],
                                   cwd=Path(__file__).parents[1], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        config.stash[perplexity_run] = process, workdir


def pytest_sessionfinish(session, exitstatus):
    process, workdir = session.config.stash.get(perplexity_run, (None, None))
    if process is not None:
        process.kill()
        process.communicate()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2_perplexities(request) -> dict:
    """``{"fp16": ppl, (format, bits): ppl, ...}`` (``scripts.perplexity_table.measure_all``) from
    the process ``pytest_collection_modifyitems`` started; skips when the held-out text is absent."""
    if perplexity_run not in request.config.stash:
        pytest.skip(f"held-out corpus {PERPLEXITY_TEXT} is absent (it lives outside the repository, in ../shared/data/corpus)")
    process, _ = request.config.stash[perplexity_run]
    out, err = process.communicate()
    if process.returncode != 0:
        pytest.fail(f"the perplexity measurement failed: {err.strip().splitlines()[-1:]}")
    return {key if isinstance(key, str) else tuple(key): value for key, value in json.loads(out.splitlines()[-1])}


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
