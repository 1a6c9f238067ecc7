"""Teacher capture, the `teacher_logits` stage: tokenized rows -> soft labels in a logits store.

`kernel` computes per-token soft labels without materialising (B, T, V) logits; `shards` runs
and writes whole shards (in-process or on a Dask worker); `dask_runner` spreads shards over a
Dask cluster; `teacher_logits` is the stage driver (checks, resume key, finalize, metrics).
"""
