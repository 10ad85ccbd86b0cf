"""edgemtp: on-device LLM inference with multi-token-prediction speculative decoding.

``load`` and ``Model`` are imported on first use, so ``import edgemtp`` (and
the CLI's ``--help``) stays fast and pulls in no numerical library.
"""

__all__ = ["load", "Model"]


def __getattr__(name: str):
    if name in __all__:
        from edgemtp import api

        return getattr(api, name)
    raise AttributeError(f"module 'edgemtp' has no attribute {name!r}")
