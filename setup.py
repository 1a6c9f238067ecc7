"""Build of the one compiled part: the native vocabulary-wide passes of teacher_logits
(`pipeline/capture/_passes.c`; everything else is in pyproject.toml).

Optional: where GCC is not found (the file uses its vector extensions) the install goes on
without it, `vocab_passes: auto` falls back to the torch passes on CPU, and
`vocab_passes: native` stops with the key to change.
-ffp-contract=off keeps the same bits on every target (no fused multiply-adds); see the file.
"""

from setuptools import Extension, setup

COMPILE_ARGS = ["-O3", "-std=gnu11", "-ffp-contract=off", "-Wno-psabi"]
"""Also the flags of the test's baseline-only build (tests/test_softlabels_kernel.py reads
them from here), so the bits it compares come from the same compilation."""

setup(
    ext_modules=[
        Extension(
            "pipeline.capture._passes",
            sources=["pipeline/capture/_passes.c"],
            extra_compile_args=COMPILE_ARGS,
            optional=True,
        )
    ]
)
