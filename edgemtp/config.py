"""Reading (and writing) Hugging Face ``config.json`` files.

Two generations of RoPE keys exist in the wild:

* the classic form, ``rope_theta`` at the top level plus an optional ``rope_scaling``
  dict (``{"type": "yarn", "factor": ...}``), read by mlx-lm and older transformers;
* the transformers-5 form, one ``rope_parameters`` dict holding ``rope_type``,
  ``rope_theta`` and the scaling keys together.

We read either, and whenever we write a config we write both so every consumer is happy.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgemtp.errors import UserError

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "glm4_moe", "llama", "qwen2", "qwen3", "qwen3_5", "qwen3_5_moe")

# Qwen3.5, dense and MoE: one layout and one model (mlx-lm's qwen3_5 text model builds both).
QWEN3_5_TYPES = ("qwen3_5", "qwen3_5_moe")

# Released Qwen3.5 checkpoints are vision-language models: the text model's keys sit under
# ``text_config`` (model_type ``qwen3_5_text``, ``qwen3_5_moe_text``) and the top level names the family.
NESTED_TEXT_CONFIG_TYPES = QWEN3_5_TYPES

# transformers' default when a config names no RoPE base at all.
DEFAULT_ROPE_THETA = 10000.0


def load_config(path: str | Path) -> dict:
    """Return the parsed ``config.json`` of a model directory (or of the file itself)."""
    path = Path(path)
    config_path = path / "config.json" if path.is_dir() else path
    if not path.exists():
        raise UserError(f"{path} does not exist; pass the path of a model directory containing config.json")
    if not config_path.is_file():
        raise UserError(f"{path} has no config.json; pass a Hugging Face model directory (config.json + *.safetensors)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{config_path} is not valid JSON ({exc}); fix or re-download the file") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_path} must hold a JSON object; fix or re-download the file")
    return flat_text_config(config)


def flat_text_config(config: dict) -> dict:
    """The text model's keys at the top level, as every other family stores them.

    A Qwen3.5 config nests them in ``text_config``; they are lifted (over the top level's, except
    ``model_type``, which stays the family's) and the vision tower's config is dropped: edgemtp runs
    the text model only. Other configs come back unchanged.
    """
    if config.get("model_type") not in NESTED_TEXT_CONFIG_TYPES or not isinstance(config.get("text_config"), dict):
        return config
    outer = {key: value for key, value in config.items() if key not in ("text_config", "vision_config")}
    return {**outer, **config["text_config"], "model_type": config["model_type"]}


def is_qwen3_5(config: dict) -> bool:
    """Whether the config is Qwen3.5's, dense or MoE."""
    return config.get("model_type") in QWEN3_5_TYPES


def check_supported(config: dict, where: str | Path = "config.json") -> str:
    """Return the config's ``model_type``, or raise if edgemtp cannot run it."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"{where}: unsupported model_type {model_type!r}; edgemtp supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return model_type


def num_mtp_layers(config: dict) -> int:
    """Number of multi-token-prediction layers: DeepSeek's ``num_nextn_predict_layers`` or Qwen's
    ``mtp_num_hidden_layers``."""
    return int(config.get("num_nextn_predict_layers") or config.get("mtp_num_hidden_layers") or 0)


# A fusion head's trunk layers (ARCHITECTURE.md, "The MTP convention"): config.json key and
# mtp.safetensors metadata key alike.
MTP_FUSION_KEY = "mtp_fusion_layers"


def mtp_fusion_layers(config: dict) -> tuple[int, int] | None:
    """The two trunk layers whose outputs MTP layer 0's ``fuse_proj`` reads, or None for a plain head."""
    layers = config.get(MTP_FUSION_KEY)
    if layers is None:
        return None
    if (not isinstance(layers, list) or len(layers) != 2
            or not all(isinstance(i, int) and 0 <= i < config["num_hidden_layers"] - 1 for i in layers)):
        raise UserError(f"config.json: {MTP_FUSION_KEY} must be two trunk layer indices below "
                        f"{config['num_hidden_layers'] - 1}, got {layers!r}; re-create the MTP layers with train-mtp")
    return tuple(layers)


def rope_theta(config: dict) -> float:
    """The RoPE base frequency, from ``rope_parameters`` or the classic top-level key."""
    params = config.get("rope_parameters") or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    return float(config.get("rope_theta", DEFAULT_ROPE_THETA))


def partial_rotary_factor(config: dict) -> float:
    """The fraction of each head's dimensions that RoPE rotates (the leading ones), from
    ``rope_parameters`` or the classic top-level key. GLM-4.5 configs default to half, as
    transformers' ``Glm4MoeConfig`` does, Qwen3.5 configs to a quarter, as ``Qwen3_5TextConfig``
    does; other models rotate every dimension."""
    default = {"glm4_moe": 0.5, "qwen3_5": 0.25, "qwen3_5_moe": 0.25}.get(config.get("model_type"), 1.0)
    params = config.get("rope_parameters") or {}
    return float(params.get("partial_rotary_factor", config.get("partial_rotary_factor", default)))


def rope_scaling(config: dict) -> dict | None:
    """The RoPE scaling parameters in the classic form, or None for plain RoPE.

    The result carries both ``type`` and ``rope_type`` (readers disagree on the name)
    and never ``rope_theta``. Like transformers, a classic ``rope_scaling`` wins over
    ``rope_parameters`` when both are present.
    """
    params = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return None
    scaling = {key: value for key, value in params.items() if key != "rope_theta"}
    scaling["type"] = scaling["rope_type"] = kind
    return scaling


def with_both_rope_forms(config: dict) -> dict:
    """A copy of ``config`` with RoPE written in the classic and the transformers-5 form."""
    theta = rope_theta(config)
    scaling = rope_scaling(config)
    out = dict(config)
    out["rope_theta"] = theta
    out["rope_scaling"] = scaling
    parameters = {"rope_type": "default", "rope_theta": theta}
    if scaling is not None:
        parameters.update({key: value for key, value in scaling.items() if key != "type"})
    if "partial_rotary_factor" in (config.get("rope_parameters") or {}) or "partial_rotary_factor" in config:
        out["partial_rotary_factor"] = parameters["partial_rotary_factor"] = partial_rotary_factor(config)
    # Qwen3.5's multimodal RoPE sections: with text-only positions every section rotates by the
    # same position, so they change nothing here, but the released configs carry them.
    parameters.update({key: value for key, value in (config.get("rope_parameters") or {}).items()
                       if key.startswith("mrope_")})
    out["rope_parameters"] = parameters
    return out
