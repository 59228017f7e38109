"""The BROJA partial information decomposition: canonical gates, identities, and
the helper on representations."""

import numpy as np
import pytest

from mcmi_torch.pid import decompose, discretize, representation_pid


def gate(f, n_y):
    """T, S independent uniform bits and Y = f(T, S)."""
    p = np.zeros((2, 2, n_y))
    for t in (0, 1):
        for s in (0, 1):
            p[t, s, f(t, s)] += 0.25
    return p


AND_REDUNDANCY = 0.75 * np.log2(4 / 3)  # = I(Y; T) for AND, 0.311278 bits

GATES = {
    # name: (joint [t, s, y], (redundant, unique T, unique S, synergy)) in bits
    "XOR": (gate(lambda t, s: t ^ s, 2), (0.0, 0.0, 0.0, 1.0)),
    "AND": (gate(lambda t, s: t & s, 2), (AND_REDUNDANCY, 0.0, 0.0, 0.5)),
    "COPY": (gate(lambda t, s: 2 * t + s, 4), (0.0, 1.0, 1.0, 0.0)),
    "RDN": (np.array([[[0.5, 0], [0, 0]], [[0, 0], [0, 0.5]]]), (1.0, 0.0, 0.0, 0.0)),
    "UNQ": (gate(lambda t, s: t, 2), (0.0, 1.0, 0.0, 0.0)),
}


@pytest.mark.parametrize("name", sorted(GATES))
def test_canonical_gates(name):
    p, want = GATES[name]
    r = decompose(p)
    got = (r.redundant, r.unique_teacher, r.unique_student, r.synergy)
    np.testing.assert_allclose(got, want, atol=1e-4, err_msg=name)


def test_terms_add_up_and_are_non_negative_on_random_distributions():
    rng = np.random.default_rng(0)
    for shape in [(2, 2, 2), (3, 4, 2), (4, 3, 5), (5, 5, 3)]:
        for _ in range(5):
            p = rng.dirichlet(np.ones(np.prod(shape)) * 0.5).reshape(shape)
            r = decompose(p)
            terms = np.array([r.redundant, r.unique_teacher, r.unique_student, r.synergy])
            assert (terms >= -1e-6).all(), terms
            assert abs(terms.sum() - r.mutual_information) < 1e-6
            # Red is the same seen from either side: I(Y;T) - Uni_T = I(Y;S) - Uni_S.
            py = p.sum(axis=(0, 1))
            h = lambda q: -(q[q > 0] * np.log2(q[q > 0])).sum()  # noqa: E731
            i_t = h(py) + h(p.sum(axis=(1, 2))) - h(p.sum(axis=1).ravel())
            i_s = h(py) + h(p.sum(axis=(0, 2))) - h(p.sum(axis=0).ravel())
            assert abs((i_t - r.unique_teacher) - (i_s - r.unique_student)) < 1e-6


def test_swapping_teacher_and_student_swaps_the_unique_terms():
    p = np.random.default_rng(1).dirichlet(np.ones(24)).reshape(2, 3, 4)
    a, b = decompose(p), decompose(p.transpose(1, 0, 2))
    assert abs(a.unique_teacher - b.unique_student) < 1e-6
    assert abs(a.redundant - b.redundant) < 1e-6


def test_bad_input():
    with pytest.raises(ValueError, match=r"indexed \[t, s, y\]"):
        decompose(np.ones((2, 2)))
    with pytest.raises(ValueError, match="non-negative"):
        decompose(-np.ones((2, 2, 2)))


def test_representation_pid_copying_student_holds_only_redundancy():
    """A student whose representation is the teacher's holds no unique
    teacher information; a student of noise holds none of it."""
    rng = np.random.default_rng(2)
    n, k = 3000, 4
    y = rng.integers(0, k, n)
    teacher = np.eye(k)[y] * 3 + rng.normal(size=(n, k)) * 0.3
    copy = representation_pid(teacher, teacher.copy(), y, n_components=4, n_clusters=4)
    assert copy.unique_teacher < 1e-3 and copy.redundant > 1.5
    noise = representation_pid(teacher, rng.normal(size=(n, k)), y, n_components=4, n_clusters=4)
    assert noise.redundant < 0.1 and noise.unique_teacher > 1.5
    assert discretize(teacher, n_components=2, n_clusters=3).max() == 2


def test_representation_pid_refuses_bad_labels_and_mismatched_lengths():
    """A negative label is refused, not counted as the highest class (numpy's
    wrap-around); so are float labels, and representations of another N."""
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(60, 3))
    y = rng.integers(0, 3, 60)
    kw = dict(n_components=2, n_clusters=3)
    for bad, error, message in [
        (np.where(np.arange(60) == 5, -1, y), ValueError, "non-negative class indices, got -1"),
        (y + 0.5, TypeError, "integer class indices, got dtype float64"),
        (y[:, None], ValueError, r"1-D \[N\]"),
        (y[:0], ValueError, "empty"),
    ]:
        with pytest.raises(error, match=message):
            representation_pid(teacher, teacher, bad, **kw)
    with pytest.raises(ValueError, match="student must hold one representation per label: got 59"):
        representation_pid(teacher, teacher[:59], y, **kw)
    with pytest.raises(ValueError, match="n_clusters=100 is more than the 60 samples"):
        representation_pid(teacher, teacher, y, n_components=2, n_clusters=100)
    with pytest.raises(TypeError, match="n_clusters must be an int"):
        representation_pid(teacher, teacher, y, n_components=2, n_clusters=2.5)
