"""Export Hugging Face checkpoints (llama, deepseek_v3, glm4_moe with MTP layers) to ONNX graphs for onnxruntime."""

from edgemtp.converters.onnx_export.export import export_onnx

__all__ = ["export_onnx"]
