"""Benchmark: what each kind of soft label is worth, at the same student, steps and data order.

Trains the default student (params.yaml `train_student`: size, steps, learning rate, seed)
from scratch once per variant and reports its validation perplexity on the whole validation
split:

- `ce`: hard labels only (alpha = 0);
- `full`: the teacher run live, full-vocabulary KD (alpha = 1);
- `sample`: stored `sample` labels with k in --sample-k (alpha = 1), with the params'
  `train_student.singleton_weight` or each of --singleton-weight (a weight other than the
  params' is reported under "<k>/w<weight>", e.g. "32/w1.0" for the unbiased estimator);
- `topk`: stored top-k labels with k = --topk-k, pure (alpha = 1) and mixed with CE
  (alpha = 0.5), each tail mode (renorm, bucket, ignore).

Every variant uses the same seed, hence the same initial weights, and the same batches in the
same order (the stored runs' order comes from the store layout, which is the same for every
store; the live and CE runs use the same block size). The stores besides the pipeline's own
(`data/logits/teacher.zarr`, reused when its method, k and seed match) are written once with
the teacher_logits stage into --work (kept for reruns), sample stores with the params'
`teacher_logits.sampling` unless `--sampling` says otherwise. Live runs are cached in
--work/live-runs.json, keyed by everything that decides them (on CPU they are deterministic and
take 4x a stored run). Expect ~20 minutes on 2 CPU cores.

`--seeds S1 S2 ...` repeats every variant once per student seed (train_student.seed: initial
weights and data order; the stores stay the pipeline's) and reports the mean over seeds, with
the per-seed values and their spread (sample standard deviation) on the line before the last;
`sample_vs_full_pct` is the mean over seeds of each seed's paired gap 100 * (ppl_sample /
ppl_full - 1), same seed on both sides. `--variants` runs a subset (e.g. `full sample` for the
format-2 quality check: about 45 minutes for 3 seeds).

Last line: {"bench": "kd_quality", "ppl_ce": ..., "ppl_full": ..., "ppl_sample": {"12": ...,
"32": ...}, "ppl_topk": {"32/renorm": ..., "32/renorm/alpha0.5": ..., ...},
"sample_vs_full_pct": {"12": ..., "32": ...}, "seeds": [...]} (variants not run are absent)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

from pipeline.capture.teacher_logits import TeacherLogitsConfig, run_teacher_logits
from pipeline.core.allocator import keep_freed_memory
from pipeline.core.config import from_params, load_params
from pipeline.core.errors import SoftlabelsError
from pipeline.core.provenance import LM_TEACHER_KEYS, read_provenance
from pipeline.data.tokenized import load_tokenized
from pipeline.store.format import FORMAT_VERSION, SAMPLINGS, read_attrs, sampling_of
from pipeline.student.train_student import TrainStudentConfig, prepare

TAILS = ("renorm", "bucket", "ignore")


def current(store: Path, teacher: Path) -> bool:
    """Whether a kept store is complete, of this release's format and of this teacher."""
    try:
        attrs = read_attrs(store)
        sha = read_provenance(teacher, LM_TEACHER_KEYS)["sha256"]
    except SoftlabelsError:
        return False
    return (
        attrs.get("complete") is True
        and attrs.get("format_version") == FORMAT_VERSION
        and attrs["teacher"]["sha256"] == sha
    )


def store_for(method: str, k: int, params: dict, args: argparse.Namespace) -> Path:
    """A complete store of `method` and `k`: the pipeline's if it matches, else built once."""
    base = from_params(TeacherLogitsConfig, params, "teacher_logits")
    cfg = dataclasses.replace(base, method=method, k=k)
    if args.sampling is not None:
        cfg = dataclasses.replace(cfg, sampling=args.sampling)
    sampling = cfg.sampling if method == "sample" else None
    if args.logits.exists():
        attrs = read_attrs(args.logits)
        same = (attrs["method"], attrs["k"], attrs["seed"], sampling_of(attrs))
        if same == (method, k, cfg.seed, sampling) and attrs.get("complete"):
            return args.logits
    out = args.work / (f"{method}-k{k}" + (f"-{sampling}" if sampling else "") + ".zarr")
    if out.exists() and not current(out, args.teacher):
        shutil.rmtree(out)  # another teacher's, an older format's, or an unfinished store
    if not out.exists():
        t0 = time.perf_counter()
        run_teacher_logits(
            cfg,
            teacher=args.teacher,
            tokenized=args.tokenized,
            out=out,
            metrics=args.work / f"{method}-k{k}.json",
            work_dir=args.work / "partial",
        )
        print(f"built {out} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def live_perplexity(cfg: TrainStudentConfig, args: argparse.Namespace, **kw) -> float:
    """`perplexity` of a live-teacher run, cached in --work: on CPU such a run is a pure
    function of the config, the teacher and the data (and takes 4x a stored run). The key
    leaves out `singleton_weight`, which only a sample store's loss reads, so runs cached
    before that param existed stay valid."""
    config = dataclasses.asdict(cfg)
    del config["singleton_weight"]
    key = json.dumps(
        {
            "config": config,
            "teacher": read_provenance(args.teacher, LM_TEACHER_KEYS)["sha256"],
            "data": load_tokenized(args.tokenized, ["train", "validation"]).fingerprints(),
            "kw": {k: str(v) for k, v in kw.items()},
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    cache = args.work / "live-runs.json"
    known = json.loads(cache.read_text()) if cache.exists() else {}
    if digest not in known:
        known[digest] = perplexity(cfg, args, **kw)
        cache.write_text(json.dumps(known, indent=1) + "\n")
    else:
        print(f"  ppl {known[digest]:.1f} (cached run {digest} in {cache})", file=sys.stderr)
    return known[digest]


def perplexity(cfg: TrainStudentConfig, args: argparse.Namespace, **kw) -> float:
    """Train the student for cfg.steps from scratch; its validation perplexity."""
    t0 = time.perf_counter()
    setup = prepare(cfg, tokenized=args.tokenized, tokenizer=args.teacher, **kw)
    loader = iter(setup.loader())
    for _ in range(cfg.steps):
        setup.trainer.step(next(loader))
    del loader
    ppl = setup.trainer.perplexity(setup.validation, batch_size=cfg.batch_size)
    print(f"  ppl {ppl:.1f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return round(ppl, 2)


VARIANTS = ("ce", "full", "sample", "topk")


def sample_name(k: int, weight: float, base: TrainStudentConfig) -> str:
    """A sample variant's key in the results: "<k>", or "<k>/w<weight>" for a singleton
    weight other than the params'."""
    return str(k) if weight == base.singleton_weight else f"{k}/w{weight}"


def summary(values: list[float]) -> dict:
    """Mean, sample standard deviation and the values (per seed)."""
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(mean, 2), "sd": round(sd, 2), "values": values}


def main() -> None:
    keep_freed_memory()  # as the stage scripts do (see pipeline/core/allocator.py)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--teacher", type=Path, default=Path("models/teacher"))
    parser.add_argument("--tokenized", type=Path, default=Path("data/tokenized"))
    parser.add_argument("--logits", type=Path, default=Path("data/logits/teacher.zarr"))
    parser.add_argument("--work", type=Path, default=Path(".softlabels/bench/kd_quality"))
    parser.add_argument("--sample-k", type=int, nargs="+", default=[12, 32])
    parser.add_argument("--topk-k", type=int, default=32)
    parser.add_argument(
        "--singleton-weight",
        type=float,
        nargs="+",
        default=None,
        help="sample variants' train_student.singleton_weight values (default: params')",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="student seeds (default: params')"
    )
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument(
        "--sampling",
        choices=SAMPLINGS,
        default=None,
        help="placement of a sample store's draws (default: params' teacher_logits.sampling)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.work.mkdir(parents=True, exist_ok=True)

    params = load_params(args.params)
    base = from_params(TrainStudentConfig, params, "train_student")
    base = dataclasses.replace(base, teacher="store", temperature=1.0, loss="kl")
    seeds = args.seeds or [base.seed]
    weights = args.singleton_weight or [base.singleton_weight]
    samples = [sample_name(k, w, base) for k, w in itertools.product(args.sample_k, weights)]
    wanted = set(args.variants)
    stores = {}
    if "sample" in wanted:
        stores.update({("sample", k): store_for("sample", k, params, args) for k in args.sample_k})
    if wanted & {"topk", "ce", "full"}:
        stores[("topk", args.topk_k)] = store_for("topk", args.topk_k, params, args)
    any_store = next(iter(stores.values()))
    block = read_attrs(any_store)["chunk_sequences"]

    runs: dict[str, list[float]] = {}
    for seed in seeds:
        seeded = dataclasses.replace(base, seed=seed)
        if "ce" in wanted:
            print(f"seed {seed}: ce (hard labels only)", file=sys.stderr)
            cfg = dataclasses.replace(seeded, alpha=0.0)
            runs.setdefault("ce", []).append(perplexity(cfg, args, logits=any_store))
        if "full" in wanted:
            print(f"seed {seed}: full (teacher live)", file=sys.stderr)
            live = dataclasses.replace(seeded, teacher="live", alpha=1.0)
            runs.setdefault("full", []).append(
                live_perplexity(
                    live, args, logits=None, teacher=args.teacher, chunk_sequences=block
                )
            )
        for k, weight in itertools.product(args.sample_k, weights) if "sample" in wanted else []:
            print(f"seed {seed}: sample k={k} singleton_weight={weight}", file=sys.stderr)
            cfg = dataclasses.replace(seeded, alpha=1.0, singleton_weight=weight)
            runs.setdefault(f"sample/{sample_name(k, weight, base)}", []).append(
                perplexity(cfg, args, logits=stores[("sample", k)])
            )
        for alpha, tail in itertools.product((1.0, 0.5), TAILS) if "topk" in wanted else []:
            name = f"{args.topk_k}/{tail}" + ("" if alpha == 1.0 else f"/alpha{alpha}")
            print(f"seed {seed}: topk {name}", file=sys.stderr)
            cfg = dataclasses.replace(seeded, alpha=alpha, tail=tail)
            runs.setdefault(f"topk/{name}", []).append(
                perplexity(cfg, args, logits=stores[("topk", args.topk_k)])
            )

    result: dict = {"bench": "kd_quality"}
    if "ce" in runs:
        result["ppl_ce"] = summary(runs["ce"])["mean"]
    if "full" in runs:
        result["ppl_full"] = summary(runs["full"])["mean"]
    if "sample" in wanted:
        result["ppl_sample"] = {name: summary(runs[f"sample/{name}"])["mean"] for name in samples}
    if "topk" in wanted:
        result["ppl_topk"] = {
            name.removeprefix("topk/"): summary(v)["mean"]
            for name, v in runs.items()
            if name.startswith("topk/")
        }
    if "sample" in wanted and "full" in runs:
        gaps = {
            name: [
                100 * (s / f - 1) for s, f in zip(runs[f"sample/{name}"], runs["full"], strict=True)
            ]
            for name in samples
        }
        result["sample_vs_full_pct"] = {k: round(statistics.fmean(g), 2) for k, g in gaps.items()}
        print(
            json.dumps(
                {
                    "sample_vs_full_pct_per_seed": {
                        k: [round(x, 2) for x in g] for k, g in gaps.items()
                    }
                }
            )
        )
    result["seeds"] = seeds
    print(json.dumps({"per_variant": {name: summary(v) for name, v in runs.items()}}))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
