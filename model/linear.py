"""The linear encoders of the aggregate vectors, and the matching pairs they learn from.

An encoder is a PCA of the map vectors (optionally preceded by a PCA of each VLAD block, one per
image region, which keeps the projection small however many regions there are), then optionally the
whitening learned from matching pairs, then optionally a rotation onto balanced principal axes (for
product-quantisation codes), then L2 normalisation.

Matching pairs come from locations alone. Anchors are the train queries and the map images at least
`holdout_m` from every query the encoder does not learn from (map-map relevance follows from locations, so they
add thousands of anchors for free; those near the held-out areas are left out so the held-out figures
stay honest). An anchor's positives are its relevant map images (sim; map images under `min_pair_m`
apart are the same frame, not a pair), each with its graded relevance fov.
"""

from __future__ import annotations

import numpy as np

from common.pipeline import LinearConf
from dataset.layout import Dataset
from dataset.relevance import fov_matrix, pairwise_distance, sim_matrix
from model.encoder import NumpyEncoder, block_layer
from model.projection import balanced_axes, pair_whitening, pca_projection


def anchors_and_positives(
    dataset: Dataset, split: dict[str, np.ndarray], conf: LinearConf
) -> tuple[list[int], list[np.ndarray], list[np.ndarray]]:
    """Anchor rows of [map images; queries] (queries offset by the map size), the relevant map
    images of each and their fov. Raises ValueError when there is nothing to train on."""
    assert dataset.sim is not None and dataset.fov is not None, "training needs ground truth"
    ndb = len(dataset.database)
    rows, pos, fov = [], [], []
    for q in split["train"]:
        p = np.flatnonzero(dataset.sim[q])
        if len(p):
            rows.append(ndb + int(q))
            pos.append(p)
            fov.append(dataset.fov[q, p].astype(np.float32))
    if conf.map_pairs:
        loc = dataset.database.loc
        # Queries the encoder does not learn from (val may be a sample of train: then it is not held).
        held = dataset.queries.loc[np.setdiff1d(np.concatenate([split["val"], split["test"]]), split["train"])]
        usable = pairwise_distance(loc, held).min(axis=1, initial=np.inf) >= conf.holdout_m
        msim = sim_matrix(loc, loc) & (pairwise_distance(loc, loc) >= conf.min_pair_m)
        msim &= usable[None, :]
        mfov = fov_matrix(loc, loc)
        for j in np.flatnonzero(usable):
            p = np.flatnonzero(msim[j])
            if len(p):
                rows.append(int(j))
                pos.append(p)
                fov.append(mfov[j, p].astype(np.float32))
    if not rows:
        raise ValueError("no train query or usable map image has a relevant map image: nothing to train on")
    return rows, pos, fov


def base_projection(
    conf: LinearConf, dataset: Dataset, xq: np.ndarray, xd: np.ndarray, split: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """The linear part of the preset's encoder, (d, embed_dim) and its offset: PCA of the map vectors
    to embed_dim (whitened by whiten_power), then, for `pair-whiten`, the whitening learned from
    the matching pairs above (each weighted by its fov: graded relevance). Raises ValueError when
    there are no pairs."""
    proj, offset = pca_projection(xd, conf.embed_dim, conf.whiten_power)
    if conf.whiten == "pca":
        return proj, offset
    rows, pos, fov = anchors_and_positives(dataset, split, conf)
    z = np.concatenate([xd @ proj + offset, xq @ proj + offset])
    first = np.repeat(rows, [len(p) for p in pos])
    w = pair_whitening(z, first, np.concatenate(pos), np.concatenate(fov), conf.whiten_shrink)
    return (proj @ w).astype(np.float32), (offset @ w).astype(np.float32)


def linear_encoder(
    conf: LinearConf,
    dataset: Dataset,
    xq: np.ndarray,
    xd: np.ndarray,
    split: dict[str, np.ndarray],
    n_blocks: int = 1,
    n_words: int = 0,
) -> NumpyEncoder:
    """The preset's linear encoder (no score head yet). With `block_dim`, each of the n_blocks equal
    blocks of the vectors is first projected on its own top block_dim principal directions (fitted on
    the map vectors, not whitened); base_projection then works on their concatenation.

    With `word_basis` r as well (and n_words, the visual words of a VLAD block), each block's
    projection is factored through the r-dimensional descriptor subspace that carries most of it,
    shared by the block's words: every word's residual is first reduced to r values (one small
    product), and the block projection then reads words x r values instead of words x 256. That is
    what a query streams from memory: 4 x less at r 64 of 256.

    With `code_bins` g, the output basis is rotated onto the map embeddings' principal axes dealt into
    g groups of balanced variance (model/projection.py: balanced_axes): no distance changes, and a
    large collection's product-quantisation codes (g = the index's m) lose less of them."""
    weights, biases, acts = [], [], []
    if conf.block_dim:
        if xd.shape[1] % n_blocks:
            raise ValueError(f"vectors of {xd.shape[1]} values do not split into {n_blocks} blocks")
        size = xd.shape[1] // n_blocks
        parts = [pca_projection(xd[:, i * size : (i + 1) * size], conf.block_dim) for i in range(n_blocks)]
        w, b = np.stack([p for p, _ in parts]), np.concatenate([o for _, o in parts])
        if conf.word_basis:
            basis, w = word_basis(w, n_words, conf.word_basis)
            weights.append(basis)
            biases.append(np.zeros(n_blocks * n_words * basis.shape[2], np.float32))
            acts.append("linear")
            xd, xq = block_layer(xd, basis, biases[-1]), block_layer(xq, basis, biases[-1])
        weights.append(w)
        biases.append(b)
        acts.append("linear")
        xd, xq = block_layer(xd, w, b), block_layer(xq, w, b)
    proj, offset = base_projection(conf, dataset, xq, xd, split)
    if conf.code_bins:
        # The output in the map embeddings' principal axes, dealt into code_bins balanced groups: the
        # same distances (normalisation commutes with a rotation), better product-quantisation codes.
        z = NumpyEncoder([proj], [offset], ["linear_l2"], 0.0, 0.0).embed(xd)  # the map embeddings as served
        basis = balanced_axes(z, conf.code_bins)
        proj, offset = (proj @ basis).astype(np.float32), (offset @ basis).astype(np.float32)
    return NumpyEncoder([*weights, proj], [*biases, offset], [*acts, "linear_l2"], 0.0, 0.0)


def word_basis(w: np.ndarray, n_words: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """A block-diagonal projection w (blocks, n_words * d, out) factored as basis then reduced
    projection: basis (blocks, d, rank) holds each block's top `rank` left singular vectors of its
    words' slices side by side (d x n_words * out), and the reduced projection (blocks, n_words * rank,
    out) is each slice seen through them, so basis-then-reduced equals w projected on that subspace."""
    blocks, width, out = w.shape
    if n_words <= 0 or width % n_words:
        raise ValueError(f"blocks of {width} values do not split into {n_words} visual words")
    d = width // n_words
    if not 0 < rank <= d:
        raise ValueError(f"word_basis {rank} must be in 1..{d}")
    slices = w.reshape(blocks, n_words, d, out)
    basis = np.empty((blocks, d, rank), np.float32)
    reduced = np.empty((blocks, n_words * rank, out), np.float32)
    for i in range(blocks):
        u = np.linalg.svd(slices[i].transpose(1, 0, 2).reshape(d, n_words * out), full_matrices=False)[0][:, :rank]
        basis[i] = u
        reduced[i] = np.einsum("dr,wdo->wro", u, slices[i]).reshape(n_words * rank, out)
    return basis, reduced
