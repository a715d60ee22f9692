"""`factorization(dim, factor)`: the (m, n) split of a dimension used by LoKr (same pairs as sd-scripts / LyCORIS)."""

from __future__ import annotations


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """Split `dim` into (m, n), m <= n, m * n == dim.

    A positive `factor` that divides `dim` gives (factor, dim // factor) ordered; otherwise the most balanced
    divisor pair is searched upwards from (1, dim), stopping before a divisor larger than `factor` (no limit when
    factor < 0; factor 0 gives (1, dim)) or a pair whose sum exceeds 1 + dim.
    """
    dim = int(dim)
    factor = int(factor)
    if dim < 1:
        raise ValueError(f"factorization needs a positive dimension, found {dim}")
    if factor > 0 and dim % factor == 0:
        m, n = factor, dim // factor
        return (m, n) if m <= n else (n, m)
    limit = dim if factor < 0 else factor
    m, n = 1, dim
    bound = 1 + dim
    while m < n:
        new_m = m + 1
        while dim % new_m:
            new_m += 1
        new_n = dim // new_m
        if new_m + new_n > bound or new_m > limit:
            break
        m, n = new_m, new_n
    return (m, n) if m <= n else (n, m)
