"""The logits store, the artifact teams share: sharded Zarr v3 with checksums and provenance.

`format` owns the layout and its writer/reader (create, write a shard, finalize, open, iterate);
`verify` owns the checks (integrity audit, consumer compatibility); `describe` the human and
machine summary behind `softlabels inspect`. Import each function from the module that owns it.
"""
