"""The sigmoid-routed mixture of experts of DeepSeek-V3, which GLM-4.5 shares (noaux_tc routing).

Both release their experts one tensor per expert, route with the same router (sigmoid scores, a
correction bias that only steers selection, grouped top-k) and keep the first
``first_k_dense_replace`` layers dense.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgemtp.converters.onnx_export.graph import GraphBuilder, linear, silu_mul, swiglu_mlp


def dense_or_routed_mlp(g: GraphBuilder, read: Callable[[str], np.ndarray], config: dict, prefix: str,
                        layer_index: int, slot: int) -> Callable[[str], str]:
    """The MLP of layer ``layer_index``: dense below ``first_k_dense_replace``, else ``routed_moe``
    (MTP blocks sit past the trunk, so they are MoE blocks)."""
    if layer_index < config.get("first_k_dense_replace", 0):
        return lambda x: swiglu_mlp(g, x, read, prefix, f"slot{slot}.mlp")
    return lambda x: routed_moe(g, read, config, x, prefix, f"slot{slot}.moe")


def gathered_bytes_per_row(config: dict) -> int:
    """Float32 bytes ``routed_moe`` gathers for each row of a step: the gate, up and down slices of
    the row's chosen experts (0 for a model without routed experts)."""
    if not config.get("n_routed_experts"):
        return 0
    return 4 * 3 * int(config["num_experts_per_tok"]) * int(config["hidden_size"]) * int(config["moe_intermediate_size"])


def routed_moe(g: GraphBuilder, read: Callable[[str], np.ndarray], cfg: dict, x: str, prefix: str,
               name: str) -> str:
    """Routed experts (only the chosen ones are computed) plus the shared experts.

    Routing follows DeepSeek-V3 exactly with standard ops: sigmoid scores; the correction
    bias only steers selection; groups ranked by the sum of their top-2 biased scores; the
    best ``topk_group`` groups kept; top-k experts among them; weights are the unbiased
    scores of those experts, normalised if ``norm_topk_prob``, times routed_scaling_factor.

    Expert evaluation gathers the k chosen experts' weight slices per token from stacked
    ``(E, ...)`` tensors and runs one batched MatMul. That never touches unchosen experts and
    is two nodes, ideal for decoding (a few tokens per step). onnxruntime's MoE/QMoE ops were
    not used because they do their own softmax top-k routing, which is not DeepSeek's (nor GLM-4.5's).
    Experts stay in float (MatMulNBits cannot gather slices); attention and dense layers
    are the quantized part.
    """
    experts, top_k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    groups, top_groups = cfg.get("n_group") or 1, cfg.get("topk_group") or 1
    hidden = cfg["hidden_size"]
    rows = g.node("Reshape", [x, g.const([-1, hidden])], name=f"{name}.rows")  # (n, H)

    router = linear(g, rows, read(prefix + "gate.weight"), f"{name}.router")
    scores = g.node("Sigmoid", [router], name=f"{name}.scores")
    choice = g.node("Add", [scores, g.weight(f"{name}.bias", read(prefix + "gate.e_score_correction_bias"))],
                    name=f"{name}.choice")
    if top_groups < groups:
        grouped = g.node("Reshape", [choice, g.const([-1, groups, experts // groups])], name=f"{name}.grouped")
        top2 = g.node("TopK", [grouped, g.const([2])], name=f"{name}.top2", outputs=2, axis=-1)[0]
        group_scores = g.node("ReduceSum", [top2, g.const([-1])], name=f"{name}.group_scores", keepdims=0)
        kept = g.node("TopK", [group_scores, g.const([top_groups])], name=f"{name}.top_groups", outputs=2,
                      axis=-1)[1]
        one_hot = g.node("OneHot", [kept, g.const(groups), g.const([0.0, 1.0], np.float32)],
                         name=f"{name}.group_one_hot", axis=-1)  # (n, top_groups, groups)
        group_mask = g.node("ReduceMax", [one_hot, g.const([1])], name=f"{name}.group_mask", keepdims=0)
        expert_mask = g.node("Expand", [g.node("Unsqueeze", [group_mask, g.const([2])], name=f"{name}.gm3"),
                                        g.const([1, groups, experts // groups])], name=f"{name}.expert_mask3")
        expert_mask = g.node("Reshape", [expert_mask, g.const([-1, experts])], name=f"{name}.expert_mask")
        in_group = g.node("Cast", [expert_mask], name=f"{name}.in_group", to=9)  # bool
        choice = g.node("Where", [in_group, choice, g.const(-np.inf, np.float32)], name=f"{name}.masked_choice")
    chosen = g.node("TopK", [choice, g.const([top_k])], name=f"{name}.top_k", outputs=2, axis=-1)[1]  # (n, k)
    weights = g.node("GatherElements", [scores, chosen], name=f"{name}.weights", axis=1)
    if cfg.get("norm_topk_prob", True):
        total = g.node("Add", [g.node("ReduceSum", [weights, g.const([-1])], name=f"{name}.wsum", keepdims=1),
                               g.const(1e-20, np.float32)], name=f"{name}.wsum_eps")
        weights = g.node("Div", [weights, total], name=f"{name}.wnorm")
    weights = g.node("Mul", [weights, g.const(cfg.get("routed_scaling_factor", 1.0), np.float32)],
                     name=f"{name}.wscaled")

    # Stacked expert weights, laid out for x @ W: gate_up (E, H, 2I), down (E, I, H).
    gate_up = np.stack([np.concatenate([read(f"{prefix}experts.{e}.gate_proj.weight"),
                                        read(f"{prefix}experts.{e}.up_proj.weight")]).T for e in range(experts)])
    down = np.stack([read(f"{prefix}experts.{e}.down_proj.weight").T for e in range(experts)])
    gu = g.node("Gather", [g.weight(f"{name}.experts.gate_up", gate_up), chosen], name=f"{name}.gather_gate_up",
                axis=0)  # (n, k, H, 2I)
    dn = g.node("Gather", [g.weight(f"{name}.experts.down", down), chosen], name=f"{name}.gather_down", axis=0)
    token = g.node("Unsqueeze", [rows, g.const([1, 2])], name=f"{name}.token")  # (n, 1, 1, H)
    h = g.node("MatMul", [token, gu], name=f"{name}.gate_up")  # (n, k, 1, 2I)
    gate, up = g.node("Split", [h], name=f"{name}.split", outputs=2, axis=-1, num_outputs=2)
    y = g.node("MatMul", [silu_mul(g, gate, up, f"{name}.act"), dn], name=f"{name}.down")  # (n, k, 1, H)
    y = g.node("Squeeze", [y, g.const([2])], name=f"{name}.squeeze")
    y = g.node("Mul", [y, g.node("Unsqueeze", [weights, g.const([2])], name=f"{name}.w3")], name=f"{name}.weighted")
    y = g.node("ReduceSum", [y, g.const([1])], name=f"{name}.combine", keepdims=0)  # (n, H)
    if cfg.get("n_shared_experts"):
        shared = swiglu_mlp(g, rows, read, prefix + "shared_experts.", f"{name}.shared")
        y = g.node("Add", [y, shared], name=f"{name}.plus_shared")
    return g.node("Reshape", [y, g.const([1, -1, hidden])], name=f"{name}.out")
