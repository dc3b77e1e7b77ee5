"""fastrec.kernels.hashing on the CPU: known answers, an independent pure-Python implementation,
NumPy reference vs Numba kernel (bit-identical), dtypes and shapes, and errors. The CuPy kernel
is checked against the same reference in test_cupy_kernels.py."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fastrec.kernels import hashing

try:
    import numba  # noqa: F401

    HAS_NUMBA = True
except ImportError:  # pragma: no cover
    HAS_NUMBA = False

needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed")

# ---- an independent implementation: Python ints, straight from the module docstring ----------

M64 = (1 << 64) - 1


def py_mix64(z):
    z &= M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def py_fnv1a64(data: bytes):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def py_row(x: int, num_rows: int, salt=0) -> int:
    if isinstance(salt, str):
        salt = py_fnv1a64(salt.encode("utf-8"))
    key = py_mix64((salt & M64) + 0x9E3779B97F4A7C15)
    return py_mix64((x & M64) ^ key) % num_rows


def py_string_row(s, num_rows: int, salt=0) -> int:
    data = s.encode("utf-8") if isinstance(s, str) else s
    return py_row(py_fnv1a64(data), num_rows, salt)


INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
SALTS = [0, 1, 7, -1, 2**64 - 1, 2**70 + 3, "item_id", "日本"]
ROWS = [1, 2, 97, 1000003, 2**31 - 1, 2**63 - 1]


def _random_ids(rng, dtype, n):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=n, endpoint=True, dtype=dtype)


# ---- known answers ----------------------------------------------------------------------------


def test_published_constants():
    # splitmix64 seeded with 0 first returns 0xE220A8397B1DCDAF: that is key(0) = mix64(0 + GOLDEN).
    assert hashing.salt_key(0) == 0xE220A8397B1DCDAF
    # FNV-1a 64 test vectors (Fowler/Noll/Vo): "", "a", "foobar". A string hashes as its FNV value.
    for s, fnv in [("", 0xCBF29CE484222325), ("a", 0xAF63DC4C8601EC8C), ("foobar", 0x85944171F73967E8)]:
        assert py_fnv1a64(s.encode()) == fnv
        for n in (97, 2**63 - 1):
            expected = hashing.hash_ids_ref(np.array([fnv], dtype=np.uint64), n, salt=5)
            assert np.array_equal(hashing.hash_strings_ref([s], n, salt=5), expected)
            assert np.array_equal(hashing.hash_strings([s], n, salt=5), expected)


# Regression vectors: a stored model depends on these never changing.
KNOWN = [  # (id, salt, num_rows, row)
    (0, 0, 2**63 - 1, 5197578548964807871 % (2**63 - 1)),
    (1, 0, 2**63 - 1, 11385487063155714807 % (2**63 - 1)),
    (-1, 0, 2**63 - 1, 17492683508065611904 % (2**63 - 1)),
    (0, 0, 1000003, 939046),
    (1, 0, 1000003, 994419),
    (-1, 0, 1000003, 521388),
    (12345, 7, 1000003, 986488),
    (2**63 - 1, "item_id", 1000003, 263683),
]


@pytest.mark.parametrize("x, salt, num_rows, row", KNOWN)
def test_known_answers(x, salt, num_rows, row):
    assert py_row(x, num_rows, salt) == row  # the independent implementation agrees
    ids = np.array([x], dtype=np.int64)
    assert hashing.hash_ids_ref(ids, num_rows, salt).tolist() == [row]
    assert hashing.hash_ids(ids, num_rows, salt).tolist() == [row]
    if HAS_NUMBA:
        assert hashing.hash_ids_numba(ids, num_rows, salt).tolist() == [row]


def test_known_string_answer():
    assert hashing.hash_strings(["héllo"], 1000003).tolist() == [126093]
    assert hashing.hash_ids(["héllo"], 1000003).tolist() == [126093]
    assert py_string_row("héllo", 1000003) == 126093


# ---- against the independent implementation ---------------------------------------------------


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_ref_matches_pure_python(dtype):
    rng = np.random.default_rng(1)
    ids = _random_ids(rng, dtype, 300)
    ids[:2] = [np.iinfo(dtype).min, np.iinfo(dtype).max]
    for salt in SALTS:
        for n in ROWS:
            got = hashing.hash_ids_ref(ids, n, salt)
            assert got.dtype == np.int64 and got.shape == ids.shape
            assert got.tolist() == [py_row(int(x), n, salt) for x in ids]


def test_strings_match_pure_python():
    strings = ["", "a", "hello", "héllo wörld", "日本語", "🙂 emoji", "x" * 1000, "\x00", "a\x00b"]
    for salt in (0, 3, "feature"):
        for n in (1, 97, 2**63 - 1):
            expected = [py_string_row(s, n, salt) for s in strings]
            assert hashing.hash_strings_ref(strings, n, salt).tolist() == expected
            assert hashing.hash_strings(strings, n, salt).tolist() == expected
            assert hashing.hash_ids(strings, n, salt).tolist() == expected
    raw = [b"", b"\xff\xfe", b"bytes\x00tail"]
    assert hashing.hash_strings_ref(raw, 97).tolist() == [py_string_row(b, 97) for b in raw]


# ---- NumPy reference vs Numba kernel: bit-identical ------------------------------------------------


@needs_numba
@pytest.mark.parametrize("dtype", INT_DTYPES)
@pytest.mark.parametrize("n", [0, 1, 3, 97, 100_000])
def test_numba_matches_numpy(dtype, n):
    rng = np.random.default_rng(n)
    ids = _random_ids(rng, dtype, n)
    for salt in SALTS:
        for num_rows in ROWS:
            ref = hashing.hash_ids_ref(ids, num_rows, salt)
            got = hashing.hash_ids_numba(ids, num_rows, salt)
            assert got.dtype == np.int64 and np.array_equal(got, ref)
    assert np.array_equal(hashing.hash_ids(ids, 1000, 9), hashing.hash_ids_ref(ids, 1000, 9))


@needs_numba
def test_numba_strings_match_numpy():
    rng = np.random.default_rng(7)
    alphabet = list("abcdefghijklmnopqrstuvwxyzäöü日本🙂 ")
    strings = ["".join(rng.choice(alphabet, size=int(k))) for k in rng.integers(0, 40, size=2000)]
    for salt in (0, "user_id", 2**64 - 5):
        for n in (7, 1000003, 2**63 - 1):
            ref = hashing.hash_strings_ref(strings, n, salt)
            assert np.array_equal(hashing.hash_strings_numba(strings, n, salt), ref)
            assert np.array_equal(hashing.hash_strings(strings, n, salt), ref)


def test_numpy_string_hash_finishes_long_strings_in_python():
    # One NumPy step per byte of the longest string: a batch with one 1 MB string took ~5 s.
    # Strings of every length around the switch to the per-string loop, and one long one.
    rng = np.random.default_rng(5)
    strings = ["".join(rng.choice(list("abcé🙂"), size=int(n))) for n in rng.integers(0, 40, 60)]
    strings += ["z" * 50_000, "", "q" * 17]
    expected = [py_string_row(s, 1009) for s in strings]
    assert hashing.hash_strings_ref(strings, 1009).tolist() == expected
    assert hashing.hash_strings_ref(strings[-3:], 1009).tolist() == expected[-3:]


@needs_numba
def test_kernels_compile_without_a_writable_numba_cache(monkeypatch):
    # A read-only install run by a user without a writable home: numba.njit(cache=True) raises
    # RuntimeError ("cannot cache function ...: no locator available") when applied, and every
    # featurizer / hash_ids / fastrec.load of a model with a featurizer failed with it.
    import numba

    from fastrec.kernels import featurize

    real = numba.njit

    def njit(*args, **kwargs):
        if kwargs.get("cache"):
            def refuse(fn):
                raise RuntimeError(f"cannot cache function {fn.__name__!r}: no locator available for file 'x.py'")
            return refuse
        return real(*args, **kwargs)

    monkeypatch.setattr(numba, "njit", njit)
    monkeypatch.setattr(hashing, "_numba_kernels", {})
    monkeypatch.setattr(featurize, "_kernels", {})
    ids = np.arange(-5, 50, dtype=np.int64)
    np.testing.assert_array_equal(hashing.hash_ids_numba(ids, 97), hashing.hash_ids_ref(ids, 97))
    assert featurize.numba_available()


@needs_numba
def test_numba_from_threads():
    """nogil kernels called from several threads at once give the same answers."""
    rng = np.random.default_rng(3)
    chunks = [rng.integers(-(2**62), 2**62, size=50_000) for _ in range(8)]
    expected = [hashing.hash_ids_ref(c, 12345, 2) for c in chunks]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda c: hashing.hash_ids_numba(c, 12345, 2), chunks))
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))


def test_without_numba_falls_back_to_numpy(monkeypatch):
    monkeypatch.setattr(hashing, "_numba", lambda name: None)
    ids = np.arange(-50, 50)
    assert np.array_equal(hashing.hash_ids(ids, 13, 1), hashing.hash_ids_ref(ids, 13, 1))
    assert np.array_equal(hashing.hash_strings(["a", "b"], 13), hashing.hash_strings_ref(["a", "b"], 13))
    assert not hashing.numba_available()
    with pytest.raises(ImportError, match="numba"):
        hashing.hash_ids_numba(ids, 13)


# ---- dtypes, shapes, values ------------------------------------------------------------------------


def test_value_not_dtype_decides():
    for dtype in INT_DTYPES:
        assert hashing.hash_ids(np.array([7], dtype=dtype), 1000).tolist() == hashing.hash_ids([7], 1000).tolist()
    minus_one = hashing.hash_ids(np.array([-1], dtype=np.int64), 2**63 - 1)
    for dtype in (np.int8, np.int16, np.int32):
        assert np.array_equal(hashing.hash_ids(np.array([-1], dtype=dtype), 2**63 - 1), minus_one)
    # -1 and 2**64 - 1 share a bit pattern, hence a row (documented).
    assert np.array_equal(hashing.hash_ids(np.array([2**64 - 1], dtype=np.uint64), 2**63 - 1), minus_one)


def test_shapes_and_array_likes():
    ids = np.arange(24, dtype=np.int64).reshape(2, 3, 4)
    flat = hashing.hash_ids(ids.reshape(-1), 50, 1)
    for fn in (hashing.hash_ids, hashing.hash_ids_ref):
        out = fn(ids, 50, 1)
        assert out.shape == (2, 3, 4) and np.array_equal(out.reshape(-1), flat)
        assert fn(ids[:, ::2, 1::3], 50, 1).tolist() == flat.reshape(2, 3, 4)[:, ::2, 1::3].tolist()
        assert fn([], 50).shape == (0,) and fn(np.zeros((3, 0), np.int32), 50).shape == (3, 0)
        assert fn(np.int64(5), 50).shape == () and int(fn(5, 50, 1)) == int(flat[5])
        assert fn(range(24), 50, 1).tolist() == flat.tolist()
    s = np.array([["a", "bb"], ["", "日本"]])
    assert hashing.hash_ids(s, 31).shape == (2, 2)
    assert hashing.hash_ids(s, 31).tolist() == [[py_string_row(x, 31) for x in row] for row in s.tolist()]
    assert hashing.hash_ids(np.array([b"a", b"bb"]), 31).tolist() == [py_string_row(b"a", 31), py_string_row(b"bb", 31)]
    assert hashing.hash_ids(np.array(["a", "bb"], dtype=object), 31).tolist() == [py_string_row("a", 31),
                                                                                     py_string_row("bb", 31)]


def test_torch_cpu_tensor():
    torch = pytest.importorskip("torch")
    ids = torch.arange(-10, 10)
    assert np.array_equal(hashing.hash_ids(ids, 17, 4), hashing.hash_ids_ref(np.arange(-10, 10), 17, 4))
    with pytest.raises(TypeError, match="integers"):
        hashing.hash_ids(torch.ones(3), 17)


def test_rows_in_range_and_spread():
    ids = np.arange(200_000)
    for n in (1, 2, 97, 1000):
        rows = hashing.hash_ids(ids, n, "f")
        assert rows.min() >= 0 and rows.max() < n
    counts = np.bincount(hashing.hash_ids(ids, 100, "f"), minlength=100)
    assert counts.min() > 1700 and counts.max() < 2300  # sequential ids spread evenly (mean 2000)
    assert not np.array_equal(hashing.hash_ids(ids[:100], 1000, 0), hashing.hash_ids(ids[:100], 1000, 1))


def test_salt_forms():
    ids = np.arange(100)
    assert np.array_equal(hashing.hash_ids(ids, 1000, "user"), hashing.hash_ids(ids, 1000, py_fnv1a64(b"user")))
    assert np.array_equal(hashing.hash_ids(ids, 1000, b"user"), hashing.hash_ids(ids, 1000, "user"))
    assert np.array_equal(hashing.hash_ids(ids, 1000, -1), hashing.hash_ids(ids, 1000, 2**64 - 1))
    assert np.array_equal(hashing.hash_ids(ids, 1000, np.int32(3)), hashing.hash_ids(ids, 1000, 3))


# ---- errors ------------------------------------------------------------------------------------------

ALL_CPU = [hashing.hash_ids, hashing.hash_ids_ref] + ([hashing.hash_ids_numba] if HAS_NUMBA else [])


@pytest.mark.parametrize("fn", ALL_CPU)
def test_bad_num_rows(fn):
    ids = np.arange(5)
    for n in (0, -1, -(2**70)):
        with pytest.raises(ValueError, match="num_rows must be >= 1"):
            fn(ids, n)
    with pytest.raises(ValueError, match="2\\*\\*63"):
        fn(ids, 2**63)
    for n in (2.0, "10", None, True, np.float64(3)):
        with pytest.raises(TypeError, match="num_rows must be an int"):
            fn(ids, n)


@pytest.mark.parametrize("fn", ALL_CPU)
def test_non_integer_ids(fn):
    for ids in (np.ones(3), np.ones(3, np.float32), np.array([True, False]), [1.5, 2.0],
                np.array([1, "a"], dtype=object), np.array([1 + 2j])):
        with pytest.raises(TypeError):
            fn(ids, 10)


def test_bad_strings_and_salts():
    with pytest.raises(TypeError, match="str or bytes, got int at position 1"):
        hashing.hash_ids(["a", 3], 10)
    with pytest.raises(TypeError, match="str or bytes"):
        hashing.hash_strings_ref(["a", None], 10)
    with pytest.raises(TypeError, match="not a single string"):
        hashing.hash_ids("abc", 10)
    for salt in (1.5, None, True, [1]):
        with pytest.raises(TypeError, match="salt must be an int or a string"):
            hashing.hash_ids(np.arange(3), 10, salt)


@pytest.mark.parametrize("fn", [hashing.hash_strings, hashing.hash_strings_ref]
                         + ([hashing.hash_strings_numba] if HAS_NUMBA else []))
def test_strings_without_utf8_encoding(fn):
    # a lone surrogate has no UTF-8 encoding: a ValueError saying which string (it was a bare
    # UnicodeEncodeError); bytes, any bytes, are hashed as they are (test_strings_match_pure_python)
    with pytest.raises(ValueError, match=r"strings\[2\] is a str with no UTF-8 encoding"):
        fn(["a", b"\xff", "b\ud800"], 10)
    with pytest.raises(ValueError, match="salt is a str with no UTF-8 encoding"):
        fn(["a"], 10, "\udc80")


@pytest.mark.parametrize("dtype", [">i8", ">u8", ">i4", "<i8"])
def test_byte_swapped_ids_hash_by_value(dtype):
    # 8-byte ids were hashed through a raw uint64 view: byte-swapped ones hashed their swapped bytes.
    from fastrec.kernels import featurize as fk

    ids = np.array([0, 1, 2, 7, 2**31 - 1], dtype=dtype)
    native = ids.astype(ids.dtype.newbyteorder("="))
    expect = hashing.hash_ids(native, 97)
    np.testing.assert_array_equal(hashing.hash_ids(ids, 97), expect)
    np.testing.assert_array_equal(hashing.hash_ids_ref(ids, 97), expect)
    for backend in ("numpy", "auto"):  # the featurizer's path (numba where installed)
        np.testing.assert_array_equal(fk.hash_rows(ids, 97, hashing.salt_key(0), backend=backend), expect)


def test_bytearray_strings_and_unholdable_python_ints():
    # A bytearray element was hashed as a row of integer ids; Python ints that no integer dtype
    # holds gave a TypeError about float64.
    assert hashing.hash_ids([bytearray(b"ab")], 1000).tolist() == hashing.hash_ids([b"ab"], 1000).tolist()
    for bad in ([2**64 - 1, -1], [2**70]):
        with pytest.raises(TypeError, match="no single integer dtype"):
            hashing.hash_ids(bad, 1000)
    assert hashing.hash_ids([2**64 - 1], 97).tolist() == hashing.hash_ids(np.array([2**64 - 1], np.uint64), 97).tolist()
