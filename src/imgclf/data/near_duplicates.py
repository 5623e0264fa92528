"""Near-duplicate search across splits: perceptual hashes, an exact candidate search, and a
pixel comparison that confirms a candidate before it is called leakage."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

NEAR_DUPLICATE_BITS = 4
THUMB_SIDE = 64
# Detail correlation (below) above which a hash candidate is confirmed as a copy. Measured by
# benchmarks/leakage.py on real images: resized, re-encoded, greyscale and recoloured copies
# of caltech101, fridgeObjects and magnetic_tiles images score 0.978 or more in 95% of cases
# (median 0.999); hash candidates between different magnetic-tile images (smooth machined
# texture: dHashes 0-4 bits apart) score 0.67 at the median.
CONFIRM_CORRELATION = 0.95


def perceptual_hash(path: str | os.PathLike) -> int | None:
    """64-bit difference hash (dHash) of an image, or None when it has no structure to compare.

    The image is shrunk to a 9x8 grayscale thumbnail (JPEGs decode directly at reduced scale, so
    this costs about a millisecond); each bit says whether a pixel is brighter than its left
    neighbour. Resizing, re-encoding and small colour changes keep most bits; different photos
    differ in about half of them. A flat thumbnail (a blank image) hashes to None, since any two
    blank images would otherwise match whatever their colour.
    """
    with Image.open(path) as img:
        img.draft("L", (36, 32))
        return image_hash(img)


def image_hash(img: Image.Image) -> int | None:
    """`perceptual_hash` of an image already decoded (the decode cache's single pass).

    The picture is first reduced by a whole factor to about 36 x 32 (what JPEG's draft decoding
    gives `perceptual_hash`), so a 12 MP photo is not converted and filtered at full size.
    """
    if img.mode not in ("L", "RGB"):
        img = img.convert("L")  # reduce() does not take every mode (palette, 16-bit)
    factor = max(1, min(img.size[0] // 36, img.size[1] // 32))
    if factor > 1:
        img = img.reduce(factor)
    thumb = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    if int(thumb.max()) - int(thumb.min()) <= 2:
        return None
    bits = (thumb[:, 1:] > thumb[:, :-1]).ravel()
    return int(np.packbits(bits).view(">u8")[0])


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def bit_counts(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    x = np.asarray(x, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(x).astype(np.int64)
    return _POPCOUNT[x.view(np.uint8)].reshape(*x.shape, 8).sum(-1, dtype=np.int64)


def hamming_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit differences [len(a), len(b)] between two arrays of 64-bit hashes (all pairs)."""
    return bit_counts(np.asarray(a, dtype=np.uint64)[:, None] ^ np.asarray(b, dtype=np.uint64)[None, :])


def _flips(width: int, within: int) -> np.ndarray:
    """Every `width`-bit mask with at most `within` bits set (0 first)."""
    from itertools import combinations

    masks = [sum(1 << b for b in bits) for k in range(within + 1)
             for bits in combinations(range(width), k)]
    return np.array(masks, dtype=np.uint64)


# What a candidate pair costs against one probe of the sorted bands (pairs are concatenated,
# sorted for unique, XORed and counted; measured roughly on the 100k scale set), and the
# clustering of real hashes (crops of one photo share bands far more often than chance).
PAIR_COST = 8


def choose_bands(n_a: int, n_b: int, max_bits: int = NEAR_DUPLICATE_BITS) -> int:
    """Bands for `near_pairs`: the count with the least expected work for these sizes.

    With m bands, a pair within max_bits bits agrees within max_bits // m bits on some band,
    so each hash of b probes P_m keys per band and meets about n_a * P_m / 2**(64 / m)
    unrelated hashes of a by chance. m = max_bits + 1 (exact bands of 13 bits at 4 bits)
    probes least but its chance meetings grow as n_a * n_b (quadratic); fewer, wider bands
    probe more keys but meet almost nothing by chance, so the work stays about linear in n_b.
    """
    from math import comb

    best, best_cost = max_bits + 1, float("inf")
    for m in range(1, max_bits + 2):
        width = -(-64 // m)
        t = max_bits // m
        probes = m * sum(comb(width, k) for k in range(t + 1))
        cost = n_b * probes * (1 + PAIR_COST * n_a / 2.0**(64 // m))
        if cost < best_cost:
            best, best_cost = m, cost
    return best


def near_pairs(a: np.ndarray, b: np.ndarray, max_bits: int = NEAR_DUPLICATE_BITS,
               chunk: int = 4096, bands: int | None = None,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (i, j) with hashes a[i], b[j] at most `max_bits` bits apart, and the distance.

    Multi-index hashing: the 64 bits are cut into m bands, and two hashes that differ in at
    most max_bits bits differ in at most max_bits // m bits on at least one band (pigeonhole),
    so looking up each band of b, and its variants with up to that many bits flipped, among
    the sorted bands of a finds every such pair, exactly as comparing all pairs would, while
    comparing only pairs that meet on a band. m = max_bits + 1 needs exact matches only, but
    its 13-bit bands (at 4 bits) let unrelated hashes meet at a rate that makes the work grow
    as len(a) * len(b); `choose_bands` takes wider bands for large sets (3 bands of 21-22 bits,
    one flip each, for 100k images), which keeps it about linear.

    Args:
        a: Hashes (uint64) searched.
        b: Hashes looked up, `chunk` at a time.
        max_bits: Largest distance reported.
        chunk: Hashes of b per step (bounds memory).
        bands: m (None: `choose_bands`); any value from 1 to max_bits + 1 gives the same pairs.

    Returns:
        (i, j, distance) arrays, sorted by i then j.
    """
    a = np.asarray(a, dtype=np.uint64)
    b = np.asarray(b, dtype=np.uint64)
    empty = np.zeros(0, dtype=np.int64)
    if not len(a) or not len(b):
        return empty, empty, empty
    m = choose_bands(len(a), len(b), max_bits) if bands is None else int(bands)
    if not 1 <= m <= max_bits + 1:
        raise ValueError(f"bands must be between 1 and {max_bits + 1}, not {m}")
    edges = np.linspace(0, 64, m + 1).astype(int)
    table = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        width = int(hi - lo)
        mask = np.uint64((1 << width) - 1) if width < 64 else np.uint64(2**64 - 1)
        keys = (a >> np.uint64(lo)) & mask
        order = np.argsort(keys, kind="stable")
        table.append((np.uint64(lo), mask, keys[order], order, _flips(width, max_bits // m)))
    found_i, found_j, found_d = [], [], []
    for start in range(0, len(b), chunk):
        part = b[start:start + chunk]
        pairs = []
        for lo, mask, sorted_keys, order, flips in table:
            keys = (((part >> lo) & mask)[:, None] ^ flips[None, :]).ravel()
            left = np.searchsorted(sorted_keys, keys, "left")
            counts = np.searchsorted(sorted_keys, keys, "right") - left
            total = int(counts.sum())
            if not total:
                continue
            j = np.repeat(np.arange(len(keys)) // len(flips), counts)
            within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
            i = order[np.repeat(left, counts) + within]
            pairs.append(i.astype(np.int64) * len(part) + j)
        if not pairs:
            continue
        keys = np.unique(np.concatenate(pairs))
        i, j = keys // len(part), keys % len(part)
        d = bit_counts(a[i] ^ part[j])
        keep = d <= max_bits
        found_i.append(i[keep])
        found_j.append(j[keep] + start)
        found_d.append(d[keep])
    if not found_i:
        return empty, empty, empty
    i, j, d = np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)
    order = np.lexsort((j, i))
    return i[order], j[order], d[order]


def detail(path: str | os.PathLike, side: int = THUMB_SIDE) -> np.ndarray:
    """The image's fine structure: a side x side grey thumbnail minus its local mean (a box
    blur), standardised (zero mean, unit variance) as float32.

    Lighting and broad texture are taken out, since they are what different photos of one kind
    of surface share; edges, marks and defects are what a copy keeps and another photo lacks.
    """
    from PIL import ImageFilter

    with Image.open(path) as img:
        img.draft("L", (side * 2, side * 2))
        grey = img.convert("L").resize((side, side), Image.Resampling.BILINEAR)
    t = np.asarray(grey, dtype=np.float32) - np.asarray(grey.filter(ImageFilter.BoxBlur(4)),
                                                         dtype=np.float32)
    t -= t.mean()
    return t / (t.std() + 1e-6)


def pixel_similarity(a: str | os.PathLike, b: str | os.PathLike, detail_of=None) -> float:
    """Correlation of two images' fine structure: near 1 for copies, lower for other photos.

    `detail_of` stands in for `detail` (e.g. a cached one, when an image is in many pairs).
    """
    detail_of = detail_of or detail
    return float((detail_of(a) * detail_of(b)).mean())
