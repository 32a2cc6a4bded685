"""Quantizing: the quantizer contract, the worker process, the quantize job."""
