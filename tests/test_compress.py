"""The compress stage and the compressed-model format: parity, sizes, switches, fresh-process load,
determinism and refusals. Tiny Llama students built from configs, saved to tmp_path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.compress.compress import CompressConfig, PruneConfig, block_linears, run_compress
from pipeline.compress.compressed import (
    MANIFEST,
    dequantize_rows,
    load_compressed,
    parameter_counts,
    quantize_rows,
    read_manifest,
)
from pipeline.core.config import from_params
from pipeline.core.errors import ConfigError, InputError
from tests.classify_fixtures import make_classifier
from tests.conftest import stage_module

REPO = Path(__file__).resolve().parents[1]
V = 300


def save_student(out: Path, tokenizer, *, tie: bool = True, hidden: int = 32, seed: int = 0):
    """A tiny random Llama student + tokenizer in save_pretrained layout; returns the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "softlabels.json").write_text('{"source": "test"}\n')
    return model


def reference_model(student_dir: Path, cfg: CompressConfig):
    """An independent reference: load the student, prune each block linear with torch's own
    l1_unstructured, and replace weights by per-row int8 round-trips where quantized."""
    from torch.nn.utils import prune
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    linears = [
        m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
    ]
    with torch.no_grad():
        for m in linears:
            if cfg.prune.enabled and cfg.prune.amount > 0:
                prune.l1_unstructured(m, "weight", amount=cfg.prune.amount)
                prune.remove(m, "weight")
            if cfg.quantize:
                m.weight.copy_(dequantize_rows(*quantize_rows(m.weight)))
        if cfg.quantize_embeddings:
            emb = model.model.embed_tokens
            emb.weight.copy_(dequantize_rows(*quantize_rows(emb.weight)))
            if model.lm_head.weight is not emb.weight:
                model.lm_head.weight.copy_(dequantize_rows(*quantize_rows(model.lm_head.weight)))
    return model


@pytest.fixture(scope="module")
def student_dirs(tmp_path_factory, tiny_tokenizer) -> dict[bool, Path]:
    """{tied: folder} for a tied and an untied tiny student."""
    root = tmp_path_factory.mktemp("students")
    out = {}
    for tie in (True, False):
        out[tie] = root / f"student-tied-{tie}"
        save_student(out[tie], tiny_tokenizer, tie=tie)
    return out


def _ids(n: int = 2, length: int = 12, vocab: int = V) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(1))


def test_quantize_rows_round_trip_and_zeros():
    torch.manual_seed(0)
    w = torch.randn(6, 40)
    w[1] = 0.0  # an all-zero row (fully pruned)
    w[2, :10] = 0.0
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (6,)
    assert int(q.abs().max()) <= 127 and scale[1] == 1.0 and (q[1] == 0).all()
    assert (q[2, :10] == 0).all()  # pruned zeros stay exactly zero
    err = (dequantize_rows(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()  # round-to-nearest: at most half a step
    assert torch.equal(q[0].abs().max(), torch.tensor(127, dtype=torch.int8))


@pytest.mark.parametrize("tie", [True, False])
def test_compressed_parity_with_reference(tmp_path, student_dirs, tie):
    cfg = CompressConfig()
    out = tmp_path / "c"
    metrics = run_compress(cfg, student=student_dirs[tie], out=out, metrics=tmp_path / "m.json")
    ref = reference_model(student_dirs[tie], cfg)
    x = _ids()
    with torch.no_grad():
        expected = ref(input_ids=x).logits
        deq = load_compressed(out, int8_kernel="dequantize")(input_ids=x).logits
        dyn = load_compressed(out, int8_kernel="dynamic")(input_ids=x).logits
    torch.testing.assert_close(deq, expected, atol=1e-5, rtol=1e-5)
    # dynamic int8 also rounds activations: close, not equal
    assert float((dyn - expected).abs().max()) < 0.05 * float(expected.abs().max()) + 0.05
    assert metrics["weights_bytes_after"] < metrics["weights_bytes_before"] / 3
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["head"]["tied"] is tie
    kinds = sorted(e["kind"] for e in manifest["quantized"])
    n_block = 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert kinds.count("linear") == n_block + (0 if tie else 1)
    assert kinds.count("embedding") == 1
    for name, frac in manifest["sparsity"].items():
        assert frac == pytest.approx(0.3, abs=0.01), name
    assert metrics["nonzero_parameters"] < metrics["parameters"]
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json", "softlabels.json"):
        assert (out / f).is_file()
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize(
    "cfg",
    [
        CompressConfig(quantize_embeddings=False),
        CompressConfig(quantize=False),
        CompressConfig(prune=PruneConfig(enabled=False)),
        CompressConfig(prune=PruneConfig(amount=0.6), zstd_level=0),
    ],
    ids=["float-embeddings", "prune+embeddings-only", "no-prune", "prune0.6-no-zstd"],
)
def test_switches(tmp_path, student_dirs, cfg):
    out = tmp_path / "c"
    run_compress(cfg, student=student_dirs[True], out=out, metrics=tmp_path / "m.json")
    x = _ids()
    with torch.no_grad():
        expected = reference_model(student_dirs[True], cfg)(input_ids=x).logits
        got = load_compressed(out, int8_kernel="dequantize")(input_ids=x).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    manifest = json.loads((out / MANIFEST).read_text())
    names = {e["name"] for e in manifest["quantized"]}
    assert ("model.embed_tokens" in names) == cfg.quantize_embeddings
    assert ("model.layers.0.mlp.up_proj" in names) == cfg.quantize
    assert bool(manifest["sparsity"]) == cfg.prune.enabled
    assert manifest["weights"]["file"].endswith(".zst") == (cfg.zstd_level > 0)
    # counts as stored: what a dequantized load holds
    loaded = parameter_counts(load_compressed(out, int8_kernel="dequantize"))
    assert (manifest["parameters"], manifest["nonzero_parameters"]) == loaded


def test_nothing_enabled_is_lossless(tmp_path, student_dirs):
    cfg = CompressConfig(quantize=False, quantize_embeddings=False, prune=PruneConfig(False))
    out = tmp_path / "c"
    run_compress(cfg, student=student_dirs[False], out=out, metrics=tmp_path / "m.json")
    from transformers import AutoModelForCausalLM

    src = AutoModelForCausalLM.from_pretrained(student_dirs[False], dtype=torch.float32)
    got = load_compressed(out, int8_kernel="dynamic")
    for key, value in src.state_dict().items():
        assert torch.equal(got.state_dict()[key], value), key


def test_pruning_only_touches_block_linears(tmp_path, student_dirs):
    cfg = CompressConfig(quantize=False, quantize_embeddings=False, zstd_level=3)
    out = tmp_path / "c"
    run_compress(cfg, student=student_dirs[False], out=out, metrics=tmp_path / "m.json")
    model = load_compressed(out, int8_kernel="dequantize")
    for name in block_linears(model, "lm_head"):
        w = model.get_submodule(name).weight
        assert float((w == 0).float().mean()) == pytest.approx(0.3, abs=0.01)
    assert int((model.lm_head.weight == 0).sum()) == 0
    assert int((model.model.embed_tokens.weight == 0).sum()) == 0


@pytest.mark.slow  # two fresh interpreters importing torch + transformers: ~10-20 s
def test_fresh_process_loads_and_runs_on_cpu(tmp_path, student_dirs):
    out = tmp_path / "c"
    run_compress(CompressConfig(), student=student_dirs[True], out=out, metrics=tmp_path / "m.json")
    x = _ids()
    kernels = ("dynamic", "dequantize")
    code = (
        "import json, sys, torch\n"
        "from pipeline.compress.compressed import load_compressed\n"
        "x = torch.tensor(json.loads(sys.argv[2]))\n"
        "for kernel in sys.argv[3:]:\n"
        "    m = load_compressed(sys.argv[1], int8_kernel=kernel)\n"
        "    with torch.no_grad():\n"
        "        print(json.dumps(m(input_ids=x).logits.tolist()))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(out), json.dumps(x.tolist()), *kernels],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"},
    )
    lines = proc.stdout.strip().splitlines()[-len(kernels) :]
    for kernel, line in zip(kernels, lines, strict=True):
        child = torch.tensor(json.loads(line))
        with torch.no_grad():
            here = load_compressed(out, int8_kernel=kernel)(input_ids=x).logits
        torch.testing.assert_close(child, here, atol=1e-5, rtol=1e-5)


def test_output_bytes_are_deterministic(tmp_path, student_dirs):
    files = []
    for run in ("a", "b"):
        out = tmp_path / run
        run_compress(
            CompressConfig(), student=student_dirs[True], out=out, metrics=tmp_path / f"{run}.json"
        )
        files.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert files[0] == files[1]


def test_missing_student_is_refused(tmp_path):
    with pytest.raises(InputError) as e:
        run_compress(
            CompressConfig(), student=tmp_path / "nope", out=tmp_path / "c", metrics=tmp_path / "m"
        )
    assert str(e.value) == (
        f"{tmp_path / 'nope'}: no such student folder (train it first: `dvc repro train_student`, "
        "or `dvc repro classify_student@kd` for the classifier)"
    )
    assert not (tmp_path / "c").exists()


def test_corrupt_weights_are_refused(tmp_path, student_dirs):
    out = tmp_path / "c"
    run_compress(CompressConfig(), student=student_dirs[True], out=out, metrics=tmp_path / "m.json")
    wfile = out / "weights.safetensors.zst"
    raw = bytearray(wfile.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    wfile.write_bytes(bytes(raw))
    with pytest.raises(InputError) as e:
        load_compressed(out)
    assert str(e.value) == (
        f"{wfile}: sha256 differs from compression.json's; the file is corrupt or from another "
        "run (re-run the compress stage, or `dvc checkout` it)"
    )


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory, student_dirs) -> Path:
    out = tmp_path_factory.mktemp("compressed") / "c"
    run_compress(CompressConfig(), student=student_dirs[True], out=out, metrics=out.parent / "m")
    return out


def _with_manifest(tmp_path: Path, compressed_dir: Path, edit) -> Path:
    """A copy of `compressed_dir` whose manifest `edit(manifest)` changed in place, or replaced
    by the text `edit` returns."""
    import shutil

    out = tmp_path / "c"
    shutil.copytree(compressed_dir, out)
    manifest = json.loads((out / MANIFEST).read_text())
    edited = edit(manifest)
    text = edited if isinstance(edited, str) else json.dumps(manifest)
    (out / MANIFEST).write_text(text)
    return out


@pytest.mark.parametrize("name", ["../../etc/x", "/etc/passwd", "sub/../../x", ".", ""])
def test_a_weights_file_outside_the_folder_is_refused(tmp_path, compressed_dir, name):
    out = _with_manifest(tmp_path, compressed_dir, lambda m: m["weights"].update(file=name))
    with pytest.raises(InputError) as e:
        load_compressed(out)
    assert str(e.value) == (
        f"{out / MANIFEST}: weights file '{name}' is outside the model folder; the manifest is "
        "corrupt: re-run the compress stage"
    )


def test_a_weights_file_linked_outside_the_folder_is_refused(tmp_path, compressed_dir):
    (tmp_path / "elsewhere").write_bytes(b"x")
    out = _with_manifest(tmp_path, compressed_dir, lambda m: m["weights"].update(file="w.bin"))
    (out / "w.bin").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(InputError) as e:
        read_manifest(out)
    assert "weights file 'w.bin' is outside the model folder" in str(e.value)


@pytest.mark.parametrize(
    "edit,problem",
    [
        (
            lambda m: '{"format": "softlabels-int8", ',
            "not valid JSON (Expecting property name "
            "enclosed in double quotes at line 1 column 31)",
        ),
        (lambda m: "[1, 2]", "holds a JSON list, not an object"),
        (lambda m: m.pop("weights"), "key weights is missing"),
        (lambda m: m["weights"].pop("sha256") and None, "key weights.sha256 is missing"),
        (lambda m: m["head"].update(tied="yes"), "head.tied is of type str, expected bool"),
        (lambda m: m.update(parameters=None), "parameters is of type NoneType, expected int"),
        (
            lambda m: m.update(quantized=[{"name": 3}]),
            "quantized[0] is not a {name, kind: linear|embedding} entry",
        ),
    ],
)
def test_a_malformed_manifest_is_one_input_error(tmp_path, compressed_dir, edit, problem):
    out = _with_manifest(tmp_path, compressed_dir, edit)
    with pytest.raises(InputError) as e:
        load_compressed(out)
    assert str(e.value) == (
        f"{out / MANIFEST}: {problem}; the manifest is corrupt: re-run the compress stage"
    )


def test_a_manifest_naming_a_module_the_model_lacks_is_refused(tmp_path, compressed_dir):
    def edit(m):
        m["quantized"][0]["name"] = "model.layers.7.mlp.\x1b[31m"

    out = _with_manifest(tmp_path, compressed_dir, edit)
    with pytest.raises(InputError) as e:
        load_compressed(out)
    assert str(e.value) == (
        f"{out / MANIFEST}: module 'model.layers.7.mlp.\\x1b[31m' is not a layer with a weight "
        "matrix in the model of config.json; the manifest is corrupt: re-run the compress stage"
    )


def test_not_a_compressed_folder(student_dirs):
    with pytest.raises(InputError) as e:
        load_compressed(student_dirs[True])
    assert str(e.value) == (
        f"{student_dirs[True]}: no compression.json; not a compressed model folder "
        "(run `dvc repro compress`)"
    )


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"prune": {"amount": 1.0}}, "compress.prune.amount: must be in [0, 1), got 1.0"),
        (
            {"zstd_level": 23},
            "compress.zstd_level: must be in [0, 22] (0: no entropy coding), got 23",
        ),
        ({"quantise": True}, None),
    ],
)
def test_config_errors(section, message):
    with pytest.raises(ConfigError) as e:
        from_params(CompressConfig, {"compress": section}, "compress")
    if message:
        assert str(e.value) == message
    else:
        assert "did you mean 'compress.quantize'?" in str(e.value)


def test_params_yaml_section_and_help():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert from_params(CompressConfig, params, "compress") == CompressConfig()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.compress", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "compress.prune.amount [default: 0.3]" in proc.stdout


@pytest.mark.slow  # two fresh interpreters importing torch + transformers: ~10-15 s
def test_stage_script(tmp_path, student_dirs, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"compress": {"prune": {"amount": 0.5}}}))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.stages.compress",
            "--params",
            str(params),
            "--student",
            str(student_dirs[True]),
            "--out",
            str(tmp_path / "c"),
            "--metrics",
            str(tmp_path / "m.json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["block_sparsity"] == pytest.approx(0.5, abs=0.01)
    argv = ["--params", str(params), "--student", str(tmp_path / "missing")]
    argv += ["--out", str(tmp_path / "c2"), "--metrics", str(tmp_path / "m2.json")]
    assert stage_module("compress").main(argv) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'missing'}: no such student folder (train it first: "
        "`dvc repro train_student`, or `dvc repro classify_student@kd` for the classifier)"
    )


# --- sequence classifiers (stage classify_compress) ------------------------------------------

LABELS = ["science", "travel", "politics", "sports", "health", "entertainment", "geography"]


def classifier_reference(folder: Path, cfg: CompressConfig, heads: list[str]):
    """Independent reference for a classifier: prune and int8-round-trip every linear outside
    `heads`; the embedding and the head linears round-tripped when quantize_embeddings."""
    from torch.nn.utils import prune
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, m in model.named_modules():
            if not isinstance(m, torch.nn.Linear):
                continue
            if name in heads:
                if cfg.quantize_embeddings:
                    m.weight.copy_(dequantize_rows(*quantize_rows(m.weight)))
                continue
            if cfg.prune.enabled and cfg.prune.amount > 0:
                prune.l1_unstructured(m, "weight", amount=cfg.prune.amount)
                prune.remove(m, "weight")
            if cfg.quantize:
                m.weight.copy_(dequantize_rows(*quantize_rows(m.weight)))
        if cfg.quantize_embeddings:
            emb = model.get_input_embeddings()
            emb.weight.copy_(dequantize_rows(*quantize_rows(emb.weight)))
    return model


def load_student_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return make_classifier(
        tmp_path_factory.mktemp("classifier") / "student", tiny_tokenizer, LABELS
    )


def _padded(tokenizer) -> dict[str, torch.Tensor]:
    texts = ["The match ended in a draw.", "Doctors advise rest", "a"]
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


@pytest.mark.parametrize(
    "cfg",
    [CompressConfig(), CompressConfig(quantize_embeddings=False, zstd_level=0)],
    ids=["default", "float-head"],
)
def test_classifier_round_trip(tmp_path, classifier_dir, tiny_tokenizer, cfg):
    from transformers import LlamaForSequenceClassification

    out = tmp_path / "c"
    metrics = run_compress(cfg, student=classifier_dir, out=out, metrics=tmp_path / "m.json")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["head"] == {
        "name": "score",
        "embedding": "model.embed_tokens",
        "tied": False,
        "task": "sequence-classification",
        "modules": ["score"],
    }
    quantized = {e["name"]: e for e in manifest["quantized"]}
    assert ("score" in quantized) == cfg.quantize_embeddings
    if cfg.quantize_embeddings:
        assert quantized["score"] == {"name": "score", "kind": "linear", "shape": [7, 32]}
    assert "score" not in manifest["sparsity"]  # the head is never pruned
    assert len(manifest["sparsity"]) == 7  # 1 layer x (q, k, v, o, gate, up, down)
    inputs = _padded(tiny_tokenizer)
    ref = classifier_reference(classifier_dir, cfg, ["score"])
    with torch.no_grad():
        expected = ref(**inputs).logits  # (3, 7)
        deq_model = load_compressed(out, int8_kernel="dequantize")
        deq = deq_model(**inputs).logits
        dyn = load_compressed(out, int8_kernel="dynamic")(**inputs).logits
    assert isinstance(deq_model, LlamaForSequenceClassification)
    assert deq_model.config.id2label == dict(enumerate(LABELS))
    score = ref.score.weight  # never pruned: only int8-rounded, when quantized at all
    torch.testing.assert_close(deq_model.score.weight, score, atol=0, rtol=0)
    source = load_student_weights(classifier_dir)["score.weight"]
    expected_score = dequantize_rows(*quantize_rows(source)) if cfg.quantize_embeddings else source
    torch.testing.assert_close(score, expected_score, atol=0, rtol=0)
    torch.testing.assert_close(deq, expected, atol=1e-5, rtol=1e-5)
    assert float((dyn - expected).abs().max()) < 0.05 * float(expected.abs().max()) + 0.05
    if cfg.quantize_embeddings:
        assert metrics["weights_bytes_after"] < metrics["weights_bytes_before"] / 3
    assert (manifest["parameters"], manifest["nonzero_parameters"]) == parameter_counts(deq_model)
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (out / f).is_file()


def test_multi_layer_classifier_head(tmp_path, tiny_tokenizer):
    """An XLM-R-style head (classifier.dense + classifier.out_proj): both are head, neither is
    pruned; BERT-style position/type embeddings stay float."""
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    from pipeline.compress.compress import classifier_head

    torch.manual_seed(0)
    config = XLMRobertaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=72,
        pad_token_id=tiny_tokenizer.pad_token_id,
        num_labels=3,
    )
    model = XLMRobertaForSequenceClassification(config).eval()
    assert classifier_head(model) == ["classifier.dense", "classifier.out_proj"]
    folder = tmp_path / "xlmr"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    cfg = CompressConfig()
    out = tmp_path / "c"
    run_compress(cfg, student=folder, out=out, metrics=tmp_path / "m.json")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["head"]["name"] == "classifier.out_proj"
    assert manifest["head"]["modules"] == ["classifier.dense", "classifier.out_proj"]
    assert not {"classifier.dense", "classifier.out_proj"} & set(manifest["sparsity"])
    inputs = {"input_ids": _padded(tiny_tokenizer)["input_ids"]}
    ref = classifier_reference(folder, cfg, ["classifier.dense", "classifier.out_proj"])
    with torch.no_grad():
        got = load_compressed(out, int8_kernel="dequantize")(**inputs).logits
        expected = ref(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_classify_compress_section(tmp_path, classifier_dir, capsys):
    """pipeline.stages.compress --section classify_compress reads that section (same keys); errors
    name it."""
    from pipeline.core.stage_cli import load_section

    stage = stage_module("compress")
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump({"compress": {}, "classify_compress": {"prune": {"amount": 0.5}}})
    )
    argv = ["--params", str(params), "--student", str(classifier_dir)]
    ok = stage.main(
        [*argv, "--section", "classify_compress", "--out", str(tmp_path / "c")]
        + ["--metrics", str(tmp_path / "m.json")]
    )
    assert ok == 0
    assert json.loads((tmp_path / "m.json").read_text())["block_sparsity"] == pytest.approx(
        0.5, abs=0.01
    )
    assert load_section(params, CompressConfig, "compress") == CompressConfig()
    params.write_text(yaml.safe_dump({"classify_compress": {"prune": {"amount": 1.5}}}))
    bad = stage.main(
        [*argv, "--section", "classify_compress", "--out", str(tmp_path / "c2")]
        + ["--metrics", str(tmp_path / "m2.json")]
    )
    assert bad == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: classify_compress.prune.amount: must be in [0, 1), got 1.5"
    )
    assert not (tmp_path / "c2").exists()
    params.write_text(yaml.safe_dump({"classify_compress": {"zstd_levl": 3}}))
    with pytest.raises(ConfigError) as e:
        load_section(params, CompressConfig, "classify_compress")
    assert "classify_compress.zstd_levl: unknown key" in str(e.value)
    params.write_text(yaml.safe_dump({"classify_compress": {"zstd_level": 40}}))
    with pytest.raises(ConfigError) as e:
        load_section(params, CompressConfig, "classify_compress")
    assert str(e.value) == (
        "classify_compress.zstd_level: must be in [0, 22] (0: no entropy coding), got 40"
    )
