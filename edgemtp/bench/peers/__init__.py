"""``edgemtp bench --peers``: the same checkpoint in the engines a user would pick instead.

One module per peer engine (``ortgenai``, ``llamacpp``, ``mlx_lm``), each building or finding
its model and decoding greedily from token ids; ``edgemtp_engine`` is edgemtp itself behind the
same interface. ``worker`` runs one engine in its own process (so its peak RSS is its own) and
times every engine the same way; ``compare`` checks each peer's answer and interleaves the
timed rounds.
"""
