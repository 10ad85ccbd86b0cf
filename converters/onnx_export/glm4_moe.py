"""GLM-4.5 blocks: llama.py's GroupQueryAttention (q/k/v biases, optional QK norm, partial RoPE
inside GQA, the repeated last row), then DeepSeek-V3's sigmoid-routed MoE (moe.py)."""

from __future__ import annotations

from edgemtp.converters.onnx_export.graph import Block
from edgemtp.converters.onnx_export.llama import LlamaLayers
from edgemtp.converters.onnx_export.moe import dense_or_routed_mlp


class Glm4MoeLayers(LlamaLayers):
    """Adds GLM-4.5 decoder blocks to ``g``: llama's attention, DeepSeek's dense-then-routed MLPs."""

    def block(self, prefix: str, layer_index: int, slot: int) -> Block:
        read = self.read
        return (lambda x: self._attention(x, prefix + "self_attn.", slot),
                dense_or_routed_mlp(self.g, read, self.config, prefix + "mlp.", layer_index, slot),
                read(prefix + "input_layernorm.weight"), read(prefix + "post_attention_layernorm.weight"))
