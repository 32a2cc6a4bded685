"""Shared machinery of the daemon's features: the job runner and its handles, worker
processes and warm workers (``jobs``); how an API endpoint is declared, admitted and answered
(``api``), who may call it (``access``), the OpenAPI document built from the endpoints
(``openapi``), and the jobs' own endpoints (``routes``). Feature packages (fetch, quantize,
run, eval) build on it; nothing here knows what a job does."""
