"""FID, sFID, Inception Score, precision and recall, with the definitions of ADM's evaluator.

ADM = guided-diffusion's `evaluations/evaluator.py`, the evaluator behind the ImageNet numbers of
ADM, DiT, LlamaGen and most class-conditional AR papers. What is the same and what differs:

- Statistics: mean and unbiased covariance (np.cov, ddof 1) of the features, in float64.
- Frechet distance: |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)). ADM takes the trace
  from scipy.linalg.sqrtm(S1 S2), retrying with 1e-6 added to both diagonals when the result is not
  finite, and failing on a large imaginary part. Here tr((S1 S2)^(1/2)) is computed as the sum of
  the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2) (symmetric PSD, `eigh`, negative
  round-off clipped to 0): the same number wherever sqrtm succeeds (the eigenvalues of S1 S2 and
  of S1^(1/2) S2 S1^(1/2) coincide), and real and finite for the rank-deficient covariances of
  small sets, where sqrtm goes complex. With fewer samples than dimensions the same trace comes
  from an N x N eigenproblem (`frechet_distance_to_features`).
- sFID: the same distance over the 2023-d `spatial` features.
- Inception Score: softmax of the logits, then per split of `split_size` (5000) consecutive samples
  exp(mean_i KL(p_i || mean_j p_j)), averaged over splits. Terms with p = 0 count 0 (ADM would
  get NaN from 0 * log 0; float32 softmax outputs are practically never 0).
- Precision / recall (Kynkaanniemi et al. 2019 as ADM runs it, k = 3): each reference point's
  radius is the squared Euclidean distance to its k-th nearest neighbour in its own set (itself
  excluded by counting it as the 0-th); precision = fraction of samples within some reference
  point's radius, recall = fraction of reference points within some sample's radius. Distances
  are squared, as in ADM; here computed in float32 with highest-precision matmuls in blocks on the
  accelerator (ADM tries float16 first).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

IS_SPLIT_SIZE = 5000
PR_NEIGHBOURHOOD = 3


# ----------------------------------------------------------------------------- FID


def check_finite(what: str, value) -> None:
    """ValueError naming `what` (e.g. "the reference's covariance") when `value` holds NaN or inf: a
    metric of such inputs would be NaN, which is no result."""
    if not np.all(np.isfinite(value)):
        raise ValueError(f"NaN or inf in {what}")


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D]) in float64, as ADM (np.cov, rows are samples)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"feature statistics need features [N >= 2, D], got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _nonnegative(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with round-off (negative, or below size * eps * largest) set to 0.

    sqrt magnifies round-off near 0: without the cut, the null space of a rank-deficient
    covariance would add sum(sqrt(1e-13)) ~ 1e-5 to the trace."""
    cutoff = len(eigenvalues) * np.finfo(np.float64).eps * max(float(np.max(np.abs(eigenvalues))), 0.0)
    return np.where(eigenvalues > cutoff, eigenvalues, 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(_nonnegative(eigenvalues))) @ eigenvectors.T


def _trace_sqrt_psd(matrix: np.ndarray) -> float:
    """tr(M^(1/2)) of a symmetric PSD matrix (symmetrised first)."""
    return float(np.sum(np.sqrt(_nonnegative(np.linalg.eigvalsh((matrix + matrix.T) / 2)))))


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2, real and finite also when they are singular."""
    root1 = _psd_sqrt((sigma1 + sigma1.T) / 2)
    return _trace_sqrt_psd(root1 @ sigma2 @ root1)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (FID when fed Inception pool3 statistics)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.all(np.isfinite(value)):
            raise ValueError(f"frechet_distance: {name} holds NaN or inf")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))


def frechet_distance_to_features(features, mu2, sigma2) -> float:
    """frechet_distance(feature_statistics(features), (mu2, sigma2)), exact, cheaper for fewer samples than dims.

    With S1 = A^T A (A = centred features / sqrt(N - 1), [N, D]), the non-zero eigenvalues of
    S1 S2 are those of the [N, N] matrix A S2 A^T: O(N D^2) instead of two D x D eigensolves when
    N < D (a trainer's eval on a thousand samples against 2048-d reference statistics).
    """
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"feature statistics need features [N >= 2, D], got shape {features.shape}")
    mu2, sigma2 = np.asarray(mu2, np.float64), np.asarray(sigma2, np.float64)
    check_finite("the samples' features (Frechet distance)", features)
    check_finite("the reference's mean (Frechet distance)", mu2)
    check_finite("the reference's covariance (Frechet distance)", sigma2)
    if len(features) > features.shape[1]:
        return frechet_distance(*feature_statistics(features), mu2, sigma2)
    if mu2.shape != features.shape[1:] or sigma2.shape != features.shape[1:] * 2:
        raise ValueError(f"statistics do not match: features {features.shape}, mu {mu2.shape}, sigma {sigma2.shape}")
    mu1 = features.mean(axis=0)
    a = (features - mu1) / np.sqrt(len(features) - 1)
    trace_sqrt = _trace_sqrt_psd(a @ sigma2 @ a.T)
    diff = mu1 - mu2
    return float(diff @ diff + np.sum(a * a) + np.trace(sigma2) - 2.0 * trace_sqrt)


# ----------------------------------------------------------------------------- Inception Score


def inception_score(logits, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's Inception Score of [N, classes] logits: mean over splits of exp(E KL(p(y|x) || p(y)))."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or len(logits) == 0:
        raise ValueError(f"inception_score needs logits [N, classes], got shape {logits.shape}")
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    check_finite("the samples' logits (Inception Score)", logits)
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for start in range(0, len(p), split_size):
        part, log_part = p[start:start + split_size], log_p[start:start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        log_marginal = np.log(np.where(marginal > 0, marginal, 1.0))
        kl = np.where(part > 0, part * (log_part - log_marginal), 0.0).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------- precision and recall


def _rows_per_block(num_columns: int, budget: int = 1 << 26) -> int:
    """Rows of a [rows, num_columns] float32 distance block within `budget` elements (256 MiB), at least 1."""
    return max(1, min(4096, budget // max(num_columns, 1)))


@jax.jit
def _squared_distances(rows, columns):
    rows_sq = jnp.sum(rows * rows, axis=1, keepdims=True)
    columns_sq = jnp.sum(columns * columns, axis=1)[None, :]
    cross = jnp.dot(rows, columns.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(rows_sq - 2.0 * cross + columns_sq, 0.0)


@functools.partial(jax.jit, static_argnames=("k",))
def _kth_neighbour_block(rows, features, k: int):
    distances = _squared_distances(rows, features)
    smallest = -jax.lax.top_k(-distances, k + 1)[0]  # ascending; [:, 0] is the point itself
    return smallest[:, k]


@jax.jit
def _within_radii_block(rows, features, radii):
    return jnp.any(_squared_distances(rows, features) <= radii[None, :], axis=1)


def _padded_blocks(array: np.ndarray, rows: int):
    """Yields (block of exactly `rows` rows, valid count), padding the last one: one compiled shape."""
    for start in range(0, len(array), rows):
        block = array[start:start + rows]
        valid = len(block)
        if valid < rows:
            block = np.concatenate([block, np.zeros((rows - valid, array.shape[1]), array.dtype)])
        yield block, valid


def manifold_radii(features, k: int = PR_NEIGHBOURHOOD) -> np.ndarray:
    """Squared distance of each feature vector to its k-th nearest neighbour in the set (float32 [N])."""
    features = np.asarray(features, np.float32)
    if features.ndim != 2 or len(features) <= k:
        raise ValueError(f"manifold radii with k={k} need features [N > {k}, D], got shape {features.shape}")
    on_device = jnp.asarray(features)
    rows = _rows_per_block(len(features))
    radii = [np.asarray(_kth_neighbour_block(jnp.asarray(block), on_device, k))[:valid]
             for block, valid in _padded_blocks(features, rows)]
    return np.concatenate(radii)


def fraction_within(queries, features, radii) -> float:
    """Fraction of the query vectors within the radius of at least one of `features`."""
    queries = np.asarray(queries, np.float32)
    on_device, radii = jnp.asarray(np.asarray(features, np.float32)), jnp.asarray(np.asarray(radii, np.float32))
    rows = _rows_per_block(len(features))
    inside = [np.asarray(_within_radii_block(jnp.asarray(block), on_device, radii))[:valid]
              for block, valid in _padded_blocks(queries, rows)]
    return float(np.mean(np.concatenate(inside)))


def precision_recall(reference_features, sample_features, k: int = PR_NEIGHBOURHOOD,
                     reference_radii=None) -> tuple[float, float]:
    """ADM's (precision, recall) of samples against a reference set, k-NN manifolds on both sides."""
    reference_features = np.asarray(reference_features, np.float32)
    sample_features = np.asarray(sample_features, np.float32)
    same_width = reference_features.shape[-1] == sample_features.shape[-1]
    if reference_features.ndim != 2 or sample_features.ndim != 2 or not same_width:
        raise ValueError(f"precision_recall needs [N, D] features of one D, got {reference_features.shape} "
                         f"and {sample_features.shape}")
    check_finite("the reference's features (precision/recall)", reference_features)
    check_finite("the samples' features (precision/recall)", sample_features)
    if reference_radii is None:
        reference_radii = manifold_radii(reference_features, k)
    sample_radii = manifold_radii(sample_features, k)
    precision = fraction_within(sample_features, reference_features, reference_radii)
    recall = fraction_within(reference_features, sample_features, sample_radii)
    return precision, recall
