"""The MLX backend must run in a thread other than the one that loaded it (the TUI loads
in one worker and decodes in another); lazy arrays tied to the loading thread break that."""

from __future__ import annotations

import threading

import numpy as np

from edgemtp.mlx_backend.backend import MLXBackend


def run_in_thread(fn):
    result = {}

    def target():
        try:
            result["value"] = fn()
        except Exception as exc:  # re-raised in the test thread below
            result["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_load_in_one_thread_decode_in_another(tiny_checkpoint):
    # deepseek_v3 uses YaRN RoPE, whose frequency table is built (lazily) at load time.
    path = tiny_checkpoint("deepseek_v3")
    backend = run_in_thread(lambda: MLXBackend.load(path))
    logits = run_in_thread(lambda: backend.trunk_step([1, 2, 3])[0])
    backend.reset()
    assert np.array_equal(logits, backend.trunk_step([1, 2, 3])[0])
