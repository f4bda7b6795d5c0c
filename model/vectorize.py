"""Local ORB features -> one fixed-length vector per image, as the preset says.

- `concat`: the published representation, the first n descriptors in detection order as 0/1 bits.
- `bow`: bag of visual words, sqrt-tf x idf, L2-normalised (the published comparison baseline).
- `vlad`: sums of residuals to a visual vocabulary, intra-normalised, power-normalised, L2-normalised.

The learned parts (vocabulary, idf) are fitted once on training images and saved as `vectorizer.npz`
next to the model and the index, so the service vectorises uploads with exactly those.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from common.files import atomic_savez
from common.pipeline import VectorConf
from features.orb import OrbFeatures

EPS = 1e-12
WORDS_CHUNK = 65_536  # descriptors per distance matrix in `Vectorizer.words` (32 MB of float32 at 128 words)


def concat_bits(features: OrbFeatures, n_descriptors: int) -> np.ndarray:
    """The first n descriptors in detection order, as 0/1 bits; fewer keypoints are zero-padded."""
    bits = np.unpackbits(features.descriptors[:n_descriptors], axis=1).astype(np.float32)
    out = np.zeros((n_descriptors, 256), dtype=np.float32)
    out[: len(bits)] = bits
    return out.reshape(-1)


def unpack(descriptors: np.ndarray) -> np.ndarray:
    """(n, 32) uint8 ORB descriptors -> (n, 256) float32 bits, where L2^2 equals Hamming distance."""
    return np.unpackbits(descriptors, axis=1).astype(np.float32)


def train_vocabulary(
    descriptors: np.ndarray, k: int, seed: int, niter: int = 20, max_points: int = 300_000
) -> np.ndarray:
    """k-means centroids (k, 256) of descriptors in bit space, on a seeded sample."""
    rng = np.random.default_rng(seed)
    if len(descriptors) > max_points:
        descriptors = descriptors[rng.choice(len(descriptors), max_points, replace=False)]
    if len(descriptors) < k:
        raise ValueError(f"need at least {k} descriptors to train a {k}-word vocabulary, got {len(descriptors)}")
    km = faiss.Kmeans(256, k, niter=niter, seed=seed, verbose=False, max_points_per_centroid=max_points // k + 1)
    km.train(unpack(descriptors))
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def residual_sums(descriptors: np.ndarray, words: np.ndarray, cells: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(n_cells, k, 256) sums of the residuals (bits - centroids[word]) of the descriptors in each
    cell (an int in [0, n_cells), n_cells = cells.max() + 1) and word.

    The bits are summed as integers and the centroid taken off once a group (sum of bits - count x
    centroid), so no float residual matrix is formed; and each descriptor's 256 bits become 16-bit
    counters packed four to a uint64 (32-bit, two to one, from 65,536 descriptors on, so that no
    counter can overflow): one integer add sums four bit positions, and the encode stage costs about
    two thirds of what float residuals summed by np.add.reduceat did."""
    k, width = centroids.shape
    n_cells = int(cells.max()) + 1 if len(cells) else 0
    out = np.zeros((n_cells * k, width), np.float32)
    if len(words):
        groups = np.asarray(cells, np.int64) * k + words
        order = np.argsort(groups, kind="stable")
        present, start = np.unique(groups[order], return_index=True)
        lane = np.uint16 if len(groups) < 1 << 16 else np.uint32
        bits = np.unpackbits(descriptors[order], axis=1).astype(lane).view(np.uint64)
        ones = np.add.reduceat(bits, start, axis=0).view(lane)
        counts = np.diff(np.append(start, len(groups)))
        out[present] = ones - counts[:, None] * centroids[present % k]
    return out.reshape(n_cells, k, width)


class Vectorizer:
    """Turns the local features of one image into its global vector."""

    def __init__(self, conf: VectorConf, centroids: np.ndarray | None = None, idf: np.ndarray | None = None):
        self.conf = conf
        self.name = conf.name
        self.centroids = centroids
        self.idf = idf
        # |c|^2 of each word: the nearest word of x minimises |c|^2 - 2 x.c (|x|^2 is the same for all).
        self._sq = None if centroids is None else np.einsum("ij,ij->i", centroids, centroids).astype(np.float32)

    @property
    def needs_fit(self) -> bool:
        return self.name != "concat"

    @property
    def dim(self) -> int:
        if self.name == "concat":
            return self.conf.n_descriptors * 256
        k = self.conf.words
        return k if self.name == "bow" else k * 256 * self.n_blocks

    @property
    def n_blocks(self) -> int:
        """VLAD blocks: the whole image, its horizontal bands (regions), its vertical bands (columns)."""
        return self.conf.n_blocks

    def fit(self, descriptor_sets: list[np.ndarray], seed: int) -> Vectorizer:
        """Learn the vocabulary (and the idf, for bow) from the descriptors of training images."""
        if not self.needs_fit:
            return self
        vocab = train_vocabulary(np.concatenate(descriptor_sets), self.conf.words, seed)
        fitted = Vectorizer(self.conf, vocab)
        if self.name == "bow":
            # idf over images: a word seen in every image tells nothing about the place.
            df = np.zeros(len(vocab), np.float64)
            for desc in descriptor_sets:
                df[np.unique(fitted.words(desc))] += 1
            fitted = Vectorizer(self.conf, vocab, np.log((len(descriptor_sets) + 1) / (df + 1)).astype(np.float32))
        return fitted

    @property
    def n_words(self) -> int:
        return 0 if self.centroids is None else len(self.centroids)

    def words(self, descriptors: np.ndarray, k: int = 1) -> np.ndarray:
        """Nearest visual word of each descriptor, (n,) int64; with k > 1 its k nearest, nearest
        first, (n, k)."""
        if self.centroids is None or self._sq is None:
            raise RuntimeError("vectorizer has no vocabulary")
        if not 1 <= k <= len(self.centroids):
            raise ValueError(f"k must be in 1..{len(self.centroids)} words, got {k}")
        # One BLAS product per chunk: as fast as a FAISS flat search on an idle machine, 4 x faster while
        # other processes share the cores (BENCHMARKS.md); chunks bound the (rows x words) matrix.
        words = np.empty((len(descriptors), k), np.int64)
        for start in range(0, len(descriptors), WORDS_CHUNK):
            bits = unpack(descriptors[start : start + WORDS_CHUNK])
            d = self._sq - 2.0 * (bits @ self.centroids.T)
            # k argmins, each word found set aside for the next: for the few words a query keypoint
            # takes, cheaper than a partition and a sort; a tie goes to the lower word.
            rows = np.arange(len(bits))
            for j in range(k):
                near = np.argmin(d, axis=1)
                words[start : start + len(bits), j] = near
                if j + 1 < k:
                    d[rows, near] = np.inf
        return words[:, 0] if k == 1 else words

    def __call__(self, features: OrbFeatures) -> np.ndarray:
        if self.name == "concat":
            return concat_bits(features, self.conf.n_descriptors)
        if self.centroids is None:
            raise RuntimeError("vectorizer is not fitted")
        k = len(self.centroids)
        words = self.words(features.descriptors)
        if self.name == "bow":
            tf = np.bincount(words, minlength=k).astype(np.float32)
            v: np.ndarray = np.sqrt(tf) * self.idf  # sqrt: bursts of one repeated pattern should not dominate
        else:
            v = self.regional(words, features.descriptors, features.xy, features.width, features.height)
        return (v / max(float(np.linalg.norm(v)), EPS)).astype(np.float32)

    def regional(
        self, words: np.ndarray, descriptors: np.ndarray, xy: np.ndarray, width: float, height: float
    ) -> np.ndarray:
        """The VLAD blocks of descriptors already assigned to `words`, at positions `xy` in an image of
        width x height, concatenated (not normalised as a whole): the whole image, then each horizontal
        band (fractions of the height): where a pattern sits, sky-line or street level, tells places
        apart; then each vertical band (fractions of the width): the facade on the left from the one
        on the right."""
        if self.centroids is None:
            raise RuntimeError("vectorizer is not fitted")
        y = xy[:, 1] / max(height, EPS)
        masks = [np.ones(len(words), bool)] + [(y >= a) & (y < b) for a, b in self.conf.regions]
        if self.conf.columns:
            if width <= 0:
                raise ValueError("vertical bands need the image width of the features")
            x = xy[:, 0] / width
            masks += [(x >= a) & (x < b) for a, b in self.conf.columns]
        return np.concatenate(self._block_vlads(words, descriptors, masks, len(self.centroids)))

    def _block_vlads(
        self, words: np.ndarray, descriptors: np.ndarray, masks: list[np.ndarray], k: int
    ) -> list[np.ndarray]:
        """The VLAD of each block (a mask over the descriptors). The blocks overlap (the whole image,
        bands that partition it), so the residuals are summed once per cell of descriptors that share
        their blocks and per word, and each block adds up its cells: every descriptor is summed once,
        not once per block it falls in."""
        code = np.zeros(len(words), np.int64)
        for b, m in enumerate(masks):
            code |= m.astype(np.int64) << b
        cells, cell = np.unique(code, return_inverse=True)
        if self.centroids is None:
            raise RuntimeError("vectorizer is not fitted")
        sums = residual_sums(descriptors, words, cell.ravel(), self.centroids)
        blocks = []
        for b in range(len(masks)):
            inside = (cells >> b) & 1 == 1
            blocks.append(self._vlad(sums[inside].sum(axis=0)) if inside.any() else np.zeros(k * 256, np.float32))
        return blocks

    def _vlad(self, sums: np.ndarray) -> np.ndarray:
        """Intra-normalised, power-normalised, L2-normalised (k, 256) sums of residuals per word."""
        v: np.ndarray = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), EPS)
        v = v.ravel()
        v = np.sign(v) * np.abs(v) ** self.conf.power
        return v / max(float(np.linalg.norm(v)), EPS)

    def save(self, path: Path) -> Path:
        arrays: dict[str, np.ndarray] = {"name": np.array(self.name)}
        if self.centroids is not None:
            arrays["centroids"] = self.centroids
        if self.idf is not None:
            arrays["idf"] = self.idf
        return atomic_savez(path, durable=False, **arrays)

    @classmethod
    def load(cls, path: Path, conf: VectorConf) -> Vectorizer:
        with np.load(path, allow_pickle=False) as z:
            if str(z["name"]) != conf.name:
                raise ValueError(f"{path}: holds a {z['name']} vectorizer, the pipeline wants {conf.name}")
            return cls(conf, z.get("centroids"), z.get("idf"))
