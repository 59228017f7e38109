"""How much task knowledge a student took from its teacher: partial information decomposition.

Following Dissanayake et al., "Quantifying Knowledge Distillation Using Partial Information
Decomposition" (AISTATS 2025), with Y the label, T the teacher's and S the student's
(discretized) representation, the label information splits as

    I(Y; T, S) = Red(Y: T, S) + Uni(Y: T \\ S) + Uni(Y: S \\ T) + Syn(Y: T, S)

in the decomposition of Bertschinger, Rauh, Olbrich, Jost and Ay (2014, "BROJA"): minimize
I_Q(Y; T, S) over the joint distributions Q that keep the (T, Y) and (S, Y) marginals of P;
then Uni(Y: T\\S) = I_Q(Y; T | S), Uni(Y: S\\T) = I_Q(Y; S | T), Red = I(Y; T) - Uni(Y: T\\S)
and Syn = I_P(Y; T, S) - I_Q(Y; T, S). The redundancy is the knowledge the student already
holds, the teacher's unique information the knowledge left to distil.

Since H(Y) is fixed by the marginals, the minimization is the maximization of the concave
conditional entropy H_Q(Y | T, S) over a polytope: an exponential-cone program, solved here by
cvxpy with the Clarabel interior-point solver (a maintained, general conic solver whose
tolerances are set to 1e-8; see docs/pid.md). Install with ``pip install mcmi-torch[pid]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._args import check_int
from ._imports import import_extra

np = import_extra("numpy", "pid")

_LOG2 = math.log(2.0)


@dataclass(frozen=True)
class PIDResult:
    """The four BROJA terms, in bits; they add up to ``mutual_information``,
    I(Y; T, S)."""

    redundant: float
    unique_teacher: float
    unique_student: float
    synergy: float
    mutual_information: float


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _cond_entropy_y(joint: np.ndarray, axes: tuple[int, ...]) -> float:
    """H(Y | X) in nats for a joint array whose last axis is Y and whose
    other kept axes (``axes``) form X; the rest are summed out."""
    drop = tuple(a for a in range(joint.ndim - 1) if a not in axes)
    pxy = joint.sum(axis=drop) if drop else joint
    px = pxy.sum(axis=-1)
    return _entropy(pxy.ravel()) - _entropy(px.ravel())


def _solve_min_synergy(p: np.ndarray) -> np.ndarray:
    """argmax_Q H_Q(Y | T, S) subject to Q(t, y) = P(t, y), Q(s, y) = P(s, y)."""
    cp = import_extra("cvxpy", "pid")
    sp = import_extra("scipy.sparse", "pid")

    _, ns, ny = p.shape
    pty, psy = p.sum(axis=1), p.sum(axis=0)
    # Q can be positive only where both fixed marginals are.
    support = np.argwhere((pty[:, None, :] > 0) & (psy[None, :, :] > 0))
    n = len(support)
    t, s, y = support[:, 0], support[:, 1], support[:, 2]
    ones = np.ones(n)
    cols = np.arange(n)

    def grouping(keys: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
        uniq, inverse = np.unique(keys, return_inverse=True)
        return sp.csr_matrix((ones, (inverse, cols)), shape=(len(uniq), n)), uniq

    a_ty, ty_keys = grouping(t * ny + y)
    a_sy, sy_keys = grouping(s * ny + y)
    a_ts, _ = grouping(t * ns + s)
    q = cp.Variable(n, nonneg=True)
    # H(Y|T,S) = -sum q log(q / q_ts), with q_ts the sum of its (t, s) group.
    q_ts = a_ts.T @ (a_ts @ q)
    problem = cp.Problem(
        cp.Maximize(-cp.sum(cp.rel_entr(q, q_ts))),
        [a_ty @ q == pty.ravel()[ty_keys], a_sy @ q == psy.ravel()[sy_keys]],
    )
    problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-8, tol_gap_rel=1e-8, tol_feas=1e-8)
    if problem.status not in ("optimal", "optimal_inaccurate"):
        raise RuntimeError(f"the PID optimization did not converge: {problem.status}")
    out = np.zeros_like(p)
    out[t, s, y] = np.clip(q.value, 0.0, None)
    return out / out.sum()


def decompose(p) -> PIDResult:
    """BROJA decomposition of I(Y; T, S) for a joint distribution ``p``
    indexed ``[t, s, y]`` (any non-negative array; it is normalized).

    Returns the redundant, unique (teacher, student) and synergistic
    information in bits.
    """
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 3:
        raise ValueError(f"p must be indexed [t, s, y] (3-D), got {p.ndim}-D")
    if not np.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise ValueError("p must be finite, non-negative and not all zero")
    p = p / p.sum()
    q = _solve_min_synergy(p)

    h_y = _entropy(p.sum(axis=(0, 1)))
    h_y_t = _cond_entropy_y(p, (0,))
    h_y_s = _cond_entropy_y(p, (1,))
    h_y_ts_p = _cond_entropy_y(p, (0, 1))
    h_y_ts_q = _cond_entropy_y(q, (0, 1))
    # Q keeps the (T, Y) and (S, Y) marginals, so H_Q(Y|T) = H_P(Y|T), etc.
    unique_teacher = max(h_y_s - h_y_ts_q, 0.0)
    unique_student = max(h_y_t - h_y_ts_q, 0.0)
    i_t = h_y - h_y_t
    i_ts_p = h_y - h_y_ts_p
    i_ts_q = h_y - h_y_ts_q
    return PIDResult(
        redundant=(i_t - unique_teacher) / _LOG2,
        unique_teacher=unique_teacher / _LOG2,
        unique_student=unique_student / _LOG2,
        synergy=max(i_ts_p - i_ts_q, 0.0) / _LOG2,
        mutual_information=i_ts_p / _LOG2,
    )


def discretize(features, *, n_components: int = 10, n_clusters: int = 8, seed: int = 0):
    """Cluster indices of representations: PCA to ``n_components`` dimensions
    (after centering and scaling each feature to unit variance), then k-means
    with ``n_clusters`` clusters (10 restarts). Needs scikit-learn."""
    KMeans = import_extra("sklearn.cluster", "pid").KMeans
    PCA = import_extra("sklearn.decomposition", "pid").PCA
    StandardScaler = import_extra("sklearn.preprocessing", "pid").StandardScaler

    n_components = check_int("n_components", n_components, minimum=1)
    n_clusters = check_int("n_clusters", n_clusters, minimum=1)
    x = np.asarray(_to_numpy(features), dtype=np.float64).reshape(len(features), -1)
    x = StandardScaler().fit_transform(x)
    k = min(n_components, x.shape[1], x.shape[0])
    x = PCA(n_components=k, random_state=seed).fit_transform(x)
    return KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(x)


def representation_pid(
    teacher,
    student,
    labels,
    *,
    n_components: int = 10,
    n_clusters: int = 8,
    seed: int = 0,
) -> PIDResult:
    """The four PID terms (bits) of the labels with respect to teacher and
    student representations of the same samples (``[N, ...]`` arrays or
    tensors): each is discretized by :func:`discretize`, then the plug-in
    joint distribution of (teacher cluster, student cluster, label) is
    decomposed. ``labels`` are ``[N]`` non-negative integer class indices.
    Plug-in estimates need N well above ``n_clusters**2 * num_classes`` to
    be trusted."""
    y = _labels(labels)
    for name, features in (("teacher", teacher), ("student", student)):
        if len(features) != len(y):
            raise ValueError(
                f"{name} must hold one representation per label: got {len(features)} for "
                f"{len(y)} labels"
            )
    n_clusters = check_int("n_clusters", n_clusters, minimum=1)
    if len(y) < n_clusters:
        raise ValueError(f"n_clusters={n_clusters} is more than the {len(y)} samples")
    t = discretize(teacher, n_components=n_components, n_clusters=n_clusters, seed=seed)
    s = discretize(student, n_components=n_components, n_clusters=n_clusters, seed=seed)
    joint = np.zeros((n_clusters, n_clusters, int(y.max()) + 1))
    np.add.at(joint, (t, s, y), 1.0)
    return decompose(joint)


def _labels(labels) -> np.ndarray:
    """``labels`` as an int64 vector of class indices, refused (not wrapped
    or truncated) when they are not non-negative integers."""
    y = np.asarray(_to_numpy(labels))
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D [N], got shape {list(y.shape)}")
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise TypeError(f"labels must be integer class indices, got dtype {y.dtype}")
    if len(y) == 0:
        raise ValueError("labels is empty: there is nothing to decompose")
    if y.min() < 0:
        raise ValueError(f"labels must be non-negative class indices, got {y.min()}")
    return y.astype(np.int64)


def _to_numpy(x):
    detach = getattr(x, "detach", None)
    return detach().cpu().numpy() if detach is not None else np.asarray(x)
