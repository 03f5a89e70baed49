"""The compressed-update wire format: hand-computed small cases per method, the stated
error bounds on random updates, malformed parts refused, clipping in the compressed
domain, and error feedback carrying exactly what compression dropped."""

from __future__ import annotations

import numpy as np
import pytest

from atoll.federated.compression import Codec, WireError, bound, compress, decompress, scaled

RNG = np.random.default_rng(0)


def _roundtrip(x, sizes, codec, seed=0):
    parts = compress(np.asarray(x, np.float32), sizes, codec, np.random.default_rng(seed))
    return parts, decompress(parts, sizes, codec)


def test_int8_per_tensor_by_hand():
    """Tensor 1 [1.27, -0.635, 0.001]: s = 1.27/127 = 0.01, q = [127, -64 (rint -63.5 →
    even), 0]; tensor 2 [0, 0]: s = 0, q = 0."""
    parts, out = _roundtrip([1.27, -0.635, 0.001, 0, 0], [3, 2], Codec("int8"))
    np.testing.assert_allclose(parts["s"], [0.01, 0.0], rtol=1e-6)
    assert parts["q"].tolist() == [127, -64, 0, 0, 0]
    np.testing.assert_allclose(out, [1.27, -0.64, 0, 0, 0], rtol=1e-6)


def test_int8_blocks_never_cross_tensors():
    """block_size 2 over tensors of 3 and 2: blocks [a0 a1] [a2] [b0 b1] → 3 scales."""
    parts, out = _roundtrip([1.0, 0.5, -2.0, 0.25, 0.125], [3, 2], Codec("int8", block_size=2))
    np.testing.assert_allclose(parts["s"], [1 / 127, 2 / 127, 0.25 / 127], rtol=1e-6)
    np.testing.assert_allclose(out, [1.0, 0.5, -2.0, 0.25, 0.125], atol=1e-2)


def test_fp16_scales_by_the_tensors_largest_value():
    parts, out = _roundtrip([4.0, -1.0, 0.5], [3], Codec("fp16"))
    assert parts["s"].tolist() == [4.0]
    assert parts["v"].tolist() == [1.0, -0.25, 0.125]  # exact in fp16
    np.testing.assert_array_equal(out, [4.0, -1.0, 0.5])


def test_qsgd_by_hand():
    """x = [3, -4], ‖x‖ = 5, levels 5: |x|/‖x‖·5 = [3, 4] exactly, so ξ = [3, 4] whatever
    the draw; codes ξ·sign + 5 = [8, 1] packed at 4 bits: 8 | 1 << 4 = 24."""
    parts, out = _roundtrip([3.0, -4.0], [2], Codec("qsgd", levels=5))
    assert parts["q"].tolist() == [8 | 1 << 4]
    np.testing.assert_allclose(parts["s"], [1.0])
    np.testing.assert_allclose(out, [3.0, -4.0])


def test_qsgd_is_unbiased():
    x = RNG.normal(size=50).astype(np.float32)
    mean = np.mean([_roundtrip(x, [50], Codec("qsgd", levels=2), seed=s)[1]
                    for s in range(4000)], axis=0)
    np.testing.assert_allclose(mean, x, atol=0.08)


def test_topk_keeps_the_largest_per_tensor_and_picks_the_smaller_encoding():
    """fraction 0.5 of tensors of 4 and 2: 2 + 1 values; 3 indices (12 bytes) against a
    1-byte mask: the mask is sent."""
    x = [0.1, -3.0, 0.2, 2.0, 0.5, -0.4]
    parts, out = _roundtrip(x, [4, 2], Codec("topk", fraction=0.5))
    assert "m" in parts and "i" not in parts
    assert np.unpackbits(parts["m"])[:6].tolist() == [0, 1, 0, 1, 1, 0]
    np.testing.assert_allclose(out, [0, -3.0, 0, 2.0, 0.5, 0], rtol=1e-3)
    # 1 % of 10,000 values: 100 indices (400 bytes) beat a 1,250-byte mask
    big = RNG.normal(size=10_000).astype(np.float32)
    parts, out = _roundtrip(big, [10_000], Codec("topk", fraction=0.01))
    assert "i" in parts and len(parts["i"]) == 100
    kept = np.argsort(-np.abs(big))[:100]
    assert set(np.flatnonzero(out)) == set(kept)


def test_randk_sends_a_seed_and_the_server_draws_the_same_positions():
    x = RNG.normal(size=40).astype(np.float32)
    parts, out = _roundtrip(x, [30, 10], Codec("randk", fraction=0.2))
    assert set(parts) == {"v", "s", "seed"} and len(parts["v"]) == 6 + 2
    nz = np.flatnonzero(out)
    assert len(nz) == 8 and (nz < 30).sum() == 6
    np.testing.assert_allclose(out[nz], x[nz], rtol=1e-3)


@pytest.mark.parametrize("codec", [Codec("fp16"), Codec("int8"), Codec("int8", 64),
                                   Codec("int8", 0, True), Codec("qsgd", levels=1),
                                   Codec("qsgd", levels=7), Codec("qsgd", levels=127),
                                   Codec("topk", fraction=0.1), Codec("randk", fraction=0.3)],
                         ids=lambda c: f"{c.method}-{c.block_size}-{c.stochastic}-{c.levels}")
def test_every_method_meets_its_stated_bound(codec):
    sizes = [300, 7, 1, 1000]
    x = (RNG.normal(size=sum(sizes)) * RNG.choice([1e-4, 1e-2, 1.0], size=sum(sizes))
         ).astype(np.float32)
    parts, out = _roundtrip(x, sizes, codec)
    assert out.dtype == np.float32 and out.shape == x.shape
    assert (np.abs(out - x) <= bound(x, sizes, codec, parts)).all()


def test_a_scaled_message_decodes_to_the_scaled_update():
    x = RNG.normal(size=100).astype(np.float32)
    for codec in (Codec("int8"), Codec("qsgd"), Codec("topk"), Codec("fp16")):
        parts, out = _roundtrip(x, [60, 40], codec)
        half = decompress(scaled(parts, 0.5), [60, 40], codec)
        np.testing.assert_allclose(half, out * 0.5, rtol=1e-6)


@pytest.mark.parametrize("method,change,message", [
    ("int8", lambda p: {**p, "q": p["q"][:-1]}, "'q' is int8[9], expected int8[10]"),
    ("int8", lambda p: {**p, "extra": p["s"]}, "extra ['extra']"),
    ("int8", lambda p: {**p, "s": -p["s"]}, "finite and non-negative"),
    ("int8", lambda p: {**p, "q": p["q"].astype(np.int16)}, "'q' is int16"),
    ("fp16", lambda p: {**p, "v": np.full(10, np.inf, np.float16)}, "finite"),
    ("qsgd", lambda p: {**p, "q": np.full_like(p["q"], 255)}, "qsgd codes"),
    ("topk", lambda p: {**p, "m": np.full_like(p["m"], 255)}, "top-k"),
    ("randk", lambda p: {**p, "seed": np.array([-1], np.int64)}, "seed"),
    ("int8", lambda p: {**p, "q": np.full(10, -128, np.int8)}, "int8 codes"),
])
def test_malformed_parts_are_refused_naming_what_is_wrong(method, change, message):
    codec = Codec(method, fraction=0.2)
    parts, _ = _roundtrip(RNG.normal(size=10), [10], codec)
    with pytest.raises(WireError, match=message.replace("[", r"\[").replace("]", r"\]")):
        decompress(change(parts), [10], codec)


@pytest.mark.parametrize("codec", [Codec("topk", fraction=0.05),
                                   Codec("qsgd", levels=2, damped=True),
                                   Codec("int8", stochastic=True)],
                         ids=lambda c: c.method)
def test_error_feedback_residuals_stay_bounded(codec):
    """Each compressor under error feedback is a contraction: the residual stays within
    a few updates' worth over 30 rounds (qsgd with 2 levels only because it is damped:
    undamped, below, it grows without bound). The bookkeeping itself — what was sent plus
    the final residual is what was trained — is tested through the client in
    test_fl_compression."""
    sizes = [80, 20]
    residual = np.zeros(100, np.float32)
    for r in range(30):
        u = np.random.default_rng(r).normal(size=100).astype(np.float32)
        v = u + residual
        d = decompress(compress(v, sizes, codec, np.random.default_rng(r)), sizes, codec)
        residual = v - d
    assert np.abs(residual).max() > 0  # something was dropped
    assert np.linalg.norm(residual) < 20 * np.sqrt(100)  # ≈ 10 updates' worth at most


def test_undamped_qsgd_residuals_explode():
    """Why qsgd is damped under error feedback: 2 levels over 100 values, undamped."""
    residual = np.zeros(100, np.float32)
    codec = Codec("qsgd", levels=2)
    for r in range(30):
        v = np.random.default_rng(r).normal(size=100).astype(np.float32) + residual
        residual = v - decompress(compress(v, [100], codec, np.random.default_rng(r)),
                                  [100], codec)
    assert np.linalg.norm(residual) > 1e3


@pytest.mark.parametrize("indices,message", [
    ([3, 1], "increasing"), ([1, 1], "increasing"), ([-1, 2], "inside the model"),
    ([0, 10_000], "inside the model"), ([0, 210], "per tensor"),
])
def test_a_top_k_index_list_must_be_ordered_in_range_and_per_tensor(indices, message):
    """1 % of two tensors of 200 and 100 values: 2 + 1 indices (12 bytes, not a 38-byte
    mask); crafted index lists are refused."""
    codec, sizes = Codec("topk", fraction=0.01), [200, 100]
    parts, _ = _roundtrip(RNG.normal(size=300), sizes, codec)
    assert "i" in parts and len(parts["i"]) == 3
    bad = {**parts, "i": np.array([*indices, 250][:3], np.int32)}
    with pytest.raises(WireError, match=message):
        decompress(bad, sizes, codec)


def test_a_model_with_empty_tensors_round_trips():
    sizes = [0, 5, 0]
    x = RNG.normal(size=5).astype(np.float32)
    for codec in (Codec("int8"), Codec("qsgd"), Codec("topk"), Codec("randk"), Codec("fp16"),
                  Codec("int8", block_size=2)):
        parts, out = _roundtrip(x, sizes, codec)
        assert out.shape == (5,) and np.isfinite(out).all()
