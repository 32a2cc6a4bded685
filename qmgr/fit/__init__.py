"""Fitting variants to this machine: hardware snapshot, memory estimate, quality ladder, policy."""
