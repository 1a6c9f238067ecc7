"""Reading params.yaml: each way the file itself can be wrong is one ConfigError line naming it."""

from __future__ import annotations

import pytest

from pipeline.core.config import load_params
from pipeline.core.errors import ConfigError


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.yaml: params file not found \(pass --params"):
        load_params(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("text", "where"),
    [("a: [1, 2\nb: 3\n", "line 2, column 2: expected ',' or ']'"),
     ("tokenize:\n  seq_len: a: b\n", "line 2, column 13: mapping values are not allowed")],
)  # fmt: skip
def test_not_yaml_names_the_line(tmp_path, text, where):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_params(path)
    assert str(e.value).startswith(f"{path}: not valid YAML ({where}")
    assert "\n" not in str(e.value)


def test_not_utf8(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"tokenize:\n  seq_len: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"params.yaml: not UTF-8 text \(invalid start byte"):
        load_params(path)


def test_top_level_not_a_mapping(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"params.yaml: top level must be a mapping of sections"):
        load_params(path)
