"""The trainer: a RetNet student distilled from teacher top-k targets (direct, cached, network)."""
