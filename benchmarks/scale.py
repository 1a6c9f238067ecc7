"""Benchmark: the heavy stages past one process's memory and cores (issue 15), in one run.

1. tokenize at scale: the sample corpus replicated 10x and 100x into a temp folder (never
   committed; replica r > 0 of a line gets the suffix ` [r]`, so no line is a duplicate and
   every replica is tokenized), each run end to end as the stage runs (`tokenize` params, its
   `num_proc` processes) in a fresh subprocess: peak RSS of the stage process (VmHWM; it holds
   the reduce step: the dedupe digests, the row index, a write block) and of its largest
   worker (forked from it, so its shared pages count too), and tokens/s. Bounded memory means
   peak RSS at 100x within 1.2x of 10x.
2. ratio: the 10x stage's tokens/s over the bare `tokenizer(texts, add_special_tokens=False)`
   on the same texts (the documents the stage keeps), one call with the tokenizer's own
   threads, measured before and after the stage run (mean of the two). Tokens are the
   tokenizer's (EOS separators not counted) on both sides; the stage's clock starts after the
   tokenizer was loaded once (transformers' lazy imports, as on the bare side). The stage calls
   the tokenizer's Rust backend (`encode_batch_fast`) where that gives the same ids, so
   `ratio_vs_backend` compares it with that call too.
3. dask: tokenize (10x corpus) and teacher_logits (`--teacher-rows` rows of the 10x tokenized
   train split, the params' method and k) with `dask.enabled` on a LocalCluster of 1 and of 2
   workers; tokens/s end to end, cluster start and worker warm-up included.

The teacher is `models/teacher` (run `dvc repro prepare_teacher` first).

Last line: {"bench": "scale", "tokenize": {"peak_rss_mb": {"10x": ..., "100x": ...},
"ratio": ..., "tokens_per_s": ...}, "dask": {"tokenize": {"1": ..., "2": ...},
"teacher_logits": {"1": ..., "2": ...}}}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "corpora" / "sample"


def replicate(src: Path, dst: Path, times: int) -> int:
    """Write `times` copies of every `<lang>.txt` of `src` into `dst`; returns bytes written."""
    dst.mkdir(parents=True, exist_ok=True)
    total = 0
    for path in sorted(src.glob("*.txt")):
        lines = path.read_text("utf-8").splitlines()
        with open(dst / path.name, "w", encoding="utf-8") as f:
            for r in range(times):
                suffix = f" [{r}]" if r else ""
                f.writelines(f"{line}{suffix}\n" for line in lines if line.strip())
        total += (dst / path.name).stat().st_size
    return total


def prepared_teacher() -> Path:
    """`models/teacher` (its tokenizer tokenizes, its model computes the logits)."""
    prepared = REPO / "models" / "teacher"
    if not (prepared / "provenance.json").is_file():
        sys.exit(f"{prepared}: no prepared teacher; run `dvc repro prepare_teacher` first")
    return prepared


def run_child(job: dict) -> dict:
    """Run this script's `--child` mode in a fresh process; its last stdout line (JSON)."""
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(job)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if proc.returncode:
        sys.exit(f"child {job} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child(job: dict) -> dict:
    """One timed stage run in this (fresh) process; imports are warmed before the clock."""
    import resource

    import datasets  # noqa: F401 - imported before timing, as in a long-lived process
    import transformers  # noqa: F401

    from pipeline.core.config import from_mapping

    out = Path(job["out"])
    if job["stage"] == "tokenize":
        from pipeline.data.corpus import CorpusConfig
        from pipeline.data.tokenize import TokenizeConfig, load_tokenizer, run_tokenize

        cfg = from_mapping(TokenizeConfig, job["cfg"], "tokenize")
        load_tokenizer(job["teacher"])  # warm: transformers' lazy imports (torch), as raw's
        start = time.perf_counter()
        m = run_tokenize(
            cfg,
            CorpusConfig(path=job["corpus"]),
            teacher=Path(job["teacher"]),
            out=out / "tokenized",
            metrics=out / "tokenize.json",
            progress=False,
        )
        seconds = time.perf_counter() - start
        total = m["total"]
        eos = total["train_documents"] + total["validation_documents"]
        tokens = total["train_tokens"] + total["validation_tokens"] - eos
    else:
        from pipeline.capture.teacher_logits import TeacherLogitsConfig, run_teacher_logits

        cfg = from_mapping(TeacherLogitsConfig, job["cfg"], "teacher_logits")
        start = time.perf_counter()
        m = run_teacher_logits(
            cfg,
            teacher=job["teacher"],
            tokenized=job["tokenized"],
            out=out / "teacher.zarr",
            metrics=out / "teacher_logits.json",
            work_dir=out / "work",
        )
        seconds = time.perf_counter() - start
        tokens = job["tokens"]
    peak = peak_rss_mb()
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"seconds": seconds, "tokens": tokens, "rss_mb": peak, "worker_rss_mb": workers}


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MB. Not `ru_maxrss`: Linux carries that
    over `exec` from the parent (this benchmark's, which holds the bare side's token lists)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def raw_tokens_per_s(teacher: Path, corpus: Path) -> tuple[float, float, int]:
    """Bare `tokenizer(texts)` and its backend's `encode_batch_fast` over the documents the
    stage keeps: (tokens/s, backend tokens/s, tokens)."""
    from pipeline.data.corpus import CorpusConfig, read_corpus
    from pipeline.data.tokenize import load_tokenizer

    tokenizer = load_tokenizer(teacher)
    docs = read_corpus(CorpusConfig(path=str(corpus)))
    texts = [d for split in (docs.train, docs.validation) for lang in split for d in split[lang]]
    start = time.perf_counter()
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    seconds = time.perf_counter() - start
    tokens = sum(map(len, ids))
    start = time.perf_counter()
    tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    backend = time.perf_counter() - start
    return tokens / seconds, tokens / backend, tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument(
        "--replicas", type=int, nargs=2, default=[10, 100], metavar=("SMALL", "LARGE")
    )
    parser.add_argument(
        "--teacher-rows", type=int, default=1536, help="rows for teacher_logits on Dask"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return

    from pipeline.core.config import load_params

    params = load_params(args.params)
    small, large = args.replicas
    tok_cfg = dict(params["tokenize"])
    tok_cfg["dask"] = {**tok_cfg.get("dask", {}), "enabled": False}
    result: dict = {"bench": "scale"}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        scratch = Path(tmp)
        corpora = {}
        for times in (small, large):
            corpora[times] = scratch / f"x{times}"
            size = replicate(SAMPLE, corpora[times], times)
            print(f"corpus {times}x: {size / 2**20:.1f} MB in {corpora[times]}", flush=True)
        teacher = prepared_teacher()
        print(f"teacher: {teacher}", flush=True)

        runs = {}
        raw1, backend1, raw_tokens = raw_tokens_per_s(teacher, corpora[small])
        print(
            f"raw tokenizer, {small}x: {raw_tokens} tokens, {raw1:.0f} tokens/s "
            f"(its backend's encode_batch_fast: {backend1:.0f})",
            flush=True,
        )
        for times in (small, large):
            job = {
                "stage": "tokenize",
                "cfg": tok_cfg,
                "corpus": str(corpora[times]),
                "teacher": str(teacher),
                "out": str(scratch / f"out-{times}"),
            }
            runs[times] = run_child(job)
            r = runs[times]
            print(
                f"tokenize {times}x (num_proc {tok_cfg['num_proc']}): {r['tokens']} tokens in "
                f"{r['seconds']:.1f} s = {r['tokens'] / r['seconds']:.0f} tokens/s; peak RSS "
                f"{r['rss_mb']:.0f} MB (largest worker {r['worker_rss_mb']:.0f} MB)",
                flush=True,
            )
        raw2, backend2, _ = raw_tokens_per_s(teacher, corpora[small])
        raw, backend = (raw1 + raw2) / 2, (backend1 + backend2) / 2
        print(f"raw tokenizer again: {raw2:.0f} tokens/s; mean {raw:.0f}", flush=True)
        assert runs[small]["tokens"] == raw_tokens, (runs[small]["tokens"], raw_tokens)
        stage_tps = runs[small]["tokens"] / runs[small]["seconds"]
        result["tokenize"] = {
            "peak_rss_mb": {f"{t}x": round(runs[t]["rss_mb"], 1) for t in (small, large)},
            "worker_peak_rss_mb": {
                f"{t}x": round(runs[t]["worker_rss_mb"], 1) for t in (small, large)
            },
            "rss_ratio": round(runs[large]["rss_mb"] / runs[small]["rss_mb"], 3),
            "ratio": round(stage_tps / raw, 3),
            "tokens_per_s": round(stage_tps),
            "raw_tokens_per_s": round(raw),
            "ratio_vs_backend": round(stage_tps / backend, 3),
            f"tokens_per_s_{large}x": round(runs[large]["tokens"] / runs[large]["seconds"]),
        }

        dask: dict = {"tokenize": {}, "teacher_logits": {}}
        for workers in (1, 2):
            job = {
                "stage": "tokenize",
                "cfg": {**tok_cfg, "dask": {"enabled": True, "n_workers": workers}},
                "corpus": str(corpora[small]),
                "teacher": str(teacher),
                "out": str(scratch / f"dask-tok-{workers}"),
            }
            r = run_child(job)
            dask["tokenize"][str(workers)] = round(r["tokens"] / r["seconds"])
            print(
                f"tokenize on Dask, {workers} worker(s): {r['tokens'] / r['seconds']:.0f} tokens/s",
                flush=True,
            )

        import numpy as np

        from pipeline.data.tokenized import load_tokenized, write_tokenized

        data = load_tokenized(scratch / f"out-{small}" / "tokenized")
        train = np.ascontiguousarray(data["train"].input_ids[: args.teacher_rows])
        val = np.ascontiguousarray(data["validation"].input_ids[: max(1, args.teacher_rows // 8)])
        write_tokenized(
            {"train": (train, ["en"] * len(train)), "validation": (val, ["en"] * len(val))},
            scratch / "teacher-rows",
        )
        tl_cfg = dict(params["teacher_logits"])
        for workers in (1, 2):
            job = {
                "stage": "teacher_logits",
                "cfg": {**tl_cfg, "device": "cpu", "dask": {"enabled": True, "n_workers": workers}},
                "teacher": str(teacher),
                "tokenized": str(scratch / "teacher-rows"),
                "tokens": int(train.size + val.size),
                "out": str(scratch / f"dask-tl-{workers}"),
            }
            r = run_child(job)
            dask["teacher_logits"][str(workers)] = round(r["tokens"] / r["seconds"])
            print(
                f"teacher_logits on Dask, {workers} worker(s): {r['tokens']} tokens in "
                f"{r['seconds']:.1f} s = {r['tokens'] / r['seconds']:.0f} tokens/s",
                flush=True,
            )
        result["dask"] = dask
    print(f"cores: {os.cpu_count()}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
