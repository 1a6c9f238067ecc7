"""Text in, token rows out: the `tokenize` stage and the contract of its output.

`corpus` reads raw multilingual text (txt folders, jsonl, parquet) with counted skip reasons;
`packing` cuts token streams into fixed-length rows; `tokenize` is the stage; `tokenized` owns the
tokenized DatasetDict contract (its one reader, its errors, its fingerprints) that every later
stage opens through.
"""
