"""The ADM metric math against independent computations: scipy's sqrtm, closed forms, brute-force k-NN."""

import numpy as np
import pytest
from scipy import linalg
from scipy.spatial.distance import cdist
from scipy.stats import entropy

from diffcompress.fid_metrics import (
    activation_statistics,
    frechet_distance,
    inception_score,
    manifold_radii,
    precision_recall,
)


def random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def scipy_fid(mu1, s1, mu2, s2):
    """The ADM evaluator's formula: scipy.linalg.sqrtm of the covariance product."""
    covmean = linalg.sqrtm(s1 @ s2).real
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_fid_matches_scipy_sqrtm_on_synthetic_gaussians():
    rng = np.random.default_rng(0)
    for d in (1, 5, 32):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = random_spd(rng, d), random_spd(rng, d)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_fid(mu1, s1, mu2, s2), rel=1e-9, abs=1e-9)


def test_fid_closed_form_for_diagonal_covariances():
    # W2^2 between Gaussians with commuting covariances: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # a pure shift: only the mean term remains
    s = random_spd(rng, 8)
    assert frechet_distance(np.zeros(8), s, np.full(8, 2.0), s) == pytest.approx(32.0, abs=1e-9)


def test_fid_of_a_batch_against_itself_is_zero_and_statistics_match_numpy():
    rng = np.random.default_rng(2)
    acts = rng.normal(size=(500, 64)) @ rng.normal(size=(64, 64))
    mu, sigma = activation_statistics(acts)
    np.testing.assert_allclose(mu, acts.mean(0))
    np.testing.assert_allclose(sigma, np.cov(acts.T))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)
    other = activation_statistics(acts + 0.5)
    assert frechet_distance(mu, sigma, *other) == pytest.approx(64 * 0.25, rel=1e-6)


def test_sfid_with_fewer_samples_than_dimensions_is_the_nuclear_norm_formula():
    # sFID features are 2023-d; with N < D the covariances are singular. Then tr sqrt(S1 S2) is exactly the
    # nuclear norm of B A^T, where S1 = A^T A and S2 = B^T B (A, B the centred features / sqrt(N - 1)).
    rng = np.random.default_rng(3)
    x1, x2 = rng.normal(size=(20, 50)), rng.normal(size=(30, 50)) + 0.2
    a = (x1 - x1.mean(0)) / np.sqrt(len(x1) - 1)
    b = (x2 - x2.mean(0)) / np.sqrt(len(x2) - 1)
    diff = x1.mean(0) - x2.mean(0)
    nuclear = np.linalg.svd(b @ a.T, compute_uv=False).sum()
    expected = diff @ diff + (a * a).sum() + (b * b).sum() - 2 * nuclear
    got = frechet_distance(*activation_statistics(x1), *activation_statistics(x2))
    assert np.isfinite(got)
    # rounding noise in the ~30 zero eigenvalues enters through a square root: ~1e-8 relative, not 1e-15
    assert got == pytest.approx(expected, rel=1e-6)


def test_fid_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_on_constructed_softmax_outputs():
    k = 10
    confident_balanced = np.eye(k)[np.arange(200) % k]  # every class equally often, each sample certain
    assert inception_score(confident_balanced) == pytest.approx(k)
    assert inception_score(np.full((50, k), 1 / k)) == pytest.approx(1.0)  # uninformative
    assert inception_score(np.tile(np.eye(k)[3], (50, 1))) == pytest.approx(1.0)  # mode collapse
    # random rows: exp of the mean KL to the marginal, computed with scipy's entropy
    rng = np.random.default_rng(4)
    p = rng.dirichlet(np.full(k, 0.3), size=300)
    marg = p.mean(0)
    expected = np.exp(np.mean([entropy(row, marg) for row in p]))
    assert inception_score(p) == pytest.approx(expected, rel=1e-10)
    # splits: the mean over the per-split scores
    split = np.mean([inception_score(p[:100]), inception_score(p[100:200]), inception_score(p[200:])])
    assert inception_score(p, split_size=100) == pytest.approx(split, rel=1e-12)


def brute_force_pr(ref, sample, k):
    def radii(x):
        d = cdist(x, x, "sqeuclidean")
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    rr, sr = radii(ref), radii(sample)
    d = cdist(ref, sample, "sqeuclidean")
    precision = np.mean([any(d[i, j] <= rr[i] for i in range(len(ref))) for j in range(len(sample))])
    recall = np.mean([any(d[i, j] <= sr[j] for j in range(len(sample))) for i in range(len(ref))])
    return precision, recall


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_against_brute_force_knn(k):
    rng = np.random.default_rng(5 + k)
    ref = rng.normal(size=(60, 6))
    sample = rng.normal(size=(45, 6)) * 1.4 + 0.6  # a shifted, wider set: neither metric is trivially 0 or 1
    expected = brute_force_pr(ref, sample, k)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    got = precision_recall(ref, sample, k=k, block=16)  # blocks smaller than the sets: the tiling is exercised
    assert got == pytest.approx(expected, abs=1e-12)
    np.testing.assert_allclose(
        manifold_radii(ref, k, block=7).numpy(), np.sort(cdist(ref, ref, "sqeuclidean"), 1)[:, k], rtol=1e-4
    )


def test_precision_recall_of_a_set_with_itself_is_one():
    x = np.random.default_rng(7).normal(size=(30, 4))
    assert precision_recall(x, x) == (1.0, 1.0)
