"""A JPEG Lossless encoder, process 14 selection value 1 (transfer syntax 1.2.840.10008.1.2.4.70).

Why write one: it is what thin-slice head CTs from many scanners arrive in, pydicom 3 decodes it
(through pylibjpeg-libjpeg or GDCM) but ships no encoder for it, and neither does any package here.
The format is small (ITU T.81 Annex H): each sample is predicted from its left neighbour (the first
column from the sample above, the first sample from 2^(P-1)), the difference modulo 2^16 is coded
as a Huffman-coded magnitude category followed by that many raw bits.  Encoding is vectorised with
numpy (a 512 x 512 frame in tens of milliseconds); one optimal Huffman table per frame.
"""

from __future__ import annotations

import heapq

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLosslessSV1

__all__ = ["JPEGLosslessSV1", "compress_sv1", "encode_frame"]


def _code_lengths(freq: np.ndarray) -> np.ndarray:
    """Huffman code lengths (<= 16, no all-ones code word) for symbol frequencies (Annex K.2 spirit).

    A reserved symbol of frequency 1 keeps the all-ones code word unused; lengths over 16 cannot
    occur with at most 18 symbols of 32-bit counts in practice, but are folded back if they do.
    """
    syms = [int(s) for s in np.flatnonzero(freq)] + [-1]  # -1: reserved
    weights = [int(freq[s]) for s in syms[:-1]] + [1]
    if len(syms) == 2:  # one real symbol: give it a 1-bit code
        out = np.zeros(len(freq), np.int64)
        out[syms[0]] = 1
        return out
    heap = [(w, i, [i]) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    depth = [0] * len(syms)
    nxt = len(syms)
    while len(heap) > 1:
        w1, _, a = heapq.heappop(heap)
        w2, _, b = heapq.heappop(heap)
        for i in a + b:
            depth[i] += 1
        heapq.heappush(heap, (w1 + w2, nxt, a + b))
        nxt += 1
    out = np.zeros(len(freq), np.int64)
    for i, s in enumerate(syms[:-1]):
        out[s] = min(depth[i], 16)
    return out


def _canonical(lengths: np.ndarray) -> tuple[np.ndarray, bytes, bytes]:
    """Canonical codes (per symbol) and the DHT's BITS (16 counts) and HUFFVAL lists."""
    order = sorted((int(n), s) for s, n in enumerate(lengths) if n > 0)
    codes = np.zeros(len(lengths), np.int64)
    code, prev = 0, order[0][0]
    bits = [0] * 16
    for n, s in order:
        code <<= n - prev
        prev = n
        codes[s] = code
        bits[n - 1] += 1
        code += 1
    return codes, bytes(bits), bytes(s for _, s in order)


def encode_frame(frame: np.ndarray, precision: int) -> bytes:
    """One 2-D frame (uint16, or int16 read as its 16-bit pattern) as a JPEG Lossless SV1 stream."""
    img = np.ascontiguousarray(frame).view(np.uint16).astype(np.int64)
    rows, cols = img.shape
    pred = np.empty_like(img)
    pred[:, 1:] = img[:, :-1]
    pred[1:, 0] = img[:-1, 0]
    pred[0, 0] = 1 << (precision - 1)
    diff = (img - pred) & 0xFFFF
    diff = np.where(diff >= 0x8000, diff - 0x10000, diff).ravel()  # -32768..32767
    mag = np.abs(diff)
    cat = np.zeros(mag.shape, np.int64)
    nz = mag > 0
    cat[nz] = np.floor(np.log2(mag[nz])).astype(np.int64) + 1
    # Extra bits: the low ``cat`` bits of diff, or of diff - 1 when negative; none for category 16.
    extra = np.where(diff < 0, diff - 1, diff) & ((1 << cat) - 1)
    extra = np.where(cat == 16, 0, extra)
    n_extra = np.where(cat == 16, 0, cat)
    lengths = _code_lengths(np.bincount(cat, minlength=17))
    codes, bits, vals = _canonical(lengths)
    word = (codes[cat] << n_extra) | extra
    nbits = lengths[cat] + n_extra  # <= 32
    # Pack MSB first: each word (<= 32 bits) lands in a 64-bit window over two 32-bit chunks; words
    # never overlap, so summing the chunks (bincount, exact in float64 below 2^53) is OR-ing them.
    total = int(nbits.sum())
    pad = (-total) % 8
    if pad:
        word = np.append(word, (1 << pad) - 1)  # pad the last byte with ones
        nbits = np.append(nbits, pad)
    start = np.cumsum(nbits) - nbits
    chunk, off = start >> 5, start & 31
    window = word.astype(np.uint64) << (64 - off - nbits).astype(np.uint64)
    n_chunks = int((total + pad + 31) >> 5) + 1
    hi = np.bincount(chunk, weights=(window >> np.uint64(32)).astype(np.float64), minlength=n_chunks)
    low = (window & np.uint64(0xFFFFFFFF)).astype(np.float64)
    lo = np.bincount(chunk + 1, weights=low, minlength=n_chunks + 1)
    words32 = (hi + lo[:n_chunks]).astype(np.uint64).astype(">u4")
    data = np.frombuffer(words32.tobytes(), np.uint8)[: (total + pad) // 8]
    ff = np.flatnonzero(data == 0xFF)
    if ff.size:  # byte stuffing: every 0xFF in entropy-coded data is followed by 0x00
        data = np.insert(data, ff + 1, 0)

    def seg(marker: int, body: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body

    sof3 = bytes([precision]) + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    dht = bytes([0x00]) + bits + vals  # class 0 (DC/lossless), table 0
    sos = bytes([1, 1, 0x00, 1, 0, 0])  # 1 component, table 0; Ss = predictor 1, Se = 0, Ah/Al = 0
    return b"\xff\xd8" + seg(0xC3, sof3) + seg(0xC4, dht) + seg(0xDA, sos) + data.tobytes() + b"\xff\xd9"


def compress_sv1(ds: Dataset) -> None:
    """Replace ``ds.PixelData`` (native, one frame or several) by its JPEG Lossless SV1 encapsulation."""
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    dtype = "<i2" if int(ds.PixelRepresentation) else "<u2"
    arr = np.frombuffer(ds.PixelData, dtype=dtype).reshape(frames, int(ds.Rows), int(ds.Columns))
    precision = int(ds.BitsStored)
    ds.PixelData = encapsulate([encode_frame(f, precision) for f in arr])
    ds["PixelData"].is_undefined_length = True
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.LossyImageCompression = "00"
