"""The MLX backend: mlx-lm's Llama, Qwen2, Qwen3, DeepSeek-V3 and GLM-4.5 trunks plus DeepSeek-style MTP layers.

- ``backend.py``  ``MLXBackend``, the engine's ``Backend`` interface (load, step, roll back)
- ``models.py``   forward passes: trunk with final hidden states, ``MTPLayer``
- ``llama.py`` / ``qwen2.py`` / ``qwen3.py`` / ``deepseek_v3.py`` / ``glm4_moe.py``  per-architecture construction and weight renaming
- ``weights.py``  checkpoint -> MLX parameters (streamed), MLX directories
- ``cache.py``    preallocated key/value cache with O(1) rollback
"""
