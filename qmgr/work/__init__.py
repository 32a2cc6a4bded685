"""Shared machinery for long work: the job runner and its handles, worker processes, warm
workers. Feature packages (fetch, quantize, run, eval) submit their jobs here; nothing here
knows what a job does."""
