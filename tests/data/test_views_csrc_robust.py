"""terrafm._C.render_view on awkward input: odd sizes agree with the PyTorch reference, and every bad argument is one
Python exception (not a crash, an out-of-bounds read, garbage, or a result written into a discarded copy)."""

import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from terrafm import backends

pytestmark = pytest.mark.skipif(not backends.csrc().usable, reason="terrafm._C not built")


def _reference(tiles, band_index, boxes, flips, s, mean, std):
    """crop -> bilinear resize (align_corners=False) -> flips -> (x - mean) / std, in float32 with PyTorch."""
    out = []
    for tile, (top, left, h, w), (hf, vf) in zip(tiles, boxes, flips, strict=True):
        crop = torch.from_numpy(np.ascontiguousarray(tile[band_index, top:top + h, left:left + w]).astype(np.float32))
        x = F.interpolate(crop[None], size=(s, s), mode="bilinear", align_corners=False, antialias=False)[0]
        x = torch.flip(x, [d for d, f in ((2, hf), (1, vf)) if f])
        out.append((x - torch.from_numpy(mean)[:, None, None]) / torch.from_numpy(std)[:, None, None])
    return torch.stack(out)


def _render(tiles, band_index, boxes, flips, s, mean=None, std=None, is_half=None, out=None, threads=2):
    from terrafm import _C

    c = len(band_index)
    mean = np.zeros(c, np.float32) if mean is None else mean
    std = np.ones(c, np.float32) if std is None else std
    is_half = tiles[0].dtype == np.float16 if is_half is None else is_half
    out = np.full((len(tiles), c, s, s), np.nan, np.float32) if out is None else out
    _C.render_view(tiles, is_half, band_index, mean, std, boxes, flips, out, threads)
    return out


def _case(rng, channels, tile, dtype, boxes):
    hi = 10000 if dtype == np.uint16 else 30
    tiles = [(rng.uniform(0, hi, (channels, tile, tile)) - (0 if dtype == np.uint16 else hi / 2)).astype(dtype)
             for _ in boxes]
    flips = rng.integers(0, 2, (len(boxes), 2)).astype(np.uint8)
    return tiles, np.array(boxes, np.int32).reshape(-1, 4), flips


@pytest.mark.parametrize("dtype", [np.uint16, np.float16])
@pytest.mark.parametrize("channels,tile,boxes,s", [
    (2, 13, [(0, 0, 13, 13), (1, 2, 5, 11), (12, 12, 1, 1)], 7),   # odd tile, non-square and 1 px crops, downscale
    (12, 13, [(3, 0, 10, 1), (0, 4, 1, 9)], 29),                   # 1 px wide / tall crops, upscale
    (13, 16, [(0, 0, 16, 16), (5, 7, 11, 9)], 16),                 # 13 bands, identity size
    (2, 1, [(0, 0, 1, 1)], 8),                                     # 1 px tile
    (12, 24, [(2, 3, 17, 21), (0, 0, 24, 24), (4, 4, 9, 9)], 1),   # 1 px output
])
@pytest.mark.parametrize("threads", [1, 3])
def test_odd_sizes_match_pytorch(dtype, channels, tile, boxes, s, threads):
    rng = np.random.default_rng(channels * 100 + tile)
    tiles, boxes, flips = _case(rng, channels, tile, dtype, boxes)
    band_index = rng.permutation(channels)[:max(1, channels - 1)].astype(np.int64)
    mean = rng.uniform(-5, 5, len(band_index)).astype(np.float32)
    std = rng.uniform(0.5, 3, len(band_index)).astype(np.float32)
    got = _render(tiles, band_index, boxes, flips, s, mean, std, threads=threads)
    want = _reference(tiles, band_index, boxes, flips, s, mean, std)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-3)


def test_float16_bits_as_uint16_equal_float16_tiles():
    """The loader hands float16 tiles over as their uint16 bits with is_half=True; both spellings give one result."""
    tiles, boxes, flips = _case(np.random.default_rng(1), 2, 9, np.float16, [(1, 1, 7, 5), (0, 0, 9, 9)])
    a = _render(tiles, np.arange(2), boxes, flips, 6)
    b = _render([t.view(np.uint16) for t in tiles], np.arange(2), boxes, flips, 6, is_half=True)
    np.testing.assert_array_equal(a, b)


def test_out_must_be_the_array_written():
    """A strided or float16 `out` used to be copied by pybind11, filled, and dropped: out stayed as it was."""
    tiles, boxes, flips = _case(np.random.default_rng(2), 2, 8, np.uint16, [(0, 0, 8, 8)])
    strided = np.zeros((1, 2, 5, 5), np.float32).transpose(0, 1, 3, 2)
    for out in (strided, np.zeros((1, 2, 5, 5), np.float16), np.zeros((1, 2, 5, 5), np.float64),
                np.zeros((1, 2, 5, 5), ">f4")):
        with pytest.raises(ValueError, match="out must be a writeable, aligned, C-contiguous float32 array"):
            _render(tiles, np.arange(2), boxes, flips, 5, out=out)
        assert not out.any()
    frozen = np.zeros((1, 2, 5, 5), np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        _render(tiles, np.arange(2), boxes, flips, 5, out=frozen)


@pytest.mark.parametrize("bad,match", [
    (lambda t: t.astype(np.int16), "uint16 or float16"),            # int16 was read as uint16: 65536 off below 0
    (lambda t: t.astype(">u2"), "native byte order"),               # byte-swapped: read as garbage
    (lambda t: t.astype(np.float32), "uint16 or float16"),
    (lambda t: t[:, ::-1], "C-contiguous"),                         # negative stride
    (lambda t: t[:, :4, :4], "C-contiguous"),                        # non-contiguous slice
    (lambda t: t[0], r"C-contiguous \(C, T, T\)"),
])
def test_bad_tiles_raise(bad, match):
    tiles, boxes, flips = _case(np.random.default_rng(3), 2, 8, np.uint16, [(0, 0, 4, 4)])
    with pytest.raises(ValueError, match=match):
        _render([bad(tiles[0])], np.arange(2), boxes, flips, 4, is_half=False)


def test_float16_tiles_with_is_half_false_raise():
    """float16 tiles read as integers (is_half=False) gave their bit patterns as values."""
    tiles, boxes, flips = _case(np.random.default_rng(4), 2, 8, np.float16, [(0, 0, 4, 4)])
    with pytest.raises(ValueError, match="float16 tiles need is_half=True"):
        _render(tiles, np.arange(2), boxes, flips, 4, is_half=False)


def test_mixed_tile_dtypes_raise():
    a, boxes, flips = _case(np.random.default_rng(5), 2, 8, np.uint16, [(0, 0, 4, 4), (0, 0, 4, 4)])
    with pytest.raises(ValueError, match="share one dtype"):
        _render([a[0].astype(np.float16), a[1]], np.arange(2), boxes, flips, 4, is_half=True)


@pytest.mark.parametrize("box", [(0, 0, 9, 4), (5, 0, 4, 4), (-1, 0, 2, 2), (0, 0, 0, 3), (0, 2, 3, 7)])
def test_boxes_outside_the_tile_raise(box):
    tiles, boxes, flips = _case(np.random.default_rng(6), 2, 8, np.uint16, [box])
    with pytest.raises(ValueError, match="lies outside the"):
        _render(tiles, np.arange(2), boxes, flips, 4)


def test_box_sum_overflowing_int32_raises_instead_of_reading_out_of_bounds():
    """top + height was summed in int32: 2**31 - 1 + 1 wrapped negative, passed the check and crashed the process."""
    code = (
        "import numpy as np\n"
        "from terrafm import _C\n"
        "t = np.zeros((1, 8, 8), np.uint16)\n"
        "out = np.zeros((1, 1, 2, 2), np.float32)\n"
        "for box in ([2**31 - 1, 0, 1, 1], [0, 2**31 - 1, 1, 1], [7, 0, 2**31 - 1, 1]):\n"
        "    try:\n"
        "        _C.render_view([t], False, np.zeros(1, np.int64), np.zeros(1, np.float32), np.ones(1, np.float32),\n"
        "                       np.array([box], np.int32), np.zeros((1, 2), np.uint8), out, 1)\n"
        "    except ValueError as err:\n"
        "        assert 'outside' in str(err), err\n"
        "    else:\n"
        "        raise SystemExit('accepted ' + str(box))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, (run.returncode, run.stdout, run.stderr)


@pytest.mark.parametrize("mean,std", [(0.0, 0.0), (0.0, -1.0), (np.nan, 1.0), (0.0, np.nan), (np.inf, 1.0),
                                      (0.0, 1e-40), (0.0, 5e-39)])
def test_non_finite_or_non_positive_normalisation_raises(mean, std):
    """std 0 gave inf pixels and NaN statistics gave NaN pixels, silently; a subnormal std (1 / std = inf, or finite
    from 2.9e-39 up) too."""
    tiles, boxes, flips = _case(np.random.default_rng(7), 2, 8, np.uint16, [(0, 0, 4, 4)])
    with pytest.raises(ValueError, match="mean must be finite and std finite, > 0"):
        _render(tiles, np.arange(2), boxes, flips, 4, np.array([0.0, mean], np.float32),
                np.array([1.0, std], np.float32))


@pytest.mark.parametrize("box,s", [((0, 0, 6, 6), 6), ((1, 0, 6, 5), 6), ((0, 0, 5, 6), 9)])
def test_non_finite_pixel_spreads_as_in_pytorch(box, s):
    """An axis whose crop is the output's size is PyTorch's copy case (both taps on one pixel): one inf pixel
    became a cross of NaNs in the C++ path and stayed one NaN in the reference."""
    tile = np.zeros((1, 8, 8), np.float16)
    tile[0, 3, 3] = np.inf
    boxes, flips = np.array([box], np.int32), np.array([[1, 0]], np.uint8)
    got = torch.from_numpy(_render([tile], np.arange(1), boxes, flips, s))
    want = _reference([tile], np.arange(1), boxes, flips, s, np.zeros(1, np.float32), np.ones(1, np.float32))
    torch.testing.assert_close(got, want, equal_nan=True)


def test_a_sharp_step_on_a_full_size_tile_resizes_as_pytorch_does():
    """The source coordinate scale * (d + 0.5) - 0.5 was rounded twice where PyTorch's kernel rounds once (FMA): next
    to a step of 43000 in a 534 px float16 tile the 224 px view read 0.17 where PyTorch reads 0.31. Also a 1 px inf
    upscaled: a weight of 1.5e-8 came out 0, and inf * 0 spread NaN where PyTorch spreads inf."""
    tile = np.zeros((1, 534, 534), np.float16)
    tile[0, 105 + 38:105 + 40, 1 + 127:1 + 129] = [[24208, -18960], [9304, 20128]]
    tile[0, 105:107, 1:4] = 30000
    boxes, flips = np.array([(105, 1, 406, 528)], np.int32), np.zeros((1, 2), np.uint8)
    got = torch.from_numpy(_render([tile], np.arange(1), boxes, flips, 224))
    want = _reference([tile], np.arange(1), boxes, flips, 224, np.zeros(1, np.float32), np.ones(1, np.float32))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
    assert abs(got[0, 0, 21, 54].item() - want[0, 0, 21, 54].item()) < 1e-3
    one = np.full((1, 1, 1), -np.inf, np.float16)
    boxes = np.array([(0, 0, 1, 1)], np.int32)
    got = torch.from_numpy(_render([one], np.arange(1), boxes, flips, 3))
    want = _reference([one], np.arange(1), boxes, flips, 3, np.zeros(1, np.float32), np.ones(1, np.float32))
    torch.testing.assert_close(got, want, equal_nan=True)


def _misaligned(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of `a` one byte past an aligned address: not aligned for any dtype wider than a byte."""
    buf = np.zeros(a.nbytes + 32, np.uint8)
    start = (-buf.ctypes.data) % 16 + 1
    view = buf[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    view[...] = a
    assert view.flags.c_contiguous and not view.flags.aligned
    return view


@pytest.mark.parametrize("name", ["tiles", "band_index", "mean", "std", "boxes", "out"])
def test_an_array_not_aligned_for_its_dtype_is_refused(name):
    """A view at an odd byte offset is C-contiguous but not aligned: it was read as uint16_t* / float* / int64_t*
    (undefined behaviour, flagged by UBSan); now it is a ValueError naming the argument."""
    tiles, boxes, flips = _case(np.random.default_rng(9), 2, 8, np.uint16, [(0, 0, 4, 4)])
    args = {"tiles": tiles, "band_index": np.arange(2), "mean": np.zeros(2, np.float32),
            "std": np.ones(2, np.float32), "boxes": boxes, "out": np.zeros((1, 2, 4, 4), np.float32)}
    args[name] = [_misaligned(t) for t in tiles] if name == "tiles" else _misaligned(args[name])
    with pytest.raises(ValueError, match="not aligned|aligned, C-contiguous"):
        _render(args["tiles"], args["band_index"], args["boxes"], flips, 4, args["mean"], args["std"], out=args["out"])


def test_shape_and_index_errors_raise():
    tiles, boxes, flips = _case(np.random.default_rng(8), 3, 8, np.uint16, [(0, 0, 4, 4)])
    with pytest.raises(ValueError, match="band_index out of range"):
        _render(tiles, np.array([0, 3]), boxes, flips, 4)
    with pytest.raises(ValueError, match="band_index out of range"):
        _render(tiles, np.array([-1]), boxes, flips, 4)
    with pytest.raises(ValueError, match=r"out must be \(B, C, s, s\)"):
        _render(tiles, np.arange(3), boxes, flips, 4, out=np.zeros((1, 3, 4, 5), np.float32))
    with pytest.raises(ValueError, match="one value per band"):
        _render(tiles, np.arange(3), boxes, flips, 4, mean=np.zeros(2, np.float32))
    with pytest.raises(ValueError, match=r"boxes must be \(B, 4\)"):
        _render(tiles, np.arange(3), boxes[:, :3], flips, 4)
    with pytest.raises(ValueError, match="share one"):
        _render([tiles[0], tiles[0][:, :4, :4].copy()], np.arange(3), np.repeat(boxes, 2, 0), np.repeat(flips, 2, 0), 4)
    with pytest.raises(TypeError):  # int64 boxes are not narrowed to int32 behind the caller's back
        _render(tiles, np.arange(3), boxes.astype(np.int64) + 2**32, flips, 4)


def test_empty_batch_is_a_no_op():
    """B = 0 used to fail with 'band_index out of range' (no tile to take the band count from)."""
    from terrafm import _C

    out = np.zeros((0, 3, 4, 4), np.float32)
    _C.render_view([], False, np.arange(3), np.zeros(3, np.float32), np.ones(3, np.float32),
                   np.zeros((0, 4), np.int32), np.zeros((0, 2), np.uint8), out, 2)


def test_concurrent_calls_from_python_threads_agree():
    """The op releases the GIL and spawns its own threads: calls from several loader workers at once stay exact."""
    rng = np.random.default_rng(9)
    tiles, boxes, flips = _case(rng, 12, 40, np.uint16, [(1, 2, 30, 25), (0, 0, 40, 40), (5, 5, 10, 30)] * 3)
    want = _render(tiles, np.arange(12), boxes, flips, 24, threads=1)
    results, errors = [None] * 6, []

    def run(k):
        try:
            results[k] = _render(tiles, np.arange(12), boxes, flips, 24, threads=3)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    workers = [threading.Thread(target=run, args=(k,)) for k in range(6)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors
    for got in results:
        np.testing.assert_array_equal(got, want)
