"""Benchmark: what each kind of soft label is worth, at the same student, steps and data order.

Trains the default student (params.yaml `train_student`: size, steps, learning rate, seed)
from scratch once per variant and reports its validation perplexity on the whole validation
split:

- `ce`: hard labels only (alpha = 0);
- `full`: the teacher run live, full-vocabulary KD (alpha = 1);
- `sample`: stored `sample` labels with k in --sample-k (alpha = 1);
- `topk`: stored top-k labels with k = --topk-k, pure (alpha = 1) and mixed with CE
  (alpha = 0.5), each tail mode (renorm, bucket, ignore).

Every variant uses the same seed, hence the same initial weights, and the same batches in the
same order (the stored runs' order comes from the store layout, which is the same for every
store; the live and CE runs use the same block size). The stores besides the pipeline's own
(`data/logits/teacher.zarr`, reused when its method, k and seed match) are written once with
the teacher_logits stage into --work (kept for reruns). Expect ~20 minutes on 2 CPU cores.

Last line: {"bench": "kd_quality", "ppl_ce": ..., "ppl_full": ..., "ppl_sample": {"12": ...,
"32": ...}, "ppl_topk": {"32/renorm": ..., "32/renorm/alpha0.5": ..., ...}}
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import sys
import time
from pathlib import Path

from pipeline.capture.teacher_logits import TeacherLogitsConfig, run_teacher_logits
from pipeline.core.allocator import keep_freed_memory
from pipeline.core.config import from_params, load_params
from pipeline.store.format import read_attrs
from pipeline.student.train_student import TrainStudentConfig, prepare

TAILS = ("renorm", "bucket", "ignore")


def store_for(method: str, k: int, params: dict, args: argparse.Namespace) -> Path:
    """A complete store of `method` and `k`: the pipeline's if it matches, else built once."""
    base = from_params(TeacherLogitsConfig, params, "teacher_logits")
    cfg = dataclasses.replace(base, method=method, k=k)
    if args.logits.exists():
        attrs = read_attrs(args.logits)
        if (attrs["method"], attrs["k"], attrs["seed"]) == (method, k, cfg.seed) and attrs.get(
            "complete"
        ):
            return args.logits
    out = args.work / f"{method}-k{k}.zarr"
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
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.work.mkdir(parents=True, exist_ok=True)

    params = load_params(args.params)
    base = from_params(TrainStudentConfig, params, "train_student")
    base = dataclasses.replace(base, teacher="store", temperature=1.0, loss="kl")
    stores = {("sample", k): store_for("sample", k, params, args) for k in args.sample_k}
    stores[("topk", args.topk_k)] = store_for("topk", args.topk_k, params, args)
    block = read_attrs(stores[("topk", args.topk_k)])["chunk_sequences"]
    any_store = stores[("topk", args.topk_k)]

    print("ce (hard labels only)", file=sys.stderr)
    result: dict = {"bench": "kd_quality"}
    result["ppl_ce"] = perplexity(dataclasses.replace(base, alpha=0.0), args, logits=any_store)
    print("full (teacher live)", file=sys.stderr)
    live = dataclasses.replace(base, teacher="live", alpha=1.0)
    result["ppl_full"] = perplexity(
        live, args, logits=None, teacher=args.teacher, chunk_sequences=block
    )
    result["ppl_sample"] = {}
    for k in args.sample_k:
        print(f"sample k={k}", file=sys.stderr)
        cfg = dataclasses.replace(base, alpha=1.0)
        result["ppl_sample"][str(k)] = perplexity(cfg, args, logits=stores[("sample", k)])
    result["ppl_topk"] = {}
    for alpha, tail in itertools.product((1.0, 0.5), TAILS):
        name = f"{args.topk_k}/{tail}" + ("" if alpha == 1.0 else f"/alpha{alpha}")
        print(f"topk {name}", file=sys.stderr)
        cfg = dataclasses.replace(base, alpha=alpha, tail=tail)
        result["ppl_topk"][name] = perplexity(cfg, args, logits=stores[("topk", args.topk_k)])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
