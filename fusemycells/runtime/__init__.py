"""Run-time policy: time budget and degradation (budget, deadline), devices and CUDA, precision,
memory (allocator), progress, timing, stopping and fault injection."""
