"""Fetching models: remote descriptions, safe HTTP, resumable verified downloads, pull jobs."""
