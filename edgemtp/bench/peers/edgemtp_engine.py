"""edgemtp itself behind the peers' interface: greedy decoding from token ids, plain or with
its default speculative mode (the default drafter, adaptive draft length)."""

from __future__ import annotations

from collections.abc import Iterator

from edgemtp.engine.specs import DEFAULT_SPEC


class Engine:
    """``spec``: ``model`` (directory), ``backend``, ``threads``, ``mode`` ("plain" or "speculative")."""

    def __init__(self, spec: dict):
        import edgemtp

        options = {"threads": spec["threads"]} if spec["backend"] == "onnx" else {}
        self.model = edgemtp.load(spec["model"], backend=spec["backend"], **options)
        self.options = {"spec": "none"} if spec["mode"] == "plain" else {"spec": DEFAULT_SPEC, "num_draft": "auto"}

    def greedy(self, ids: list[int], max_tokens: int) -> Iterator[list[int]]:
        for chunk in self.model.stream(ids, max_tokens=max_tokens, temperature=0.0, **self.options):
            yield chunk.token_ids
