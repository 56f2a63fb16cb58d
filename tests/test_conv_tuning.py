"""Convolutions chosen by measurement (``jaxcnn.conv_tuning``): the cache is used, the off switch
gives the untuned convolution exactly, a damaged cache or another machine's is not used, and a
chosen formulation keeps the float64 reference's numerics."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn import conv_tuning, layers, reference
from float64_oracle import assert_close_to_float64

X_SHAPE, W_SHAPE = (2, 6, 5, 3), (3, 3, 3, 4)


@pytest.fixture
def tuning(tmp_path, monkeypatch):
    """A cache file of the test's own, autotuning on, and the timing replaced by a count: every
    candidate timed gets ``ms[name]`` (winograd, then winograd4, im2col, XLA fastest; rows slowest)."""
    path = tmp_path / "conv_autotune.json"
    monkeypatch.setenv("JAXCNN_AUTOTUNE_CACHE", str(path))
    monkeypatch.setenv("JAXCNN_AUTOTUNE", "1")
    timed = []
    ms = {"winograd": 1.0, "winograd4": 1.5, "im2col": 2.0, "xla": 3.0, "rows_wt": 4.0, "rows": 9.0}

    def fake_time(timers, **kw):
        timed.append(sorted(timers))
        return {name: ms[name] for name in timers}

    monkeypatch.setattr(conv_tuning, "time_candidates", fake_time)
    return path, timed


def _grads(x, w):
    return jax.grad(lambda x, w: jnp.sum(layers.conv2d(x, w, padding="SAME") ** 3), argnums=(0, 1))


def _jaxpr(x, w):
    return str(jax.make_jaxpr(_grads(x, w))(x, w))


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal(X_SHAPE), jnp.float32),
            jnp.asarray(rng.standard_normal(W_SHAPE), jnp.float32))


def test_the_cache_is_used_a_second_trace_times_nothing(tuning):
    path, timed = tuning
    x, w = _data()
    first = _jaxpr(x, w)
    # each direction's candidates, then the winner and the default again (the fake winner always wins)
    assert timed == [["im2col", "winograd", "winograd4", "xla"], ["winograd", "xla"], ["winograd", "winograd4", "xla"],
                     ["winograd", "xla"], ["im2col", "rows", "rows_wt", "xla"], ["im2col", "rows"]]
    entries = json.loads(path.read_text())["machines"][conv_tuning.machine_key()]
    assert sorted(e["choice"] for e in entries.values()) == ["im2col", "winograd", "winograd"]
    assert _jaxpr(x, w) == first  # traced again (make_jaxpr keeps nothing): read from the file
    assert len(timed) == 6
    assert first != _untuned_jaxpr(x, w)


def test_a_convolution_not_differentiated_times_its_value_only(tuning):
    path, timed = tuning
    x, w = _data()
    jax.jit(lambda x, w: layers.conv2d(x, w, padding="VALID"))(x, w)
    assert timed == [["im2col", "winograd", "winograd4", "xla"], ["winograd", "xla"]]


def _untuned_jaxpr(x, w):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXCNN_AUTOTUNE", "0")
        return _jaxpr(x, w)


def test_the_off_switch_is_the_untuned_convolution_exactly(tuning, monkeypatch):
    path, timed = tuning
    x, w = _data()
    _jaxpr(x, w)  # a cache that picks other forms
    monkeypatch.setenv("JAXCNN_AUTOTUNE", "0")
    off = _jaxpr(x, w)
    monkeypatch.setenv("JAXCNN_AUTOTUNE_CACHE", str(path.with_name("empty.json")))
    monkeypatch.setenv("JAXCNN_AUTOTUNE", "cache")
    assert off == _jaxpr(x, w)  # nothing cached: the defaults
    assert len(timed) == 6  # the first call only
    y = layers.conv2d(x, w, padding="SAME")
    want = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want))  # XLA's own, bit for bit


@pytest.mark.parametrize("text", ["{not json", json.dumps({"format": 1, "machines": {"m": {"s": {"choice": 3}}}}),
                                  json.dumps([1, 2])])
def test_a_damaged_cache_is_ignored_with_one_warning_and_rewritten(tuning, text):
    path, timed = tuning
    path.write_text(text)
    x, w = _data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _jaxpr(x, w)
    damaged = [c for c in caught if "damaged" in str(c.message)]
    assert len(damaged) == 1, [str(c.message) for c in caught]
    assert len(timed) == 6
    assert len(json.loads(path.read_text())["machines"][conv_tuning.machine_key()]) == 3
    assert path.with_name(path.name + ".damaged").read_text() == text


def test_another_machines_choice_is_not_used(tuning, monkeypatch):
    path, timed = tuning
    x, w = _data()
    _jaxpr(x, w)
    data = json.loads(path.read_text())
    data["machines"] = {"Another CPU [avx2] cores=64 jax=0.0": data["machines"][conv_tuning.machine_key()]}
    path.write_text(json.dumps(data))
    monkeypatch.setenv("JAXCNN_AUTOTUNE", "cache")
    assert _jaxpr(x, w) == _untuned_jaxpr(x, w)
    monkeypatch.setenv("JAXCNN_AUTOTUNE", "1")
    _jaxpr(x, w)
    assert len(timed) == 12  # timed again for this machine; the other's entries kept
    assert len(json.loads(path.read_text())["machines"]) == 2


def test_the_chosen_forms_keep_the_float64_numerics(tuning):
    """With Winograd chosen for the value and the input gradient and im2col for the kernel gradient
    (the fake timings), the gradients of ``sum(conv ** 3)`` against the float64 reference."""
    path, timed = tuning
    x, w = _data(1)
    y = layers.conv2d(x, w, padding="SAME")
    dx, dw = jax.jit(_grads(x, w))(x, w)
    assert len(timed) == 6
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    pads = ((1, 1), (1, 1))
    y64, cache = reference.conv2d_forward_by_taps(x64, w64, None, (1, 1), pads, (1, 1))
    y2, _ = reference.conv2d_forward_by_taps(x64**2, w64**2, None, (1, 1), pads, (1, 1))
    assert_close_to_float64(y, y64, 27, np.sqrt(y2), what="value")
    g64 = 3 * y64**2
    dx64, dw64, _ = reference.conv2d_backward_by_taps(g64, cache)
    dx2, dw2, _ = reference.conv2d_backward_by_taps(g64**2, (x64**2, w64**2, None, (1, 1), pads, (1, 1)))
    # the upstream 3 * y**2 carries the value's rounding: 2 * its relative error, a sum of 27 terms
    assert_close_to_float64(dx, dx64, (27, 27, 36), np.sqrt(dx2), what="input gradient")
    assert_close_to_float64(dw, dw64, (27, 27, 60), np.sqrt(dw2), what="kernel gradient")


def test_timing_picks_the_fastest_only_beyond_the_noise_margin(tmp_path, monkeypatch):
    calls = []

    def timers(delays):
        def make():
            return {n: (lambda d=d, n=n: calls.append(n) or __import__("time").sleep(d)) for n, d in delays.items()}
        return make

    path = tmp_path / "c.json"
    slow = {"xla": 0.01, "winograd": 0.001}
    assert conv_tuning.choose("s1", "xla", list(slow), timers(slow), setting="1", path=path) == "winograd"
    close = {"xla": 0.02, "winograd": 0.0199}  # 0.5 % faster: within the margin, the default stays
    assert conv_tuning.choose("s2", "xla", list(close), timers(close), setting="1", path=path) == "xla"
    n = len(calls)
    assert conv_tuning.choose("s1", "xla", list(slow), timers(slow), setting="1", path=path) == "winograd"
    assert len(calls) == n  # cached
    monkeypatch.delenv("JAXCNN_AUTOTUNE", raising=False)
    assert conv_tuning.mode() == "0"  # off unless asked for
    with pytest.raises(ValueError, match="JAXCNN_AUTOTUNE must be one of 0, 1, cache, got 'sometimes'"):
        conv_tuning.mode("sometimes")


def test_a_winner_not_confirmed_by_a_second_timing_is_not_taken(tmp_path, monkeypatch):
    answers = iter([{"xla": 3.0, "winograd": 1.0}, {"xla": 3.0, "winograd": 2.95}])  # a noisy first timing
    monkeypatch.setattr(conv_tuning, "time_candidates", lambda timers, **kw: next(answers))
    path = tmp_path / "c.json"
    assert conv_tuning.choose("s", "xla", ["xla", "winograd"], lambda: {"xla": None, "winograd": None},
                              setting="1", path=path) == "xla"
    entry = json.loads(path.read_text())["machines"][conv_tuning.machine_key()]["s"]
    assert entry == {"choice": "xla", "ms": {"xla": 3.0, "winograd": 1.0, "xla again": 3.0, "winograd again": 2.95}}
