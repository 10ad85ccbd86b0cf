"""The drafters a user can name (``--spec``), and the default, in one light module: the CLI's
option defaults and the chat settings read them without importing the engine."""

SPECS = ("hybrid", "mtp", "draft", "ngram", "none")
# n-gram continuation where the context repeats, MTP elsewhere; n-gram alone on models without MTP layers
DEFAULT_SPEC = "hybrid"
