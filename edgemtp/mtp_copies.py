"""Which tensors of an MTP layer are copies of the trunk's, so that they are stored and loaded once.

DeepSeek-V3/R1/V3.1 and GLM-4.5 store in every MTP layer its own token embedding
(``embed_tokens``) and output head (``shared_head.head``); in those releases they are copies of
the trunk's embedding and output head, 0.93 B parameters each for DeepSeek-V3. A copy that is
byte-identical to the trunk's tensor is left out by the converters, and the MTP layer uses the
trunk's tensor, exactly as for MTP layers that ship without one (edgemtp's trained layers). A
copy that differs (a fine-tune may have changed one) is the layer's own and is kept.

Identity is decided by a hash of the stored bytes (``digest``, computed by streaming the file),
never by the name alone.
"""

from __future__ import annotations

from edgemtp.layout import mtp_prefix

# The parts of an MTP layer that may be its own or the trunk's.
MTP_TRUNK_PARTS = ("embed_tokens", "shared_head.head")


def trunk_head_name(config: dict) -> str:
    """The trunk's output head: ``lm_head``, or the embedding when the two are tied."""
    return "model.embed_tokens.weight" if config.get("tie_word_embeddings", False) else "lm_head.weight"


def trunk_copies(ckpt, index: int) -> dict[str, str]:
    """``{MTP tensor: trunk tensor}`` for the tensors of MTP layer ``index`` that are byte-identical
    copies of the trunk's (``ckpt`` is any checkpoint reader with ``digest``)."""
    prefix = mtp_prefix(ckpt.config, index)
    sources = {prefix + "embed_tokens.weight": "model.embed_tokens.weight",
               prefix + "shared_head.head.weight": trunk_head_name(ckpt.config)}
    names, trunk = set(ckpt.mtp_names(index)), set(ckpt.trunk_names())
    return {name: source for name, source in sources.items()
            if name in names and source in trunk and ckpt.shape(name) == ckpt.shape(source)
            and ckpt.digest(name) == ckpt.digest(source)}


def own_mtp_names(ckpt, index: int) -> list[str]:
    """The tensors of MTP layer ``index`` that are its own: every one but the trunk copies."""
    copies = trunk_copies(ckpt, index)
    return [name for name in ckpt.mtp_names(index) if name not in copies]


def own_parts(ckpt, index: int) -> set[str]:
    """Which of ``"embed_tokens"`` and ``"shared_head.head"`` MTP layer ``index`` has as its own;
    for the others it uses the trunk's embedding and output head."""
    names, prefix = set(own_mtp_names(ckpt, index)), mtp_prefix(ckpt.config, index)
    return {part for part in MTP_TRUNK_PARTS if f"{prefix}{part}.weight" in names}


def parts_from_trunk(ckpt, index: int) -> list[str]:
    """The parts (of ``MTP_TRUNK_PARTS``) MTP layer ``index`` takes from the trunk."""
    return sorted(set(MTP_TRUNK_PARTS) - own_parts(ckpt, index))


def trunk_copy_bytes(ckpt) -> int:
    """Bytes the MTP layers' copies of trunk tensors take in the files (stored, but loaded once)."""
    return sum(ckpt.nbytes(name) for index in range(ckpt.num_mtp_layers) for name in trunk_copies(ckpt, index))
