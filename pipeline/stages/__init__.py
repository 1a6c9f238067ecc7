"""The DVC stages' entry points: one module per stage, each a thin `main(argv) -> int` over the
library (parse argv paths and params sections, make one call into `pipeline/`).

Run one as `python -m pipeline.stages.<name>` (what dvc.yaml does) or, where the package is
installed, as `softlabels <name-with-dashes>` (e.g. `softlabels train-student --help`). The
package imports nothing, so that listing the stages (`softlabels --help`) stays instant.
"""
