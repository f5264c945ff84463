"""Ledger service: the append-only, double-entry points ledger."""
