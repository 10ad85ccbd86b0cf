"""Token provenance: how each generated token was produced, rendered as styled text.

The engine labels every emitted token:

- ``"draft"``: a drafted token the target model accepted,
- ``"branch"``: a drafted token the target accepted from a side branch of a draft tree (``--spec
  mtp-tree``): the draft head's second or later guess at that position, taken where its first
  guess was rejected,
- ``"correction"``: the target model's own token after it rejected a draft,
- ``"bonus"``: the target's extra token after all drafts were accepted (or a plain step).

Colour mode uses a distinct colour per kind. Plain mode is for colour-blind users
and monochrome terminals: it tells the kinds apart by text attributes only.
"""

from __future__ import annotations

from rich.text import Text

KINDS = ("draft", "branch", "correction", "bonus")

LABELS = {"draft": "accepted draft", "branch": "side branch", "correction": "correction", "bonus": "bonus"}

COLOUR_STYLES = {
    "draft": "bold #4ec9b0",
    "branch": "bold #c586c0",
    "correction": "bold #f48771",
    "bonus": "bold #dcdcaa",
}

# No colour at all: each kind gets an attribute the others lack.
PLAIN_STYLES = {
    "draft": "italic",
    "branch": "reverse",
    "correction": "underline",
    "bonus": "bold",
}


def style_for(kind: str, plain: bool) -> str:
    return (PLAIN_STYLES if plain else COLOUR_STYLES)[kind]


def render_tokens(pieces: list[tuple[str, str]], plain: bool) -> Text:
    """Concatenate ``(token text, kind)`` pieces, each styled by its kind."""
    text = Text()
    for piece, kind in pieces:
        text.append(piece, style_for(kind, plain))
    return text


def legend(plain: bool) -> Text:
    """One line naming each kind in its own style."""
    text = Text("tokens: ")
    for i, kind in enumerate(KINDS):
        if i:
            text.append("  ")
        text.append(LABELS[kind], style_for(kind, plain))
    return text
