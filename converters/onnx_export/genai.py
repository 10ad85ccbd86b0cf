"""``export_genai``: an HF checkpoint directory -> a directory onnxruntime-genai loads.

onnxruntime-genai (0.16 and later) runs a decoder-only model from ``genai_config.json`` plus the
graphs it names, and drafts with one MTP head through ``og.MtpGenerator``. Its layout:

    genai_config.json      model.decoder (graph names, heads), model.mtp, speculative, search
    model.onnx(.data)      input_ids, attention_mask, past_key_values.N.key/value ->
                           logits, hidden_states (after the final norm), present.N.key/value
    mtp/genai_config.json  the MTP head, loaded as an og.Model of its own (as onnxruntime-genai's
    mtp/mtp.onnx(.data)    docs lay it out): input_ids, hidden_states, attention_mask,
                           past_key_values.0.* -> logits, hidden_states_out, present.0.*
    config.json, tokenizer files

The graphs are edgemtp's own (model.py, quantize.py), with their I/O renamed and the GQA lengths
derived from ``attention_mask`` the way onnxruntime-genai's builder derives them. onnxruntime-genai
allocates each cache as one buffer bound as both past and present (``past_present_share_buffer``),
which is how edgemtp's graphs use GQA too. Their extra attention row (llama.py) is written one
slot past the step, so ``context_length`` is one less than the graphs' RoPE tables.

With an MTP head the main model also outputs its logits in float16, as ``logits_float16``:
onnxruntime-genai 0.18's MtpGenerator takes the argmax of the main model's logits on the CPU
through a cast to float32 that refuses float32 input ("Cast - input and output types are the
same"), so it needs the main model loaded with ``model.decoder.outputs.logits`` overlaid to that
output (``edgemtp.bench.peers.ortgenai_export.load_genai`` does). Rounding to float16 (11 significant bits)
can change a greedy choice where the two best logits are that close; plain ``og.Generator``
keeps the float32 logits and edgemtp's exact greedy output (onnxruntime computes only the outputs
a run asks for, so the cast costs it nothing).

onnxruntime-genai allocates the caches at the generation's ``max_length``, not ``context_length``,
and the extra attention row needs the slot past the step: run it with ``max_length`` a few
positions above the prompt plus the tokens wanted (the verify step of MtpGenerator looks ahead).

onnxruntime-genai chains one MTP head for every draft position, so only the first MTP layer is
exported; its ``hidden_states_out`` is the layer's output before ``shared_head.norm``, the input
edgemtp's convention gives the next depth. The head scores the full vocabulary (onnxruntime-genai
reads draft token ids from the logits' columns), whatever draft vocabulary the source has.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from edgemtp.checkpoint import Checkpoint
from edgemtp.converters.onnx_export.export import Progress, build_graph, check_options, empty_partial_dir, publish
from edgemtp.converters.onnx_export.graph import save_model
from edgemtp.converters.onnx_export.llama import head_dim
from edgemtp.converters.onnx_export.model import build_mtp, build_trunk
from edgemtp.errors import UserError
from edgemtp.mtp_copies import own_parts
from edgemtp.tokenizer import copy_tokenizer_files, load_tokenizer

GENAI_CONFIG = "genai_config.json"
DECODER_FILE = "model.onnx"
FLOAT16_LOGITS = "logits_float16"  # the main model's logits for MtpGenerator (module docstring)
MTP_DIR, MTP_FILE = "mtp", "mtp.onnx"  # the head is an og.Model of its own: a directory with its config
# The llama-family trunks whose graphs (llama.py) use GQA with one K and V per head.
GENAI_ARCHS = ("llama", "qwen2", "qwen3")
# onnxruntime-genai accepts 1..16; edgemtp's measured best fixed k on its bench prompts is 2.
MAX_DRAFT_TOKENS = 2

# edgemtp graph I/O name -> onnxruntime-genai's, per graph.
_TRUNK_NAMES = {"hidden": "hidden_states"}
_MTP_NAMES = {"hidden": "hidden_states", "h1": "hidden_states_out"}


def export_genai(checkpoint: str | Path, out_dir: str | Path, bits: int | None = 4, group_size: int = 32,
                 mtp_bits: int | None = None, progress: Progress | None = None,
                 affine_trunk: bool = False) -> Path:
    """Convert ``checkpoint`` into ``out_dir`` in onnxruntime-genai's layout (module docstring).

    ``bits``, ``mtp_bits``, ``group_size`` and ``affine_trunk`` as for ``export_onnx``."""
    mtp_bits = bits if mtp_bits is None else mtp_bits
    check_options(bits, mtp_bits, group_size, "float32")
    ckpt = Checkpoint.open(checkpoint)
    config = ckpt.config
    arch = config["model_type"]
    if arch == "deepseek_v3":
        raise UserError("--genai cannot export deepseek_v3: onnxruntime-genai caches K and V per head at one head size, "
                        "MLA caches one latent and one rope key of different widths per token; export it without --genai")
    if arch not in GENAI_ARCHS:
        raise UserError(f"--genai exports {', '.join(GENAI_ARCHS)} trunks, not {arch}; export it without --genai")
    eos_ids = load_tokenizer(ckpt.path).eos_token_ids
    if not eos_ids:
        raise UserError(f"{ckpt.path} names no eos_token_id, which onnxruntime-genai needs to stop; "
                        "add it to config.json or generation_config.json")
    out, partial = empty_partial_dir(out_dir)

    max_positions = int(config.get("max_position_embeddings", 4096))
    # onnxruntime-genai feeds no logits_from: its decoder gives every row's logits.
    graphs = [(DECODER_FILE, lambda: build_trunk(config, ckpt.read, max_positions, logits_from_input=False),
               bits, affine_trunk, _TRUNK_NAMES)]
    if ckpt.num_mtp_layers:
        (partial / MTP_DIR).mkdir()
        graphs.append((f"{MTP_DIR}/{MTP_FILE}", lambda: build_mtp(config, ckpt.read, 0, max_positions, own_parts(ckpt, 0)),
                       mtp_bits, False, _MTP_NAMES))
    for done, (file, build, graph_bits, affine, names) in enumerate(graphs):
        model = build_graph(file, build, graph_bits, group_size, affine, progress, done, len(graphs))
        to_genai_io(model, names, float16_logits=file == DECODER_FILE and ckpt.num_mtp_layers > 0)
        save_model(model, partial / file)
        del model
    if progress:
        progress("done", len(graphs), len(graphs))

    shutil.copy2(ckpt.path / "config.json", partial / "config.json")
    copy_tokenizer_files(ckpt.path, partial)
    for file, genai_config in genai_configs(config, max_positions, ckpt.num_mtp_layers > 0, eos_ids).items():
        (partial / file).write_text(json.dumps(genai_config, indent=2) + "\n")
    return publish(partial, out)


def to_genai_io(model: onnx.ModelProto, names: dict[str, str], float16_logits: bool = False) -> None:
    """Rename ``model``'s I/O by ``names`` and replace its GQA length inputs by ``attention_mask``, in place.

    onnxruntime-genai feeds ``attention_mask`` ``(1, past + n)`` of ones; edgemtp's graphs take
    ``seqlens_k`` = past + n (the step's length plus its repeated attention row, minus one) and
    ``total_sequence_length`` = past + n + 1 (llama.py). ``float16_logits``: add the logits in float16
    as a second output (see the module docstring)."""
    graph = model.graph
    if float16_logits:
        logits = next(value for value in graph.output if value.name == "logits")
        graph.node.append(helper.make_node("Cast", ["logits"], [FLOAT16_LOGITS], name="genai.logits_float16",
                                           to=TensorProto.FLOAT16))
        dims = [dim.dim_param or dim.dim_value for dim in logits.type.tensor_type.shape.dim]
        graph.output.append(helper.make_tensor_value_info(FLOAT16_LOGITS, TensorProto.FLOAT16, dims))
    for value in [*graph.input, *graph.output]:
        value.name = names.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [names.get(name, name) for name in node.input]
        node.output[:] = [names.get(name, name) for name in node.output]
    lengths = [value for value in graph.input if value.name in ("seqlens_k", "total_sequence_length")]
    for value in lengths:
        graph.input.remove(value)
    graph.input.insert(1, helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                                        [1, "total_sequence_length"]))
    one = helper.make_tensor("genai.one", TensorProto.INT64, [1], [1])
    axis = helper.make_tensor("genai.axis1", TensorProto.INT64, [1], [1])
    graph.initializer.extend([one, axis])
    graph.node.insert(0, helper.make_node("ReduceSum", ["attention_mask", "genai.axis1"], ["genai.past_plus_n"],
                                          name="genai.past_plus_n", keepdims=0))
    graph.node.insert(1, helper.make_node("Cast", ["genai.past_plus_n"], ["seqlens_k"], name="genai.seqlens_k",
                                          to=TensorProto.INT32))
    graph.node.insert(2, helper.make_node("Shape", ["attention_mask"], ["genai.mask_width"], name="genai.mask_width",
                                          start=1, end=2))
    graph.node.insert(3, helper.make_node("Add", ["genai.mask_width", "genai.one"], ["genai.total"], name="genai.total"))
    graph.node.insert(4, helper.make_node("Squeeze", ["genai.total"], ["genai.total_scalar"], name="genai.total_scalar"))
    graph.node.insert(5, helper.make_node("Cast", ["genai.total_scalar"], ["total_sequence_length"],
                                          name="genai.total_sequence_length", to=TensorProto.INT32))


def genai_configs(config: dict, max_positions: int, has_mtp: bool, eos_ids: set[int]) -> dict[str, dict]:
    """The ``genai_config.json`` files ``export_genai`` writes, by path in the export: the main
    model's, and with an MTP layer the head's (keys as onnxruntime-genai's builder writes them)."""
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    cache_inputs = {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    cache_outputs = {"present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}

    def decoder(file: str, layers: int) -> dict:
        return {"session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": file, "head_size": head_dim(config), "hidden_size": config["hidden_size"],
                "num_attention_heads": config["num_attention_heads"], "num_hidden_layers": layers,
                "num_key_value_heads": kv_heads,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", **cache_inputs},
                "outputs": {"logits": "logits", **cache_outputs}}

    def genai_config(decoder: dict) -> dict:
        return {
            "model": {
                "type": config["model_type"],
                # onnxruntime-genai stops at any of these: the same stop set edgemtp's tokenizer uses.
                "eos_token_id": sorted(eos_ids),
                # It needs numbers here even where the model has none; it only pads with them.
                "bos_token_id": _first_id(config.get("bos_token_id"), min(eos_ids)),
                "pad_token_id": _first_id(config.get("pad_token_id"), min(eos_ids)),
                "vocab_size": config["vocab_size"],
                "context_length": max_positions - 1,  # one slot for the repeated attention row (module docstring)
                "decoder": decoder,
            },
            "search": {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": max_positions - 1,
                       "min_length": 0, "past_present_share_buffer": True, "repetition_penalty": 1.0,
                       "temperature": 1.0, "top_k": 50, "top_p": 1.0, "early_stopping": True,
                       "length_penalty": 1.0, "diversity_penalty": 0.0, "no_repeat_ngram_size": 0},
        }

    main = genai_config(decoder(DECODER_FILE, config["num_hidden_layers"]))
    if not has_mtp:
        return {GENAI_CONFIG: main}
    main["model"]["decoder"]["outputs"]["hidden_states"] = "hidden_states"
    # What og.MtpGenerator reads from the main model's config; the head itself is the model in mtp/.
    main["model"]["mtp"] = {
        "enabled": True, "filename": f"{MTP_DIR}/{MTP_FILE}", "num_hidden_layers": 1,
        "num_key_value_heads": kv_heads, "head_size": head_dim(config),
        "main_hidden_states": "hidden_states",
        "inputs": {"input_ids": "input_ids", "hidden_states": "hidden_states", "attention_mask": "attention_mask",
                   **cache_inputs},
        "outputs": {"logits": "logits", "hidden_states": "hidden_states_out", **cache_outputs},
    }
    main["speculative"] = {"max_draft_tokens": MAX_DRAFT_TOKENS}
    head = genai_config(decoder(MTP_FILE, 1))
    head["model"]["decoder"]["inputs"]["hidden_states"] = "hidden_states"
    return {GENAI_CONFIG: main, f"{MTP_DIR}/{GENAI_CONFIG}": head}


def _first_id(value: int | list[int] | None, fallback: int) -> int:
    if isinstance(value, list):
        return value[0] if value else fallback
    return fallback if value is None else value
