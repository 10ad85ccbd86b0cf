"""Measuring edgemtp: ``edgemtp bench`` (``runner``), its figures and report, memory
bandwidth and perplexity. See ``runner``'s docstring for what one bench run measures."""
