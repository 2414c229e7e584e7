"""Interception routing: a pure plan, and backends that apply and revert it."""
