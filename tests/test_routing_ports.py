"""Port specifications: lists, ranges, merging, and one clear error for bad input."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tproxy.routing.ports import PortRange, PortSpecError, parse_ports


def test_single_list_and_range() -> None:
    assert parse_ports("80") == (PortRange(80, 80),)
    assert parse_ports("80,443,8000-8100") == (
        PortRange(80, 80),
        PortRange(443, 443),
        PortRange(8000, 8100),
    )


def test_sorted_merged_and_colon_ranges() -> None:
    assert parse_ports("443,80,81,82-90,85:95") == (PortRange(80, 95), PortRange(443, 443))
    assert parse_ports(["443", "80"]) == parse_ports("80,443")


def test_iptables_and_text_forms() -> None:
    assert PortRange(80, 80).iptables == "80"
    assert PortRange(8000, 8100).iptables == "8000:8100"
    assert str(PortRange(8000, 8100)) == "8000-8100"


@pytest.mark.parametrize("spec", ["", "0", "65536", "80,", "http", "90-80", "1-70000", "-5", "8 0"])
def test_bad_specs_raise(spec: str) -> None:
    with pytest.raises(PortSpecError):
        parse_ports(spec)


@given(st.lists(st.tuples(st.integers(1, 65535), st.integers(0, 50)), min_size=1, max_size=20))
def test_merge_keeps_exactly_the_same_ports(pairs: list[tuple[int, int]]) -> None:
    spec = ",".join(f"{a}-{min(a + n, 65535)}" for a, n in pairs)
    wanted = {p for a, n in pairs for p in range(a, min(a + n, 65535) + 1)}
    ranges = parse_ports(spec)
    got = {p for r in ranges for p in range(r.first, r.last + 1)}
    assert got == wanted
    assert all(b.first > a.last + 1 for a, b in itertools.pairwise(ranges))
