"""The trained encoder and head exported to plain numpy.

Serving needs three matrix products per query; calling Keras for that costs milliseconds of overhead
and a TensorFlow import at start-up, so training exports the weights and both the indexer and the
service embed through this one class (query and map embeddings cannot differ).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from common.files import atomic_savez, mapped_npz

if TYPE_CHECKING:
    import keras

_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "relu": lambda x: np.maximum(x, 0.0),
    "tanh": np.tanh,
    "linear": lambda x: x,
    # A linear layer whose output is scaled to unit length (contrastive embeddings).
    "linear_l2": lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12),
}


def block_layer(h: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """h @ w + b; a 3-D w (blocks, d_in, d_out) is block-diagonal: each of the `blocks` equal parts
    of h (a VLAD block per image region) has its own projection, at a fraction of a dense matrix's
    size. A part wider than d_in is cut into pieces of d_in values (one per visual word), all
    projected by the same w[i]: a descriptor-space basis tied across the words of a region."""
    if w.ndim == 2:
        return cast(np.ndarray, h @ w + b)
    blocks, d_in, d_out = w.shape
    n, width = h.shape
    tiles = width // (blocks * d_in)
    if tiles * blocks * d_in != width:
        raise ValueError(f"{width} values do not split into {blocks} blocks of pieces of {d_in}")
    if tiles == 1:
        parts = [h[:, i * d_in : (i + 1) * d_in] @ w[i] for i in range(blocks)]
        return cast(np.ndarray, np.concatenate(parts, axis=1) + b)
    out = np.matmul(h.reshape(n, blocks, tiles, d_in), w[None])  # (n, blocks, tiles, d_out)
    return cast(np.ndarray, out.reshape(n, blocks * tiles * d_out) + b)


@dataclass(frozen=True)
class NumpyEncoder:
    """Dense layers (none: the identity, for presets that index the vectors themselves) and the head
    that maps an embedding distance to a relevance in [0, 1]. A layer's weight is (d_in, d_out), or
    (blocks, d_in, d_out) for a block-diagonal one."""

    weights: list[np.ndarray]
    biases: list[np.ndarray]
    activations: list[str]
    head_w: float  # score = sigmoid(head_w * distance + head_b)
    head_b: float
    identity_dim: int = 0  # input width when there are no layers

    @property
    def input_dim(self) -> int:
        if not self.weights:
            return self.identity_dim
        w = self.weights[0]
        return int(w.shape[0]) if w.ndim == 2 else int(w.shape[0] * w.shape[1] * self.tiles)

    @property
    def dim(self) -> int:
        if not self.weights:
            return self.identity_dim
        w = self.weights[-1]
        return int(w.shape[-1]) if w.ndim == 2 else int(w.shape[0] * w.shape[2])

    @property
    def tiles(self) -> int:
        """Pieces per block of a first layer with a tied basis (block_layer): the bias of such a layer
        has one value per output, blocks x tiles x d_out of them."""
        w = self.weights[0]
        return 1 if w.ndim == 2 else len(self.biases[0]) // (w.shape[0] * w.shape[2])

    def with_head(self, head_w: float, head_b: float) -> NumpyEncoder:
        return NumpyEncoder(self.weights, self.biases, self.activations, head_w, head_b, self.identity_dim)

    def embed(self, x: np.ndarray) -> np.ndarray:
        """(n, input_dim) vectors -> (n, dim) float32 embeddings."""
        h = np.asarray(x, dtype=np.float32)
        if h.ndim != 2 or h.shape[1] != self.input_dim:
            raise ValueError(f"expected vectors of shape (n, {self.input_dim}), got {h.shape}")
        for w, b, act in zip(self.weights, self.biases, self.activations, strict=True):
            h = _ACTIVATIONS[act](block_layer(h, w, b))
        return np.ascontiguousarray(h, dtype=np.float32)

    def score(self, distance: np.ndarray) -> np.ndarray:
        """Predicted relevance in [0, 1] from the Euclidean (not squared) distance."""
        z = self.head_w * np.asarray(distance, dtype=np.float64) + self.head_b
        return 1.0 / (1.0 + np.exp(-z))

    def save(self, path: Path) -> Path:
        arrays = {f"w{i}": w for i, w in enumerate(self.weights)} | {f"b{i}": b for i, b in enumerate(self.biases)}
        return atomic_savez(
            path,
            durable=False,
            **arrays,
            activations=np.array(self.activations, dtype=str),
            head=np.array([self.head_w, self.head_b], dtype=np.float64),
            identity_dim=np.array(self.identity_dim),
        )

    @classmethod
    def load(cls, path: Path) -> NumpyEncoder:
        # Memory-mapped: the server's workers share one copy of the weights (hundreds of MB) in the page
        # cache instead of each holding its own.
        z = mapped_npz(path)
        n = len(z["activations"])
        acts = [str(a) for a in z["activations"]]
        unknown = set(acts) - set(_ACTIVATIONS)
        if unknown:
            raise ValueError(f"{path}: unsupported activations {sorted(unknown)}")
        head = z["head"]
        return cls(
            weights=[np.asarray(z[f"w{i}"], dtype=np.float32) for i in range(n)],  # no copy when float32
            biases=[np.asarray(z[f"b{i}"], dtype=np.float32) for i in range(n)],
            activations=acts,
            head_w=float(head[0]),
            head_b=float(head[1]),
            identity_dim=int(z["identity_dim"]) if "identity_dim" in z else 0,
        )

    @classmethod
    def from_keras(cls, siamese: keras.Model) -> NumpyEncoder:
        encoder = siamese.get_layer("encoder")
        ws, bs, acts = [], [], []
        for layer in encoder.layers:
            if layer.__class__.__name__ != "Dense":
                continue  # Input and Dropout do nothing at inference
            w, b = layer.get_weights()
            ws.append(w.astype(np.float32))
            bs.append(b.astype(np.float32))
            acts.append(layer.get_config()["activation"])
        hw, hb = siamese.get_layer("head").get_weights()
        return cls(ws, bs, acts, float(hw.ravel()[0]), float(hb.ravel()[0]))
