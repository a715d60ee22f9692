"""factorization(dim, factor): the sd-scripts/LyCORIS table, non-divisor factors, and LyCORIS itself over a range."""

import pytest

from hadakron.ops import factorization

# Table from sd-scripts-loha-lokr.md section 2.1 (factor -1, 4, 8, 16).
TABLE = {
    127: [(1, 127), (1, 127), (1, 127), (1, 127)],
    128: [(8, 16), (4, 32), (8, 16), (8, 16)],
    320: [(16, 20), (4, 80), (8, 40), (16, 20)],
    512: [(16, 32), (4, 128), (8, 64), (16, 32)],
    640: [(20, 32), (4, 160), (8, 80), (16, 40)],
    768: [(24, 32), (4, 192), (8, 96), (16, 48)],
    1024: [(32, 32), (4, 256), (8, 128), (16, 64)],
    1280: [(32, 40), (4, 320), (8, 160), (16, 80)],
    2048: [(32, 64), (4, 512), (8, 256), (16, 128)],
    3072: [(48, 64), (4, 768), (8, 384), (16, 192)],
    5120: [(64, 80), (4, 1280), (8, 640), (16, 320)],
    8192: [(64, 128), (4, 2048), (8, 1024), (16, 512)],
    10240: [(80, 128), (4, 2560), (8, 1280), (16, 640)],
}


@pytest.mark.parametrize("dim", sorted(TABLE))
def test_reference_table(dim):
    for factor, expected in zip((-1, 4, 8, 16), TABLE[dim]):
        assert factorization(dim, factor) == expected, (dim, factor)


@pytest.mark.parametrize("dim,factor,expected", [(128, 3, (2, 64)), (320, 7, (5, 64)), (360, 16, (15, 24))])
def test_non_divisor_factor(dim, factor, expected):
    assert factorization(dim, factor) == expected


def test_balanced_search_by_hand():
    # 250 = 2*5^3: divisors 2, 5, 10 are accepted in turn (sums 127, 55, 35), 25 would make m > n.
    assert factorization(250, -1) == (10, 25)
    assert factorization(250, 4) == (2, 125)  # 4 does not divide 250: search stops before 5 > 4
    assert factorization(250, 8) == (5, 50)
    # 360: the search walks every divisor up to 18 (18*20); LyCORIS's docstring says (8, 45), its code gives this.
    assert factorization(360, -1) == (18, 20)


def test_pairs_multiply_out_and_are_ordered():
    for dim in range(1, 400):
        for factor in (-1, 0, 1, 2, 3, 5, 8, 16, 64):
            m, n = factorization(dim, factor)
            assert m * n == dim and m <= n


def test_matches_lycoris_over_a_range():
    lyco = pytest.importorskip("lycoris.functional.general").factorization
    for dim in list(range(1, 600)) + [640, 768, 1024, 1280, 2048, 3072, 4096, 5120, 8192, 10240, 1536, 2560]:
        for factor in (-1, 0, 1, 2, 3, 4, 7, 8, 12, 16, 32):
            assert factorization(dim, factor) == tuple(lyco(dim, factor)), (dim, factor)


def test_rejects_non_positive_dimension():
    with pytest.raises(ValueError):
        factorization(0)
