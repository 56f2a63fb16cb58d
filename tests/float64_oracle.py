"""Holding a float32 result to a float64 oracle, at a tolerance that does not depend on the CPU.

A float32 sum of ``K`` terms differs from the exact sum by the roundings of its partial sums, and
which partial sums a library forms (one after the other, in blocks, in a tree, eight or sixteen
lanes at a time, with or without FMA) changes from one CPU and one library to the next. Whatever
the order, each rounding is at most ``eps / 2`` of a partial sum, and the roundings of different
additions behave as independent (Higham & Mary, "A new approach to probabilistic rounding error
analysis", SIAM J. Sci. Comput. 2019): the error grows as ``sqrt(K) * eps * |partial sums|``. The
partial sums of ``K`` terms stay within

    scale = ||terms||_2 + |sum|

(terms of random signs: a random walk of size ``||terms||_2``; terms of one sign: the sum), so

    tolerance = C * eps32 * sqrt(K) * scale,        C = 4

holds for any summation order, on any CPU. For the scale of C: over thousands to millions of
outputs, sums taken one after the other (the least accurate order in use) came to at most 0.45
of ``eps32 * sqrt(K) * scale``, XLA's CPU convolution gradients to 0.75. A wrong term, a missing
kernel row or a wrong sign moves a result by at least a term's size, ``||terms||_2 / sqrt(K)``,
hundreds of times the tolerance at the tested sizes.

Layers of sums add up in one of two ways here. ``n_terms=(K1, K2, ...)`` stands for
``sqrt(K1) + sqrt(K2) + ...`` in place of ``sqrt(K)``: each stage's relative error carried on whole
and all in one direction, the safe bound, used against float64 where it still leaves a test sharp
(single layers, the small test networks); ``scale`` is then the result's own (its term norm and
size, or the largest of them). :func:`two_float32_networks_tolerance` adds the layers in quadrature
(different sums round independently) for the deep Keras ports, held to Keras' float32 by design:
there the safe bound would be 4.5 times looser (ResNet50: 7e-4 of the output's scale against
1.6e-4) and the errors measured (2.6e-5 of the scale) sit well inside the sharper one.

For a bilinear operation ``f(a, b)`` (a matrix product, a convolution, its gradients) the terms of
each output are products ``a_i * b_j``, so ``||terms||_2 = sqrt(f(a**2, b**2))``: the callers
compute it with the same float64 oracle.
"""

from __future__ import annotations

import jax
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23
C = 4.0


def _root(n_terms) -> float:
    """``sqrt(K)`` for one sum of ``K`` terms, ``sqrt(K1) + sqrt(K2) + ...`` for a chain of sums."""
    return float(np.sum(np.sqrt(np.asarray(n_terms, np.float64))))


def float32_sum_tolerance(n_terms, scale, c: float = C, eps: float = EPS32):
    """The tolerance for a float32 sum of ``n_terms`` terms (or a chain of sums, a tuple of their
    sizes) whose partial sums stay within ``scale`` (elementwise, or a number):
    ``c * eps * sqrt(n_terms) * scale``."""
    return c * eps * _root(n_terms) * np.asarray(scale, np.float64)


def assert_close_to_float64(actual, oracle64, n_terms, term_norm=None, *, c: float = C, eps: float = EPS32,
                            what: str = "result"):
    """Asserts ``|actual - oracle64| <= c * eps * sqrt(n_terms) * (term_norm + |oracle64|)`` everywhere.

    ``oracle64`` must be float64 (the exact result for the same float32 inputs, up to float64
    rounding); ``term_norm`` is the 2-norm of each output's terms (elementwise, broadcastable), or
    ``None`` where all terms have one sign (then ``|oracle64|`` bounds the partial sums alone).
    The message names how many elements are off, the worst error and the tolerance there.
    Returns the largest ratio of error to tolerance (how close the result came to failing)."""
    oracle64 = np.asarray(oracle64)
    assert oracle64.dtype == np.float64, f"the oracle of {what} is {oracle64.dtype}, not float64"
    actual = np.asarray(actual, np.float64)
    assert actual.shape == oracle64.shape, f"{what}: shape {actual.shape}, oracle {oracle64.shape}"
    scale = np.abs(oracle64) + (0.0 if term_norm is None else np.asarray(term_norm, np.float64))
    tol = np.broadcast_to(float32_sum_tolerance(n_terms, scale, c, eps), oracle64.shape)
    err = np.abs(actual - oracle64)
    bad = ~(err <= tol)  # NaN counts as off
    if bad.any():
        worst = np.unravel_index(np.nanargmax(np.where(bad, err - tol, -np.inf)), err.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.size} elements off the float64 oracle; worst at {tuple(map(int, worst))}: "
            f"{actual[worst]:.9g} against {oracle64[worst]:.9g}, error {err[worst]:.3g} > allowed {tol[worst]:.3g} "
            f"({c:g} * eps * sqrt(K) * scale, K = {n_terms}, scale {scale[worst]:.3g})")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(tol > 0, err / tol, 0.0)
    return float(ratio.max()) if ratio.size else 0.0


def fan_ins(params) -> tuple:
    """The size of every weight's sum in a network: ``prod(kernel.shape[:-1])`` for each ``kernel``
    leaf of ``params`` (convolutions ``kh * kw * C_in``, dense layers their inputs), to pass as
    ``n_terms`` for the whole network as a chain of sums."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return tuple(int(np.prod(np.shape(v)[:-1])) for path, v in leaves if getattr(path[-1], "key", None) == "kernel")


def two_float32_networks_tolerance(sums, scale, c: float = C, eps: float = EPS32):
    """The tolerance between two float32 implementations of one network where the reference is
    float32 by design (Keras, the stated reference of the ports: DESIGN.md). Each layer's sums round
    independently of the other layers' and of the other implementation's, so all of them add up like
    the terms of one sum of ``2 * sum(sums)`` terms (``sums``: every layer's sum size, e.g.
    :func:`fan_ins`): ``c * eps * sqrt(2 * sum(sums)) * scale``, with ``scale`` the output's."""
    return float32_sum_tolerance(2 * int(np.sum(sums)), scale, c, eps)
