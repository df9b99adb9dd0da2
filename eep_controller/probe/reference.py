"""The MoE layer computed in one process straight from the checkpoint: the probe's ground truth.

Router: ``logits = x @ gate[l].T``; the ``top_k`` largest logits per token (ties to the
lower expert id), their softmax as the combine weights. Expert MLP (SwiGLU):
``(silu(x @ w1.T) * (x @ w3.T)) @ w2.T``. Everything is float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from eep_controller.probe.checkpoint import CheckpointReader

FloatArray = np.ndarray[Any, np.dtype[np.float32]]
IntArray = np.ndarray[Any, np.dtype[np.int64]]


def route(tokens: FloatArray, gate: FloatArray, top_k: int) -> tuple[IntArray, FloatArray]:
    """Experts ``[n, k]`` chosen per token and their combine weights ``[n, k]`` (rows sum to 1)."""
    logits: FloatArray = (tokens @ gate.T).astype(np.float32)
    # stable sort on -logits: equal logits keep the lower expert id first
    order = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
    chosen = np.take_along_axis(logits, order, axis=1)
    shifted = np.exp(chosen - chosen.max(axis=1, keepdims=True))
    weights = (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)
    return order.astype(np.int64), weights


def expert_mlp(tokens: FloatArray, w1: FloatArray, w2: FloatArray, w3: FloatArray) -> FloatArray:
    """One expert applied to ``tokens [n, H]``: ``[n, H]``."""
    gate = tokens @ w1.T
    up = tokens @ w3.T
    hidden = (gate / (np.float32(1.0) + np.exp(-gate))) * up
    out: FloatArray = (hidden @ w2.T).astype(np.float32)
    return out


def moe_layer(reader: CheckpointReader, layer: int, tokens: FloatArray) -> FloatArray:
    """The full MoE layer output ``[n, H]`` for ``tokens [n, H]`` from the checkpoint alone."""
    experts, weights = route(tokens, reader.gate(layer), reader.meta.top_k)
    out = np.zeros_like(tokens, dtype=np.float32)
    for e in np.unique(experts):
        rows, ks = np.nonzero(experts == e)
        w1, w2, w3 = reader.expert(layer, int(e))
        out[rows] += weights[rows, ks, None] * expert_mlp(tokens[rows], w1, w2, w3)
    return out


def probe_tokens(num_tokens: int, hidden: int, seed: int) -> FloatArray:
    """The deterministic probe batch ``[num_tokens, H]`` for ``seed``."""
    rng = np.random.default_rng([seed, 0x9E37])
    return rng.standard_normal((num_tokens, hidden), dtype=np.float32)
