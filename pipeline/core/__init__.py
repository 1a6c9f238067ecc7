"""Shared plumbing every stage uses; owns no artifact.

`errors` (the exceptions a user can fix), `config` (typed params sections), `stage_cli` (argv,
`--help` from the configs, one-line error exits), `atomic` (all-or-nothing output folders),
`allocator` (the CPU allocator setting for torch stages), `device` (device and dtype choice),
`curves` (dvclive training curves that survive a resume), `provenance` (fingerprints of models,
tokenizers and token ids, JSON records).
"""
