"""llama.cpp as a peer, through llama-cpp-python, on a GGUF of the same checkpoint: for the
default model the Q4_1 GGUF it is converted from. An HF directory has no GGUF to give it: the
``gguf`` package reads and writes GGUF files but has no HF-to-GGUF converter (that script ships
with llama.cpp's sources, not in a package)."""

from __future__ import annotations

from collections.abc import Iterator

MODULE = "llama_cpp"
NO_GGUF = "llama.cpp: left out, this model has no GGUF (the gguf package cannot convert an HF directory)"


class Engine:
    """``spec``: ``model`` (a .gguf file), ``threads``, ``eos`` (token ids that end an answer),
    ``context`` (tokens of cache)."""

    def __init__(self, spec: dict):
        from llama_cpp import Llama

        self.llm = Llama(model_path=spec["model"], n_ctx=spec["context"], n_threads=spec["threads"],
                         n_threads_batch=spec["threads"], verbose=False)
        self.eos = set(spec["eos"])

    def greedy(self, ids: list[int], max_tokens: int) -> Iterator[list[int]]:
        # temp 0 is llama-cpp-python's greedy sampler. Like edgemtp, it reuses the cached prefix a
        # prompt shares with the previous one (onnxruntime-genai's generator starts afresh).
        for count, token in enumerate(self.llm.generate(ids, temp=0.0, repeat_penalty=1.0), 1):
            yield [int(token)]
            if token in self.eos or count >= max_tokens:
                return
