"""Every config dataclass default equals the value params.yaml gives the same key.

So a stage run without params.yaml, a library call with a default config, `--help` and the docs
all describe the default pipeline. Add a row to CONFIGS for each new params section with a
config dataclass; a section params.yaml does not have is skipped.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from pipeline.capture.teacher_logits import TeacherLogitsConfig
from pipeline.classify.corpus import ClassifyCorpusConfig
from pipeline.classify.evaluate import ClassifyEvaluateConfig
from pipeline.classify.logits import ClassifyLogitsConfig
from pipeline.classify.student import ClassifyStudentConfig
from pipeline.classify.teacher import ClassifyTeacherConfig
from pipeline.compress.compress import CompressConfig
from pipeline.core.config import from_params, load_params
from pipeline.data.corpus import CorpusConfig
from pipeline.data.tokenize import TokenizeConfig
from pipeline.evaluate.evaluate import EvaluateConfig
from pipeline.student.train_student import TrainStudentConfig
from pipeline.teacher.prepare_teacher import TeacherConfig

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"

CONFIGS: list[tuple[str, type]] = [
    ("corpus", CorpusConfig),
    ("teacher", TeacherConfig),
    ("tokenize", TokenizeConfig),
    ("teacher_logits", TeacherLogitsConfig),
    ("train_student", TrainStudentConfig),
    ("compress", CompressConfig),
    ("evaluate", EvaluateConfig),
    ("classify_corpus", ClassifyCorpusConfig),
    ("classify_teacher", ClassifyTeacherConfig),
    ("classify_logits", ClassifyLogitsConfig),
    ("classify_student", ClassifyStudentConfig),
    ("classify_compress", CompressConfig),
    ("classify_evaluate", ClassifyEvaluateConfig),
]
"""(params.yaml section, its config dataclass). Extend for new sections."""


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def differences(cls: type, section: dict[str, Any], built: Any, prefix: str) -> list[str]:
    """`prefix.key: params.yaml X, default Y` for each key of `section` whose value (as the
    config reads it) is not the dataclass default; nested sections are compared key by key."""
    out = []
    for f in dataclasses.fields(cls):
        default = _default(f)
        if f.name not in section:
            out.append(f"{prefix}.{f.name}: missing from params.yaml (default {default!r})")
            continue
        if default is dataclasses.MISSING:
            continue
        value = getattr(built, f.name)
        if dataclasses.is_dataclass(default):
            out += differences(type(default), section[f.name] or {}, value, f"{prefix}.{f.name}")
        elif value != default:
            out.append(f"{prefix}.{f.name}: params.yaml {value!r}, default {default!r}")
    return out


@pytest.mark.parametrize(("section", "cls"), CONFIGS, ids=[s for s, _ in CONFIGS])
def test_dataclass_defaults_equal_params_yaml(section, cls):
    params = load_params(PARAMS)
    if section not in params:
        pytest.skip(f"params.yaml has no section '{section}'")
    built = from_params(cls, params, section)  # also refuses unknown keys and wrong types
    assert differences(cls, params[section] or {}, built, section) == []
