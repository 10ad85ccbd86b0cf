"""The drafters a user can name (``--spec``), and the default, in one light module: the CLI's
option defaults and the chat settings read them without importing the engine."""

# "mtp-tree": MTP drafting with siblings, verified as a tree (edgemtp/engine/tree.py)
SPECS = ("hybrid", "mtp", "mtp-tree", "draft", "ngram", "none")
# n-gram continuation where the context repeats, MTP elsewhere; n-gram alone on models without MTP layers
DEFAULT_SPEC = "hybrid"
