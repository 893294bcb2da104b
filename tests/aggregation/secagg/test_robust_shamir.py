"""Robust Shamir reconstruction: wrong shares are found, excluded and named; never a wrong
secret."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregation.secagg import shamir

PRIME = shamir.PRIME


def shift(share: bytes, delta: int) -> bytes:
    return ((int.from_bytes(share, "big") + delta) % PRIME).to_bytes(shamir.SHARE_SIZE, "big")


def lagrange_at_zero(holder: int, holders: list[int]) -> int:
    xi = shamir.share_x(holder)
    num = den = 1
    for other in holders:
        if other != holder:
            xj = shamir.share_x(other)
            num = num * xj % PRIME
            den = den * (xj - xi) % PRIME
    return num * pow(den, -1, PRIME) % PRIME


def test_bit_flipped_share_is_excluded_and_its_holder_named() -> None:
    secret = os.urandom(32)
    holders = list(range(100, 107))
    shares = shamir.split(secret, threshold=4, holders=holders)
    raw = bytearray(shares[103])
    raw[40] ^= 0x10
    shares[103] = bytes(raw)
    rebuilt = shamir.reconstruct(shares, threshold=4)
    assert rebuilt.secret == secret and rebuilt.culprits == (103,)


def test_share_forged_with_the_lagrange_coefficient_cannot_shift_the_secret() -> None:
    # A holder who knows which t shares the server interpolates can add delta / lambda_h to its
    # share, shifting the plain interpolation by exactly delta.
    secret = os.urandom(32)
    holders = [11, 22, 33, 44, 55]
    t = 3
    shares = shamir.split(secret, threshold=t, holders=holders)
    delta = 12345
    lam = lagrange_at_zero(22, holders[:t])
    forged = dict(shares)
    forged[22] = shift(shares[22], delta * pow(lam, -1, PRIME))
    shifted = (int.from_bytes(secret, "big") + delta).to_bytes(32, "big")
    assert shamir.combine(forged, threshold=t) == shifted  # the attack works on plain Lagrange
    rebuilt = shamir.reconstruct(forged, threshold=t)
    assert rebuilt.secret == secret and rebuilt.culprits == (22,)
    # With only t shares nothing shows the forgery; a commitment does.
    exactly_t = {h: forged[h] for h in holders[:t]}
    with pytest.raises(ValueError, match="not the expected secret"):
        shamir.reconstruct(exactly_t, threshold=t, matches=lambda s: s == secret)


@settings(max_examples=40, deadline=None)
@given(t=st.integers(1, 8), extra=st.integers(2, 8), data=st.data())
def test_berlekamp_welch_corrects_up_to_half_the_redundancy_without_a_verifier(
    t: int, extra: int, data: st.DataObject
) -> None:
    secret = os.urandom(32)
    holders = data.draw(
        st.lists(st.integers(0, 2**64 - 1), min_size=t + extra, max_size=t + extra, unique=True)
    )
    shares = shamir.split(secret, threshold=t, holders=holders)
    radius = extra // 2
    bad = data.draw(st.lists(st.sampled_from(holders), max_size=radius, unique=True))
    for holder in bad:
        shares[holder] = shift(shares[holder], data.draw(st.integers(1, PRIME - 1)))
    rebuilt = shamir.reconstruct(shares, threshold=t)
    assert rebuilt.secret == secret
    assert rebuilt.culprits == tuple(sorted(bad))


def test_a_verifier_extends_correction_to_all_but_t_shares() -> None:
    secret = os.urandom(32)
    holders = list(range(1, 9))
    shares = shamir.split(secret, threshold=3, holders=holders)
    for holder in (2, 4, 6, 8):  # 4 wrong of 8 with t = 3: beyond the radius 2
        shares[holder] = shift(shares[holder], holder)
    with pytest.raises(ValueError, match="cannot be determined uniquely"):
        shamir.reconstruct(shares, threshold=3)
    rebuilt = shamir.reconstruct(shares, threshold=3, matches=lambda s: s == secret)
    assert rebuilt.secret == secret and rebuilt.culprits == (2, 4, 6, 8)
    with pytest.raises(ValueError, match="cannot be determined uniquely"):
        shamir.reconstruct(shares, threshold=3, matches=lambda s: s == secret, max_subsets=10)


def test_malformed_shares_are_culprits_and_too_few_good_ones_are_an_error() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, threshold=2, holders=[1, 2, 3])
    shares[3] = (PRIME + 1).to_bytes(shamir.SHARE_SIZE, "big")  # not a field element
    rebuilt = shamir.reconstruct(shares, threshold=2)
    assert rebuilt.secret == secret and rebuilt.culprits == (3,)
    shares[2] = b"short"
    with pytest.raises(ValueError, match=r"Need 2 well-formed shares.*malformed: holders \[2, 3\]"):
        shamir.reconstruct(shares, threshold=2)
