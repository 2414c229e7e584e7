"""Interceptors the benchmark loads (``-i scripts/bench_interceptors.py:Unchanged``)."""

from __future__ import annotations

from tproxy import Interceptor


class Unchanged(Interceptor):
    """Sees every chunk both ways and returns it unchanged: the cost of watching a flow."""

    def client_data(self, data: bytes) -> bytes:
        return data

    def server_data(self, data: bytes) -> bytes:
        return data
