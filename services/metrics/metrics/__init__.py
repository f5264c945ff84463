"""Metrics service: the loyalty KPIs marketing steers on."""
