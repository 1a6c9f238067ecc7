"""The `compress` stage (`compress`: magnitude pruning, int8 weights, zstd) and the compressed
model format with its loader (`compressed`), which evaluate and other consumers call."""
