"""Running models: the backend contract, runner processes, the daemon's loaded models."""
