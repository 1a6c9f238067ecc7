"""softlabels: offline soft-label precompute for multilingual knowledge distillation.

The import package is `pipeline`; the distribution and console script are `softlabels`.
"""

__version__ = "0.1.0"
