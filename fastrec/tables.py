"""Row-wise quantized embedding tables, byte-compatible with FBGEMM.

Layouts (one row; R rows stored back to back, ``row_stride`` bytes apart):

* ``"fbgemm"`` (FBGEMM's CPU layout, what ``torch.ops.quantized.embedding_bag_byte_prepack``,
  ``embedding_bag_4bit_prepack`` and ``embedding_bag_2bit_prepack`` produce):
  8-bit: ``D`` uint8 codes, then fp32 scale, fp32 bias (``D + 8`` bytes);
  4/2-bit: ``ceil(D*bits/8)`` bytes of codes (element j in byte ``j // (8/bits)``, lowest bits
  first), then fp16 scale, fp16 bias.
* ``"tbe"`` (fbgemm_gpu / TorchRec inference layout): fp16 scale, fp16 bias, then the codes;
  rows may be padded (pass ``dim``).

A value is ``scale * code + bias``.

A table's rows can live in GPU memory: :meth:`QuantizedTable.to_device` copies them there, and
:meth:`QuantizedTable.from_fbgemm` wraps a CUDA uint8 array (torch or CuPy) without a copy. Such a
table (a ``fastrec._cuda_embedding.DeviceQuantizedTable``, still a QuantizedTable) is pooled by
the CUDA kernels when the ids are on the same GPU.
"""

from __future__ import annotations

import numpy as np

from . import _C, _cuda
from ._arrays import as_numpy, cache_line_aligned, finite_float32

__all__ = ["QuantizedTable"]

_BITS = (8, 4, 2)
_HUGEPAGE_BYTES = 8 << 20  # tables at least this big are advised for transparent huge pages


def _code_bytes(bits: int, dim: int) -> int:
    per_byte = 8 // bits
    return (dim + per_byte - 1) // per_byte


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"bits must be an int (8, 4 or 2), got {type(bits).__name__} {bits!r}")
    if int(bits) not in _BITS:
        raise ValueError(f"bits must be 8, 4 or 2, got {bits!r}")
    return int(bits)


def _float_weight(weight) -> np.ndarray:
    w = as_numpy(weight)
    if w.dtype.kind != "f":
        raise TypeError(f"weight must be a floating-point array, got {w.dtype}")
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D (rows, dim), got shape {w.shape}")
    if w.shape[1] < 1:
        raise ValueError("weight must have dim >= 1")
    return finite_float32(w, "weight")


def _check_row_range(ok: np.ndarray, mn: np.ndarray, mx: np.ndarray, why: str) -> None:
    """ValueError naming the first row whose scale or bias cannot be stored (they came out inf,
    and the row dequantized to NaN)."""
    if not ok.all():
        r = int(np.argmin(ok))
        raise ValueError(f"row {r} of the table cannot be quantized: it spans [{float(mn[r]):.6g}, "
                         f"{float(mx[r]):.6g}] and {why}")


def _quantize_8bit(w: np.ndarray) -> np.ndarray:
    """FBGEMM's 8-bit row-wise quantization, in float32 arithmetic as FBGEMM does it."""
    R, D = w.shape
    out = np.empty((R, D + 8), dtype=np.uint8)
    if R == 0:
        return out
    mn = w.min(axis=1)
    mx = w.max(axis=1)
    with np.errstate(over="ignore"):
        rng = mx - mn
    _check_row_range(np.isfinite(rng), mn, mx, "its range max - min overflows float32 (the 8-bit scale)")
    scale = rng / np.float32(255.0)
    inv = np.float32(255.0) / (rng + np.float32(1e-8))
    q = np.rint((w - mn[:, None]) * inv[:, None])
    out[:, :D] = np.clip(q, 0, 255).astype(np.uint8)
    qp = np.stack([scale, mn], axis=1).astype(np.float32)
    out[:, D:] = qp.view(np.uint8)
    return out


def _quantize_nbit(w: np.ndarray, bits: int) -> np.ndarray:
    """FBGEMM's 4/2-bit row-wise quantization with fp16 scale and bias."""
    R, D = w.shape
    cb = _code_bytes(bits, D)
    out = np.zeros((R, cb + 4), dtype=np.uint8)
    if R == 0:
        return out
    qmax = (1 << bits) - 1
    wmin, mx = w.min(axis=1), w.max(axis=1)
    with np.errstate(over="ignore"):
        mn = wmin.astype(np.float16).astype(np.float32)  # bias is stored as fp16
        rng = mx - mn
        scale = np.where(rng == 0, np.float32(1.0), rng / np.float32(qmax)).astype(np.float32)
        scale = scale.astype(np.float16).astype(np.float32)
    _check_row_range(np.isfinite(mn) & np.isfinite(scale), wmin, mx,
                     f"its min or (max - min) / {qmax} is beyond float16's +-65504 (the {bits}-bit bias and scale)")
    with np.errstate(divide="ignore"):
        inv = np.float32(1.0) / scale
    bad = (scale == 0) | ~np.isfinite(inv)
    scale = np.where(bad, np.float32(1.0), scale)
    inv = np.where(bad, np.float32(1.0), inv).astype(np.float32)
    q = np.clip(np.rint((w - mn[:, None]) * inv[:, None]), 0, qmax).astype(np.uint8)
    per_byte = 8 // bits
    padded = np.zeros((R, cb * per_byte), dtype=np.uint8)
    padded[:, :D] = q
    padded = padded.reshape(R, cb, per_byte)
    codes = np.zeros((R, cb), dtype=np.uint8)
    for j in range(per_byte):
        codes |= padded[:, :, j] << np.uint8(j * bits)
    out[:, :cb] = codes
    out[:, cb:] = np.stack([scale, mn], axis=1).astype(np.float16).view(np.uint8)
    return out


def _refuse_reinit(table) -> None:
    """TypeError for a second __init__ on a (host or device) quantized table: the C++ side
    ignores it, so the call would seem to succeed and leave the table as it was (or, for a
    device table, its new rows read with the old row format)."""
    if _C._packed_table_initialised(table):
        raise TypeError(f"this {type(table).__name__} is already initialised; a table cannot be re-initialised "
                        "in place: build a new one (QuantizedTable(...), from_float, from_fbgemm or to_device)")


class QuantizedTable(_C.PackedTable):
    """An embedding table stored row-wise quantized (8, 4 or 2 bits per value).

    Build one with :meth:`from_float` or :meth:`from_fbgemm`; pass it to
    :func:`fastrec.ops.embedding_bag` / :func:`fastrec.ops.embedding_bags` like a float table.

    Attributes: ``bits``, ``num_rows``, ``dim``, ``layout`` ("fbgemm" or "tbe"), ``data`` (the
    packed uint8 rows, shared with the table, not copied), ``nbytes``.
    """

    def __init__(self, data, bits, dim, layout="fbgemm"):
        _refuse_reinit(self)
        data = np.asarray(data)
        if data.dtype != np.uint8:
            raise TypeError(f"packed table data must be uint8, got {data.dtype}")
        if data.ndim != 2:
            raise ValueError(f"packed table data must be 2-D (rows, bytes per row), got shape {data.shape}")
        data = np.ascontiguousarray(data)
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
            raise TypeError(f"dim must be an int, got {type(dim).__name__}")
        if not 1 <= dim < 2**63:  # (the rest, against the row size, in the C++ constructor)
            raise ValueError(f"dim must be in [1, 2**63), got {dim}")
        if not isinstance(layout, str):
            raise TypeError(f"layout must be a str, got {type(layout).__name__}")
        super().__init__(data, _check_bits(bits), int(dim), layout)
        if data.nbytes >= _HUGEPAGE_BYTES:
            _C.advise_hugepages(data)

    @classmethod
    def from_float(cls, weight, bits=8) -> "QuantizedTable":
        """Quantize a float table ``(R, D)`` row-wise, exactly as FBGEMM's prepack ops do.

        Raises TypeError for a non-float array, ValueError for a bad shape, NaN/Inf or bits.
        """
        bits = _check_bits(bits)
        w = _float_weight(weight)
        packed = _quantize_8bit(w) if bits == 8 else _quantize_nbit(w, bits)
        return cls(packed, bits, w.shape[1], "fbgemm")

    @classmethod
    def from_fbgemm(cls, packed, bits, *, layout="fbgemm", dim=None) -> "QuantizedTable":
        """Wrap packed rows (a uint8 array or CPU tensor, no copy when C-contiguous).

        ``layout="fbgemm"``: FBGEMM's CPU layout (codes, then scale and bias).
        ``layout="tbe"``: fbgemm_gpu / TorchRec inference layout (fp16 scale and bias, then codes;
        rows may be padded, in which case pass ``dim``).
        ``dim`` defaults to what the row width implies.
        A CUDA array (torch CUDA tensor or CuPy array) gives a table on that GPU, sharing its memory.
        """
        bits = _check_bits(bits)
        on_gpu = _cuda.is_device_array(packed)
        if on_gpu:
            from ._cuda_embedding import device_view

            packed = device_view(packed, "packed rows")
        else:
            packed = as_numpy(packed)
        if packed.dtype != np.uint8:
            raise TypeError(f"packed rows must be uint8, got {packed.dtype}")
        if len(packed.shape) != 2:
            raise ValueError(f"packed rows must be 2-D (rows, bytes per row), got shape {packed.shape}")
        if layout not in ("fbgemm", "tbe"):
            raise ValueError(f"layout must be 'fbgemm' or 'tbe', got {layout!r}")
        width = packed.shape[1]
        qbytes = 8 if (bits == 8 and layout == "fbgemm") else 4
        if dim is None:
            dim = (width - qbytes) * (8 // bits)
            if dim < 1:
                raise ValueError(f"packed rows of {width} bytes hold no values at {bits} bits")
        elif isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
            raise TypeError(f"dim must be an int, got {type(dim).__name__}")
        # dim against the row width: the C++ base constructor, for host and device tables alike.
        if on_gpu:
            from ._cuda_embedding import DeviceQuantizedTable

            return DeviceQuantizedTable(packed.obj, bits, int(dim), layout)
        return cls(packed, bits, int(dim), layout)

    def __reduce__(self):
        # Pickling (copy.deepcopy, multiprocessing, Ray) carries the packed rows (a device table's
        # rows stay a device array of its framework); host rows are re-aligned on arrival.
        return (_restore_table, (type(self), self.data, self.bits, self.dim, self.layout))

    def to_device(self, like="torch", device=None) -> "QuantizedTable":
        """A copy of this table with its rows in GPU memory, for the CUDA embedding ops.

        ``like``: ``"torch"`` or ``"cupy"`` (the framework that holds the rows), or a CUDA array
        whose framework and device to use. ``device``: a CUDA device index (default: ``like``'s
        device, else the framework's current device). Same bits, dim, layout and bytes.
        """
        from ._cuda_embedding import table_to_device

        return table_to_device(self, like, device)

    def to_host(self) -> "QuantizedTable":
        """This table with its rows in host memory (itself, for a host table)."""
        return self

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def _codes_and_qparams(self):
        """(codes as uint8 (R, D), scale float32 (R,), bias float32 (R,))."""
        R, D, bits = self.num_rows, self.dim, self.bits
        cb = _code_bytes(bits, D)
        raw = self.data
        if self.layout == "tbe":
            qp = np.ascontiguousarray(raw[:, 0:4]).view(np.float16).astype(np.float32)
            codes = raw[:, 4:4 + cb]
        else:
            if bits == 8:
                qp = np.ascontiguousarray(raw[:, cb:cb + 8]).view(np.float32)
            else:
                qp = np.ascontiguousarray(raw[:, cb:cb + 4]).view(np.float16).astype(np.float32)
            codes = raw[:, :cb]
        qp = qp.reshape(R, 2)
        if bits == 8:
            q = np.array(codes)
        else:
            per_byte = 8 // bits
            mask = np.uint8((1 << bits) - 1)
            parts = [(codes >> np.uint8(j * bits)) & mask for j in range(per_byte)]
            q = np.stack(parts, axis=2).reshape(R, cb * per_byte)[:, :D]
        return q, qp[:, 0].copy(), qp[:, 1].copy()

    def dequantize(self) -> np.ndarray:
        """The float32 table ``(R, D)`` these codes stand for (``scale * code + bias``)."""
        q, scale, bias = self._codes_and_qparams()
        return (q.astype(np.float32) * scale[:, None] + bias[:, None]).astype(np.float32)

    def to_fbgemm(self) -> np.ndarray:
        """A new uint8 array in FBGEMM's CPU layout, byte-for-byte what torch's prepack ops
        produce (and accept in ``embedding_bag_byte_rowwise_offsets`` and friends)."""
        D, bits = self.dim, self.bits
        cb = _code_bytes(bits, D)
        if self.layout == "fbgemm":
            need = cb + (8 if bits == 8 else 4)
            return np.array(self.data[:, :need])
        raw = self.data
        qp16 = np.ascontiguousarray(raw[:, 0:4])
        codes = raw[:, 4:4 + cb]
        if bits == 8:
            qp = qp16.view(np.float16).astype(np.float32).view(np.uint8)
        else:
            qp = qp16
        return np.ascontiguousarray(np.concatenate([codes, qp], axis=1))

    def __repr__(self) -> str:
        return (f"QuantizedTable(num_rows={self.num_rows}, dim={self.dim}, bits={self.bits}, "
                f"layout={self.layout!r}, nbytes={self.nbytes})")


def _restore_table(cls, data, bits: int, dim: int, layout: str) -> QuantizedTable:
    # Unpickled rows start wherever the allocator put them: start them on a cache line, as
    # model files do, which the gathers rely on for speed.
    return cls(cache_line_aligned(data), bits, dim, layout)
