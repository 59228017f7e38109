"""The demo's tasks (no download): scikit-learn's 8x8 digits, MNIST-1D, and a
Gaussian mixture whose Bayes posterior is known exactly.

MNIST-1D (Greydanus and Kobak, 2020; the ``mnist1d`` package, Apache-2.0) draws
40-sample 1-D signals from ten digit-like templates with random padding,
translation, scaling, shear and correlated noise, so that classes overlap: a small
MLP stays far below 100% test accuracy, unlike on the 8x8 digits. The package
generates the data locally (``make_dataset``; its ``get_dataset`` would download),
and the arrays are cached (``cache_dir``).

The Gaussian mixture is drawn by torch in float64 from a fixed seed and rounded
to float32 once, so that it is the same on every machine.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Task:
    """Inputs ``x`` (``[N, 8, 8]`` images or ``[N, 40]`` signals), labels ``y``,
    the augmentation's largest shift along each spatial axis, and the widths of
    the teacher's and the student's hidden layers; for synthetic data, the exact
    posterior ``p*(y | x)`` as a function of a batch of inputs; the training and
    validation fractions of the split for teachers that fit their training set
    (the rest is test)."""

    name: str
    x: Tensor
    y: Tensor
    num_classes: int
    shift: int
    teacher_hidden: tuple[int, ...]
    student_hidden: int
    posterior: Callable[[Tensor], Tensor] | None = None
    memorising_split: tuple[float, float] = (0.6, 0.15)


class MixturePosterior:
    """``p*(y | x)`` of equally likely classes, class ``c`` an equal-weight
    mixture of isotropic Gaussians ``N(means[c, m], sigma^2 I)``: a softmax over
    classes of ``logsumexp_m -|x - means[c, m]|^2 / (2 sigma^2)``, in float64."""

    def __init__(self, means: Tensor, sigma: float):
        self.means, self.sigma = means.double(), sigma

    def __call__(self, x: Tensor) -> Tensor:
        k, m, d = self.means.shape
        sq = torch.cdist(x.double().reshape(-1, d), self.means.view(k * m, d)) ** 2
        scores = torch.logsumexp((-sq / (2 * self.sigma**2)).view(-1, k, m), dim=2)
        return torch.softmax(scores, dim=1)


def gaussian_mixture(
    num_samples: int = 4000, classes: int = 10, components: int = 3, dim: int = 8,
    sigma: float = 1.0, spread: float = 1.15, seed: int = 0,
) -> Task:  # fmt: skip
    """``num_samples`` points in ``dim`` dimensions, the same number per class,
    each class a mixture of ``components`` Gaussians of standard deviation
    ``sigma`` around means drawn from ``N(0, spread^2 I)`` (so classes overlap
    and the Bayes accuracy is well below 1). Drawn in float64 by torch's CPU
    generator, then rounded to float32; the task carries the exact posterior.
    Teachers that fit their training set train on 30% of it (fitting labels the
    Bayes classifier gets wrong takes many epochs) and are tested on 55%."""
    g = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(classes, components, dim, generator=g, dtype=torch.float64)
    y = torch.arange(num_samples) % classes
    which = torch.randint(0, components, (num_samples,), generator=g)
    noise = torch.randn(num_samples, dim, generator=g, dtype=torch.float64)
    x = (means[y, which] + sigma * noise).float()
    return Task(
        "gmm", x, y, classes, 0, (128, 128), 32, MixturePosterior(means, sigma), (0.3, 0.15)
    )


def digits() -> Task:
    """The 1797 digits of scikit-learn (bundled), pixels in [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    return Task("digits", x, y, 10, 1, (128, 128), 16)


def cache_dir() -> pathlib.Path:
    """Where generated data is cached: ``$MCMI_TORCH_CACHE``, else
    ``$XDG_CACHE_HOME/mcmi_torch``, else ``~/.cache/mcmi_torch``."""
    if os.environ.get("MCMI_TORCH_CACHE"):
        return pathlib.Path(os.environ["MCMI_TORCH_CACHE"])
    root = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(root) / "mcmi_torch"


def mnist1d(cache: pathlib.Path, num_samples: int = 6000) -> Task:
    """``num_samples`` MNIST-1D signals generated with the package's default
    arguments (seed 42), cached as ``cache/mnist1d_{num_samples}.npz``."""
    path = cache / f"mnist1d_{num_samples}.npz"
    if not path.exists():
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples, args.train_split = num_samples, 1.0  # splits are made per seed
        data = make_dataset(args)
        cache.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, x=data["x"].astype(np.float32), y=data["y"].astype(np.int64))
    arrays = np.load(path)
    return Task(
        "mnist1d", torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"]), 10, 2,
        (128, 128), 32,
    )  # fmt: skip


def split(y: Tensor, seed: int, fractions=(0.6, 0.15)) -> tuple[Tensor, Tensor, Tensor]:
    """Stratified train, validation and test indices (the rest is test)."""
    g = torch.Generator().manual_seed(seed)
    parts = ([], [], [])
    for c in y.unique():
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        a = round(fractions[0] * len(idx))
        b = a + round(fractions[1] * len(idx))
        for part, chunk in zip(parts, (idx[:a], idx[a:b], idx[b:])):
            part.append(chunk)
    return tuple(torch.cat(p) for p in parts)


def draw_offsets(n: int, dims: int, shift: int, generator: torch.Generator) -> Tensor:
    """Random crop offsets, ``[dims, n]`` in ``[0, 2 * shift]`` (none drawn for ``shift`` 0:
    every offset is then 0)."""
    if shift == 0:
        return torch.zeros(dims, n, dtype=torch.long)
    return torch.randint(0, 2 * shift + 1, (dims, n), generator=generator)


def translate(x: Tensor, shift: int, offsets: Tensor) -> Tensor:
    """Each sample translated by ``offsets - shift`` along every spatial axis (zero
    padding by ``shift``, then a crop at the sample's offsets, ``[dims, n]``)."""
    if shift == 0:
        return x
    n, dims = x.shape[0], x.shape[1:]
    padded = torch.nn.functional.pad(x, [shift, shift] * len(dims))
    index = [torch.arange(n).view(n, *[1] * len(dims))]
    for axis, size in enumerate(dims):
        view = [n] + [1] * len(dims)
        view[axis + 1] = size
        index.append((offsets[axis].view(n, 1) + torch.arange(size)).view(view))
    return padded[tuple(index)]


def augment(x: Tensor, shift: int, generator: torch.Generator) -> Tensor:
    """Random translation of each sample by up to ``shift`` along every spatial
    axis (zero padding, then a crop at a random offset)."""
    return translate(x, shift, draw_offsets(x.shape[0], x.dim() - 1, shift, generator))


def offset_codes(offsets: Tensor, shift: int) -> Tensor:
    """One integer per sample for its offsets: ``sum_a offsets[a] * (2 * shift + 1)^a``."""
    base = (2 * shift + 1) ** torch.arange(offsets.shape[0]).view(-1, 1)
    return (offsets * base).sum(0)


def all_translations(x: Tensor, shift: int):
    """Every translation that ``augment`` can draw, as ``(code, translated x)``
    pairs, ``code`` as given by ``offset_codes``."""
    dims, side = x.dim() - 1, 2 * shift + 1
    for code in range(side**dims):
        offsets = torch.tensor([(code // side**a) % side for a in range(dims)])
        yield code, translate(x, shift, offsets.view(dims, 1).expand(dims, x.shape[0]))


def batches(
    x: Tensor, y: Tensor, shift: int, generator: torch.Generator, batch_size: int = 64,
    *, with_index: bool = False,
):  # fmt: skip
    """One epoch of shuffled, augmented ``(x, y)`` mini-batches (the last may be
    smaller); ``with_index``: ``(x, y, index, code)``, the samples' indices in
    ``x`` and their translations' ``offset_codes``."""
    order = torch.randperm(len(y), generator=generator)
    for start in range(0, len(y), batch_size):
        idx = order[start : start + batch_size]
        offsets = draw_offsets(len(idx), x.dim() - 1, shift, generator)
        xb = translate(x[idx], shift, offsets)
        yield (xb, y[idx], idx, offset_codes(offsets, shift)) if with_index else (xb, y[idx])
