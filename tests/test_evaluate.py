"""The evaluate stage: numeric parity of every metric with direct full-vocabulary computations,
the files it writes (metrics, plot tables, report and figures), and its refusals (exact messages).

Setup: a peaky tiny teacher (so argmaxes are not near ties), a student and its compressed copy,
a tokenized DatasetDict (validation rows in three languages) and logits stores written from the
teacher itself with pipeline.store.format (top-k with k = V, top-k with small k, and sampled).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_compress import save_student

from pipeline.compress.compress import CompressConfig, run_compress
from pipeline.core.config import from_params
from pipeline.core.errors import ConfigError, InputError, StoreError
from pipeline.core.provenance import ids_fingerprint, tokenizer_identity
from pipeline.evaluate.common import parse_named
from pipeline.evaluate.evaluate import EvaluateConfig, run_evaluate
from pipeline.store.format import (
    FORMAT_VERSION,
    SplitSpec,
    StoreSpec,
    create_store,
    finalize_store,
    write_shard,
)
from pipeline.store.verify import _TOKENIZER_ADVICE, abbreviate
from tests.conftest import stage_module

REPO = Path(__file__).resolve().parents[1]
N, L = 10, 16
LANGS = ["en"] * 4 + ["de"] * 3 + ["zh"] * 3
CFG = EvaluateConfig(batch_size=3, throughput_sequences=2, throughput_repeats=2)


def save_tokenized(path: Path, rows: np.ndarray, langs: list[str]) -> None:
    """A DatasetDict like the tokenize stage's (train = validation here; only validation is read)."""
    import datasets

    features = datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int32"), length=rows.shape[1]),
            "lang": datasets.Value("string"),
        }
    )
    split = datasets.Dataset.from_dict({"input_ids": rows, "lang": langs}, features=features)
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(
        str(path),
        num_shards={"train": 1, "validation": 1},  # as the tokenize stage writes it
    )


def teacher_logprobs(teacher_dir: Path, rows: np.ndarray) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.from_numpy(rows).long()).logits, -1)


def write_store(
    path: Path,
    lp: torch.Tensor,
    rows: np.ndarray,
    tok,
    method: str,
    k: int,
    format_version: int = FORMAT_VERSION,
) -> None:
    """A complete validation-only store of the teacher's own distribution `lp` (N, L, V), in
    `format_version` (a format-2 sample store as teacher_logits writes it: ids and counts)."""
    vocab = lp.shape[-1]
    if method == "topk":
        ids = torch.sort(lp, dim=-1, descending=True, stable=True).indices[..., :k]  # (N, L, k)
    else:
        g = torch.Generator().manual_seed(0)
        ids = torch.multinomial(lp.exp().reshape(-1, vocab), k, True, generator=g)
        ids = ids.reshape(*lp.shape[:2], k)
    logprobs = lp.gather(-1, ids)  # (N, L, k)
    distinct = torch.zeros_like(lp).scatter_(-1, ids, 1.0)
    covered = (lp.exp() * distinct).sum(-1).clamp(max=1.0)  # (N, L)
    tail = torch.where(covered >= 1 - 1e-6, float("-inf"), torch.log1p(-covered))
    entropy = -(lp.exp() * lp).sum(-1)  # (N, L)
    spec = StoreSpec(
        (SplitSpec("validation", len(rows), rows.shape[1]),),
        k,
        4,
        2,
        method=method,
        format_version=format_version,
        logprobs=method == "topk" or format_version == 1,
    )
    attrs = {
        "teacher": {
            "name": "tiny",
            "revision": "local",
            "sha256": "0" * 64,
            "architecture": "LlamaForCausalLM",
            "vocab_size": vocab,
        },
        "tokenizer": tokenizer_identity(tok),
        "dataset": {
            "splits": {
                "validation": {
                    "n": len(rows),
                    "seq_len": rows.shape[1],
                    "fingerprint": ids_fingerprint(rows),
                }
            }
        },
        "method": method,
        "seed": 0,
        "temperature": 1.0,
    }
    create_store(path, spec, attrs)
    sums: dict[str, str] = {}
    for shard, (a, b) in enumerate(spec.shards("validation")):
        sums.update(
            write_shard(
                path,
                spec,
                "validation",
                shard,
                rows[a:b],
                ids[a:b].numpy().astype(np.int32),
                logprobs[a:b].numpy().astype(np.float16),
                tail[a:b].numpy().astype(np.float16),
                entropy[a:b].numpy().astype(np.float16) if spec.compact else None,
            )
        )
    finalize_store(path, sums)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("evaluate")
    vocab = len(tiny_tokenizer)
    teacher = root / "teacher"
    model = save_student(teacher, tiny_tokenizer, tie=False, seed=3)
    with torch.no_grad():  # a peaky teacher: no near-ties between its top ids
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(teacher)
    student = root / "student"
    save_student(student, tiny_tokenizer, tie=True, seed=1)
    compressed = root / "student-int8"
    run_compress(CompressConfig(), student=student, out=compressed, metrics=root / "c.json")
    rows = np.random.default_rng(0).integers(0, vocab, (N, L)).astype(np.int32)
    tokenized = root / "tokenized"
    save_tokenized(tokenized, rows, LANGS)
    lp = teacher_logprobs(teacher, rows)
    stores = {}
    for method, k in (("topk", vocab), ("topk", 8), ("sample", 16)):
        stores[f"{method}{k}"] = root / f"{method}{k}.zarr"
        write_store(stores[f"{method}{k}"], lp, rows, tiny_tokenizer, method, k)
    stores["sample16-f1"] = root / "sample16-f1.zarr"
    write_store(stores["sample16-f1"], lp, rows, tiny_tokenizer, "sample", 16, format_version=1)
    return {
        "root": root,
        "teacher": teacher,
        "student": student,
        "compressed": compressed,
        "rows": rows,
        "tokenized": tokenized,
        "stores": stores,
        "lp": lp,
        "tokenizer": tiny_tokenizer,
    }


def evaluate(setup, out: Path, store: str, models=None, **kw):
    models = models or [
        ("teacher", setup["teacher"]),
        ("student", setup["student"]),
        ("student-int8", setup["compressed"]),
    ]
    return run_evaluate(
        kw.pop("cfg", CFG),
        tokenized=kw.pop("tokenized", setup["tokenized"]),
        logits=setup["stores"][store],
        models=models,
        metrics=out / "metrics.json",
        plots=out / "plots",
        report_dir=out / "report",
        **kw,
    )


def full_logprobs(model_dir: Path, rows: np.ndarray, compressed: bool = False) -> torch.Tensor:
    """(N, L-1, V) log-probabilities of a model at positions 0..L-2, one full forward."""
    from transformers import AutoModelForCausalLM

    from pipeline.compress.compressed import load_compressed

    if compressed:
        model = load_compressed(model_dir, int8_kernel="dequantize")
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.from_numpy(rows).long()).logits, -1)[:, :-1]


def test_metrics_match_full_vocabulary_reference(setup, tmp_path):
    """k = V: the partition KL is the full KL; perplexity and agreement from full logits.

    The compressed model runs with the `dequantize` kernel here: the `dynamic` kernel quantizes
    activations with one range per batch, so its outputs depend on how rows are batched.
    """
    cfg = EvaluateConfig(
        batch_size=3, throughput_sequences=2, throughput_repeats=2, int8_kernel="dequantize"
    )
    result = evaluate(setup, tmp_path, f"topk{len(setup['tokenizer'])}", cfg=cfg)
    rows = setup["rows"]
    targets = torch.from_numpy(rows[:, 1:]).long()
    lp_t = setup["lp"][:, :-1]  # (N, L-1, V)
    for name, folder in (
        ("teacher", "teacher"),
        ("student", "student"),
        ("student-int8", "compressed"),
    ):
        lq = full_logprobs(setup[folder], rows, folder == "compressed")
        nll = -lq.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N, L-1)
        kl = (lp_t.exp() * (lp_t - lq)).sum(-1)  # (N, L-1)
        agree = (lq.argmax(-1) == lp_t.argmax(-1)).double().mean()
        got = result["models"][name]
        assert got["perplexity"] == pytest.approx(float(nll.double().mean().exp()), rel=1e-5)
        assert got["kl_teacher_model"] == pytest.approx(float(kl.double().mean()), abs=2e-3)
        assert got["top1_agreement"] == pytest.approx(float(agree), abs=1e-9)
        assert got["tokens_per_s"] > 0
    assert result["models"]["teacher"]["top1_agreement"] == 1.0
    assert abs(result["models"]["teacher"]["kl_teacher_model"]) < 2e-3
    assert result["store"]["topk_mass_coverage"] == pytest.approx(1.0, abs=1e-6)
    # per-language perplexity (plot table) equals a direct per-language computation
    lq = full_logprobs(setup["student"], rows)
    nll = -lq.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double()
    with open(tmp_path / "plots" / "perplexity" / "student.csv") as f:
        table = {r["lang"]: r for r in csv.DictReader(f)}
    assert sorted(table) == ["de", "en", "zh"]
    for lang in ("en", "de", "zh"):
        idx = [i for i, x in enumerate(LANGS) if x == lang]
        assert float(table[lang]["perplexity"]) == pytest.approx(
            float(nll[idx].mean().exp()), rel=1e-5
        )
        assert int(table[lang]["tokens"]) == len(idx) * (L - 1)


def test_sample_store_kl_is_the_draw_average(setup, tmp_path):
    result = evaluate(setup, tmp_path, "sample16-f1", models=[("student", setup["student"])])
    from pipeline.store.format import open_split

    arrays = open_split(setup["stores"]["sample16-f1"], "validation")
    ids = torch.from_numpy(arrays["ids"][:][:, :-1]).long()  # (N, L-1, k)
    lp = torch.from_numpy(arrays["logprobs"][:][:, :-1]).float()
    lq = full_logprobs(setup["student"], setup["rows"])
    expected = (lp - lq.gather(-1, ids)).mean(-1).double().mean()
    assert result["models"]["student"]["kl_teacher_model"] == pytest.approx(
        float(expected), rel=1e-5
    )
    best = ids.gather(-1, lp.argmax(-1, keepdim=True)).squeeze(-1)
    agree = (lq.argmax(-1) == best).double().mean()
    assert result["models"]["student"]["top1_agreement"] == pytest.approx(float(agree), abs=1e-9)
    tail = torch.from_numpy(arrays["tail"][:][:, :-1].astype(np.float64))
    assert result["store"]["topk_mass_coverage"] == pytest.approx(
        float((1 - tail.exp()).mean()), rel=1e-9
    )
    assert result["store"]["method"] == "sample"


def test_format2_sample_store_kl_is_entropy_plus_draws_cross_entropy(setup, tmp_path):
    """Ids + counts + entropy: KL = -H(p) - (1/k) sum_i c_i log q(i), top-1 = the most drawn id,
    no coverage (no tail); the same draws as the format-1 store give the same cross-entropy."""
    from pipeline.store.format import open_split
    from pipeline.store.labels import decode_block

    result = evaluate(setup, tmp_path, "sample16", models=[("student", setup["student"])])
    arrays = open_split(setup["stores"]["sample16"], "validation")
    assert set(arrays) == {"input_ids", "id_deltas", "extra_draws", "entropy"}
    labels = decode_block({name: arr[:] for name, arr in arrays.items()})
    ids = torch.from_numpy(labels["ids"][:, :-1].astype(np.int64))  # (N, L-1, k)
    counts = torch.from_numpy(labels["counts"][:, :-1]).double()  # (N, L-1, k)
    h = torch.from_numpy(labels["entropy"][:, :-1]).double()  # (N, L-1)
    lq = full_logprobs(setup["student"], setup["rows"]).double()
    expected = (-h - (counts * lq.gather(-1, ids)).sum(-1) / 16).mean()
    got = result["models"]["student"]["kl_teacher_model"]
    assert got == pytest.approx(float(expected), rel=1e-5)
    raw = open_split(setup["stores"]["sample16-f1"], "validation")
    draws = torch.from_numpy(raw["ids"][:][:, :-1]).long()
    assert torch.allclose((counts * lq.gather(-1, ids)).sum(-1), lq.gather(-1, draws).sum(-1))
    best = ids.gather(-1, counts.argmax(-1, keepdim=True)).squeeze(-1)
    agree = (lq.argmax(-1) == best).double().mean()
    assert result["models"]["student"]["top1_agreement"] == pytest.approx(float(agree), abs=1e-9)
    assert result["store"]["topk_mass_coverage"] is None
    teacher = evaluate(setup, tmp_path / "t", "sample16", models=[("teacher", setup["teacher"])])
    assert abs(teacher["models"]["teacher"]["kl_teacher_model"]) < 0.05  # draw noise only


def test_dynamic_kernel_is_close_to_dequantized(setup, tmp_path):
    models = [("int8", setup["compressed"])]
    dyn = evaluate(setup, tmp_path / "a", "topk8", models=models)["models"]["int8"]
    cfg = EvaluateConfig(batch_size=3, throughput_repeats=1, int8_kernel="dequantize")
    deq = evaluate(setup, tmp_path / "b", "topk8", models=models, cfg=cfg)["models"]["int8"]
    assert dyn["perplexity"] == pytest.approx(deq["perplexity"], rel=1e-2)
    assert dyn["kl_teacher_model"] == pytest.approx(deq["kl_teacher_model"], rel=5e-2, abs=1e-2)


def test_teacher_kl_is_near_zero_on_its_own_sample_store(setup, tmp_path):
    result = evaluate(setup, tmp_path, "sample16-f1", models=[("teacher", setup["teacher"])])
    assert abs(result["models"]["teacher"]["kl_teacher_model"]) < 5e-3  # fp16 rounding only


def test_topk_kl_is_a_lower_bound(setup, tmp_path):
    small = evaluate(setup, tmp_path / "a", "topk8", models=[("student", setup["student"])])
    full = evaluate(
        setup,
        tmp_path / "b",
        f"topk{len(setup['tokenizer'])}",
        models=[("student", setup["student"])],
    )
    kl_small = small["models"]["student"]["kl_teacher_model"]
    assert 0 < kl_small <= full["models"]["student"]["kl_teacher_model"] + 1e-4
    assert 0 < small["store"]["topk_mass_coverage"] < 1


def test_outputs(setup, tmp_path):
    from dvclive import Live

    live_dir = tmp_path / "dvclive" / "student"
    live = Live(str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None)
    for step in (10, 20, 30):
        live.step = step
        live.log_metric("train/ce", 6.0 - step / 10)
        live.log_metric("train/loss", 1.0 / step)
        live.log_metric("val/perplexity", 400.0 - step)
        live.make_summary()
    live.end()
    result = evaluate(setup, tmp_path, "topk8", curves=[("student", live_dir)])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result))
    assert sorted(metrics["models"]) == ["student", "student-int8", "teacher"]  # keys sorted
    keys = {
        "perplexity",
        "kl_teacher_model",
        "top1_agreement",
        "parameters",
        "nonzero_parameters",
        "weights_bytes",
        "size_bytes",
        "tokens_per_s",
    }
    for name, m in metrics["models"].items():
        assert set(m) == keys, name
    s, c = metrics["models"]["student"], metrics["models"]["student-int8"]
    assert c["parameters"] == s["parameters"] and c["nonzero_parameters"] < s["parameters"]
    assert c["weights_bytes"] < s["weights_bytes"] / 3
    assert metrics["validation"] == {
        "sequences": N,
        "seq_len": L,
        "positions": N * (L - 1),
        "languages": 3,
    }
    plots = tmp_path / "plots"
    assert sorted(p.name for p in (plots / "perplexity").iterdir()) == [
        "student-int8.csv",
        "student.csv",
        "teacher.csv",
    ]
    with open(plots / "size_quality.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["teacher", "student", "student-int8"]
    report = tmp_path / "report"
    text = (report / "report.md").read_text()
    for fig in ("perplexity_by_language.png", "size_vs_quality.png", "training_curves.png"):
        assert f"]({fig})" in text
        assert (report / fig).read_bytes()[:4] == b"\x89PNG"
    assert "| student-int8 (compressed) |" in text


def test_max_sequences(setup, tmp_path):
    cfg = EvaluateConfig(
        batch_size=2, max_sequences=5, throughput_sequences=2, throughput_repeats=1
    )
    result = evaluate(setup, tmp_path, "topk8", models=[("student", setup["student"])], cfg=cfg)
    assert result["validation"]["sequences"] == 5
    assert result["validation"]["languages"] == 2  # rows 0-4: en, de


# --- refusals --------------------------------------------------------------------------------


def test_missing_model_folder(setup, tmp_path):
    ghost = tmp_path / "models" / "ghost"
    with pytest.raises(InputError) as e:
        evaluate(setup, tmp_path, "topk8", models=[("teacher", setup["teacher"]), ("ghost", ghost)])
    assert str(e.value) == (
        f"model 'ghost': {ghost}: no such folder (train or compress it first, or fix the "
        "--model argument)"
    )
    assert not (tmp_path / "metrics.json").exists()


def test_tokenizer_mismatch(setup, tmp_path):
    from conftest import make_tokenizer, sample_lines

    other_tok = make_tokenizer(sample_lines("fr", 60) + sample_lines("ru", 60))
    other = tmp_path / "other"
    save_student(other, other_tok)
    ours, theirs = tokenizer_identity(setup["tokenizer"]), tokenizer_identity(other_tok)
    assert ours["vocab_size"] == theirs["vocab_size"] and ours["sha256"] != theirs["sha256"]
    with pytest.raises(InputError) as e:
        evaluate(setup, tmp_path, "topk8", models=[("other", other)])
    assert str(e.value) == (
        f"model 'other' ({other}): its tokenizer does not match the one the validation data and "
        "soft labels were made with: "
        f"tokenizer.sha256 differs: store {abbreviate(ours['sha256'])} vs yours "
        f"{abbreviate(theirs['sha256'])}; {_TOKENIZER_ADVICE}"
    )


def test_vocab_mismatch(setup, tmp_path):
    from transformers import AutoConfig

    odd = tmp_path / "odd"
    save_student(odd, setup["tokenizer"])
    config = AutoConfig.from_pretrained(odd)
    config.vocab_size = len(setup["tokenizer"]) + 20
    config.save_pretrained(odd)
    with pytest.raises(InputError) as e:
        evaluate(setup, tmp_path, "topk8", models=[("odd", odd)])
    v = len(setup["tokenizer"])
    assert str(e.value) == (
        f"model 'odd' ({odd}): vocab_size {v + 20} differs from the teacher's {v}; the stored "
        "ids index the teacher's vocabulary"
    )


def test_empty_validation_split(setup, tmp_path):
    empty = tmp_path / "tokenized"
    save_tokenized(empty, np.zeros((0, L), np.int32), [])
    with pytest.raises(InputError) as e:
        evaluate(setup, tmp_path, "topk8", tokenized=empty)
    assert str(e.value) == (
        f"{empty}: the validation split has no rows; nothing to evaluate (give the corpus more "
        "text per language or raise corpus.validation_fraction, then re-run tokenize)"
    )


def test_store_from_other_token_ids(setup, tmp_path):
    other = tmp_path / "tokenized"
    save_tokenized(other, setup["rows"][::-1].copy(), LANGS)
    with pytest.raises(StoreError) as e:
        evaluate(setup, tmp_path, "topk8", tokenized=other)
    assert str(e.value).startswith(
        f"{setup['stores']['topk8']}: refusing to evaluate against this logits store: "
        "dataset.splits.validation.fingerprint differs: "
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            ["student"],
            "--model 'student': expected NAME=PATH with NAME made of letters, digits, '.', '_' "
            "or '-' (e.g. student-kd=models/student-kd)",
        ),
        (["a=x", "a=y"], "--model 'a=y': the name 'a' is given twice"),
        (
            ["a b=x"],
            "--model 'a b=x': expected NAME=PATH with NAME made of letters, digits, '.', '_' or "
            "'-' (e.g. student-kd=models/student-kd)",
        ),
    ],
)
def test_bad_model_arguments(values, message):
    with pytest.raises(InputError) as e:
        parse_named(values, "--model")
    assert str(e.value) == message


def test_config_errors():
    with pytest.raises(ConfigError) as e:
        from_params(EvaluateConfig, {"evaluate": {"int8_kernel": "fast"}}, "evaluate")
    assert (
        str(e.value) == "evaluate.int8_kernel: must be one of 'dynamic', 'dequantize', got 'fast'"
    )
    with pytest.raises(ConfigError) as e:
        from_params(EvaluateConfig, {"evaluate": {"batch_size": 0}}, "evaluate")
    assert str(e.value) == "evaluate.batch_size: must be >= 1, got 0"


def test_stage_script_in_process(setup, tmp_path, capsys):
    import yaml

    stage = stage_module("evaluate")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"evaluate": {"throughput_repeats": 1, "batch_size": 4}}))
    base = [
        "--params",
        str(params),
        "--tokenized",
        str(setup["tokenized"]),
        "--logits",
        str(setup["stores"]["topk8"]),
        "--metrics",
        str(tmp_path / "m.json"),
        "--plots",
        str(tmp_path / "plots"),
        "--report",
        str(tmp_path / "report"),
    ]
    ok = stage.main(
        [*base, "--model", f"teacher={setup['teacher']}", "--model", f"int8={setup['compressed']}"]
    )
    assert ok == 0
    assert set(json.loads((tmp_path / "m.json").read_text())["models"]) == {"teacher", "int8"}
    bad = stage.main([*base, "--model", f"ghost={tmp_path / 'nope'}"])
    assert bad == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: model 'ghost': {tmp_path / 'nope'}: no such folder (train or compress it first, "
        "or fix the --model argument)"
    )


def test_params_yaml_section_and_help(capsys):
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert from_params(EvaluateConfig, params, "evaluate") == EvaluateConfig()
    stage = stage_module("evaluate")
    with pytest.raises(SystemExit) as e:
        stage.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "evaluate.int8_kernel [default: 'dynamic']" in text and "--model NAME=PATH" in text
