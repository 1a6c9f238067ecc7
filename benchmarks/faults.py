"""Benchmark: fault injection. kill -9 at random points of `teacher_logits` and `train_student`,
and a catalogue of bad inputs, every stage run as a subprocess exactly as dvc.yaml runs it.

Minutes, not in CI. Everything happens in a work folder (--workdir, default a fresh temporary
folder, deleted at the end unless --keep); nothing is written into the repository.

Setup (real stages, small params, OMP_NUM_THREADS=1 in every child for determinism and
fairness): a corpus of --lines lines of each of 4 languages of the sample corpus;
`prepare_teacher` (builtin teacher: 1024-token BPE, a 64-wide 1-layer Llama, 30 steps);
`tokenize` (rows of 64 tokens); then the two references, each one uninterrupted run with the
dvc.yaml flags into its own output: `teacher_logits` (k=16, chunk_sequences 8, shard_chunks 1:
a few hundred shards) and `train_student` (150 steps, a checkpoint every 5 steps, from the
reference store). Their durations R set the kill times.

Kill chains (`--only kills`), one per stage: start the stage (a new session, so its children
die with it), sleep a time drawn uniformly from (0.5 s, 0.9 R) by a seeded RNG (--seed), send
SIGKILL to its process group; --kills times, each time re-running the same command (which
resumes), then let the last run finish. After every kill the output must be absent or exactly
the reference (byte for byte), and a metrics file must not exist without its output; a violation
counts as half-written. After the final run no `.partial`, `.old-<pid>` or `.tmp` sibling may be
left next to the output or the metrics file. `kills` = kills sent (both chains); `kills_landed`
= those that hit a running process. A resumed run is shorter than R and may finish before its
kill: that kill is counted but not landed, the finished outputs are compared with the reference,
and the run's work folder (--work-dir, --checkpoints) is deleted, so that the next run computes
again over the finished output (which it must then replace atomically) instead of returning at
once on its finished record (teacher_logits); train_student deletes its checkpoints itself when
it finishes, so for it this changes nothing. `identical` = every finished run of both chains
(those and the final run) equals its reference:
- teacher_logits: every file of the store folder byte for byte, and the metrics JSON file byte
  for byte;
- train_student: every file of the student folder byte for byte (model.safetensors, config,
  tokenizer, softlabels.json), the metrics JSON without its timing fields and the resume step
  (`train_seconds`, `train_tokens_per_s`, `resumed_from_step`), and the dvclive curves folder:
  every `plots/metrics/**/*.tsv` byte for byte but `train/tokens_per_s.tsv`, and the summary
  `metrics.json` without its `tokens_per_s` entries.

Bad inputs (`--only inputs`): a catalogue of about 50 cases (`CASES`), each a subprocess of a stage script or
of `python -m pipeline.cli` (softlabels inspect/verify) with one thing wrong, run --jobs at a
time. Each case expects one of:
- `error`: a stage script exits 1 and its stderr shows exactly one line that is not a log line,
  a progress bar or a Python warning, starting with `error:`, and it is the last such line (the
  CLI: exit 2). Log lines are those of the stages' logging format, `LEVEL name: message` with
  LEVEL DEBUG, INFO or WARNING (an ERROR-level log line counts as an extra line); progress bars
  are the text after the last carriage return of a line when it contains `%|` or `[mm:ss<`;
  Python warnings are `file:line: XWarning: ...` plus the indented source line after it (shown
  in the table, not counted as error lines). A multi-line error message therefore fails.
- `problems`: `softlabels verify` exits 1 with `N problem(s):` and the list on stdout.
- `recovered`: the run must succeed (exit 0, complete outputs) after setting the damaged input
  aside (a truncated checkpoint, a checkpoint of another configuration in the run's own folder:
  a `*.damaged-*` file must be left next to it).
For every case: `Traceback` anywhere in its output counts under `tracebacks`; `half_written` = an
output path of that invocation (output folder, metrics file, curves folder, plots, report) exists
after a failure, or a `.partial`/`.old-<pid>`/`.tmp` sibling is left next to one (after any run).
`one_line_errors` counts the `error` cases with exactly one clean error line and the `problems`
cases with a clean exit 1; `recovered` (separately, not in one_line_errors) the `recovered` cases
that succeeded. The read-only output folder is chmod 0o555; root ignores permissions, so as root
that case runs the stage under `capsh` without the capabilities that bypass them (DAC override),
and is skipped if that is not possible (counted under `skipped`, not in `bad_inputs`).

`tracebacks` and `half_written` in the JSON line add the kill chains' counts (a run of a chain
that printed a traceback; a kill after which the output was half-written) to the catalogue's:
`tracebacks_kills`, `half_written_kills` give that part alone.

Output: a line per kill and per case as they happen, the stderr tail of every failing case, a
table (one line per case: name, rc, verdict), then last line
{"bench": "faults", "kills": ..., "identical": true|false, "bad_inputs": ..., "one_line_errors":
..., "tracebacks": ..., "half_written": ..., "kills_landed": ..., "recovered": ..., "skipped":
..., "cases_failed": [...], "seconds": ...}. Aim: identical true, tracebacks 0, half_written 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = "pipeline.stages"  # one module per stage: python -m pipeline.stages.<name>
PY = sys.executable
LANGS = ("en", "de", "ru", "zh")
CHILD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}
os.environ.update(CHILD_ENV)  # this process builds a few fixtures with the library too
ENV = dict(os.environ)
STAGE_TIMEOUT = 900  # seconds: no single run of these tiny stages comes near it
TS_TIMING = ("train_seconds", "train_tokens_per_s", "resumed_from_step")

_print_lock = threading.Lock()


def say(*parts: Any) -> None:
    with _print_lock:
        print(*parts, flush=True)


# -- params -------------------------------------------------------------------------------------


def base_params(corpus: Path) -> dict[str, Any]:
    """Every section a stage here reads, with tiny sizes; cases override single keys."""
    return {
        "corpus": {"path": str(corpus), "languages": list(LANGS), "validation_fraction": 0.1},
        "teacher": {
            "model": "builtin",
            "vocab_size": 1024,
            "hidden_size": 64,
            "num_layers": 1,
            "num_heads": 2,
            "intermediate_size": 128,
            "max_position_embeddings": 256,
            "seq_len": 64,
            "batch_size": 16,
            "steps": 30,
            "warmup_steps": 3,
            "seed": 0,
            "threads": 1,
        },
        "tokenize": {"seq_len": 64, "num_proc": 1, "seed": 0},
        "teacher_logits": {
            "method": "sample",
            "k": 16,
            "seed": 0,
            "batch_size": 8,
            "device": "cpu",
            "dtype": "auto",
            "chunk_sequences": 8,
            "shard_chunks": 1,
            "head_chunk_tokens": 512,
        },
        "train_student": {
            "num_layers": 1,
            "hidden_size": 64,
            "num_heads": 2,
            "intermediate_size": 128,
            "steps": 150,
            "batch_size": 16,
            "warmup_steps": 10,
            "eval_every": 50,
            "eval_sequences": 32,
            "checkpoint_every": 5,
            "log_every": 10,
            "seed": 0,
            "device": "cpu",
        },
        "compress": {"quantize": True, "quantize_embeddings": True, "zstd_level": 3},
        "evaluate": {
            "batch_size": 8,
            "max_sequences": 8,
            "throughput_sequences": 4,
            "throughput_repeats": 1,
            "threads": 1,
        },
    }


SMALL_STUDENT = {  # train_student cases on the small store: a few seconds of training
    "steps": 20,
    "batch_size": 8,
    "warmup_steps": 2,
    "eval_every": 0,
    "checkpoint_every": 0,
    "log_every": 5,
}


def merged(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def write_params(path: Path, params: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params, sort_keys=False), "utf-8")
    return path


# -- running ------------------------------------------------------------------------------------


def stage(name: str, params: Path, *flags: str, **paths: Any) -> list[str]:
    """`python -m pipeline.stages.<name> --params P --key value ...` (underscores in keys become
    dashes)."""
    cmd = [PY, "-m", f"{STAGES}.{name}", "--params", str(params)]
    for key, value in paths.items():
        for v in value if isinstance(value, list) else [value]:
            cmd += [f"--{key.replace('_', '-')}", str(v)]
    return cmd + list(flags)


def cli(*args: Any) -> list[str]:
    return [PY, "-m", "pipeline.cli", *map(str, args)]


@dataclass
class Ran:
    rc: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False


def run(cmd: list[str], cwd: Path, timeout: float = STAGE_TIMEOUT) -> Ran:
    """Run to completion in a new session (its process group is killed on a timeout)."""
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_group(proc)
        out, err = proc.communicate()
    return Ran(proc.returncode, out, err, time.monotonic() - start, timed_out)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of `proc` (started with start_new_session), before reaping it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def must(ran: Ran, what: str) -> Ran:
    if ran.rc != 0:
        raise SystemExit(f"setup failed: {what} exited {ran.rc}:\n{ran.stderr[-3000:]}")
    return ran


def run_until(cmd: list[str], cwd: Path, ready: Callable[[], bool], log: Path, timeout=600) -> bool:
    """Start `cmd`, SIGKILL its group as soon as `ready()`; False if it ended first."""
    with open(log, "w") as err:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=ENV, stdout=err, stderr=err, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if ready():
                kill_group(proc)
                proc.wait()
                return True
            time.sleep(0.02)
        if proc.poll() is None:
            kill_group(proc)
        proc.wait()
        return False


# -- reading outputs ----------------------------------------------------------------------------

LOG_LINE = re.compile(r"^(DEBUG|INFO|WARNING) [\w.]+: ")
PROGRESS = re.compile(r"\d+%\||\[\d+:\d+<")
PY_WARNING = re.compile(r"^\S.*:\d+: \w*Warning: ")


def classify_stderr(text: str) -> dict[str, list[str]]:
    """Split stderr into what a terminal shows: log lines, progress bars, Python warnings, and
    the rest (`other`: what must be exactly one `error:` line)."""
    kinds: dict[str, list[str]] = {"log": [], "progress": [], "warning": [], "other": []}
    after_warning = False
    for raw in text.split("\n"):
        line = raw.split("\r")[-1].rstrip()
        if not line.strip():
            continue
        if LOG_LINE.match(line):
            kind = "log"
        elif PROGRESS.search(line):
            kind = "progress"
        elif PY_WARNING.match(line) or (after_warning and line[:1].isspace()):
            kind = "warning"
        else:
            kind = "other"
        after_warning = kind == "warning"
        kinds[kind].append(line)
    return kinds


def has_traceback(*texts: str) -> bool:
    return any("Traceback (most recent call last)" in t for t in texts)


LEFTOVER = re.compile(r"\.partial|\.old-\d+$|\.tmp(-\d+)?$")


def leftovers(paths: list[Path]) -> list[str]:
    """`.partial*`, `.old-<pid>` and `.tmp` entries next to any of `paths`."""
    found: set[str] = set()
    for parent in {p.parent for p in paths}:
        try:
            entries = list(parent.iterdir())
        except OSError:
            continue
        found |= {str(e) for e in entries if LEFTOVER.search(e.name)}
    return sorted(found)


def existing(paths: list[Path]) -> list[str]:
    return [str(p) for p in paths if p.exists() or p.is_symlink()]


def tree_bytes(root: Path, skip: Callable[[str], bool] = lambda name: False) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not skip(str(p.relative_to(root)))
    }


def tree_diff(a: dict[str, bytes], b: dict[str, bytes]) -> list[str]:
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def drop_keys(obj: Any, names: tuple[str, ...]) -> Any:
    """`obj` without dict entries whose key contains any of `names`, recursively."""
    if isinstance(obj, dict):
        return {k: drop_keys(v, names) for k, v in obj.items() if not any(n in k for n in names)}
    return obj


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None


# -- setup --------------------------------------------------------------------------------------


@dataclass
class Ctx:
    root: Path
    params: dict
    jobs: int
    teacher: Path = Path()
    tokenized: Path = Path()
    store: Path = Path()
    store_metrics: Path = Path()
    student: Path = Path()
    student_metrics: Path = Path()
    student_live: Path = Path()
    r_tl: float = 0.0
    r_ts: float = 0.0
    small_tokenized: Path = Path()
    foreign_tokenized: Path = Path()
    small_store: Path = Path()
    compressed: Path = Path()
    other_tokenizer: Path = Path()

    def params_file(self, folder: Path, overrides: dict | None = None) -> Path:
        return write_params(folder / "params.yaml", merged(self.params, overrides or {}))


def default_corpus() -> Path:
    for path in (REPO.parent / "shared" / "corpora" / "sample", REPO / "data/corpora/sample"):
        if all((path / f"{lang}.txt").is_file() for lang in LANGS):
            return path
    raise SystemExit("no sample corpus found (../shared/corpora/sample or data/corpora/sample)")


def write_corpus(dst: Path, src: Path, lines: int, langs=LANGS) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for lang in langs:
        text = (src / f"{lang}.txt").read_text("utf-8").splitlines()[:lines]
        (dst / f"{lang}.txt").write_text("".join(t + "\n" for t in text), "utf-8")
    return dst


def tl_cmd(params: Path, folder: Path, **over: Any) -> list[str]:
    """teacher_logits with dvc.yaml's flags (`teacher`, `tokenized` in `over`); outputs in
    `folder` unless overridden."""
    paths = {
        "teacher": None,
        "tokenized": None,
        "out": folder / "out" / "teacher.zarr",
        "metrics": folder / "teacher_logits.json",
        "work_dir": folder / "work",
        **over,
    }
    return stage("teacher_logits", params, **paths)


def ts_cmd(params: Path, ctx: Ctx, folder: Path, **over: Any) -> list[str]:
    """train_student with dvc.yaml's flags; outputs in `folder` unless overridden."""
    paths = {
        "tokenized": ctx.tokenized,
        "logits": ctx.store,
        "tokenizer": ctx.teacher,
        "out": folder / "student",
        "metrics": folder / "student.json",
        "checkpoints": folder / "work",
        "live_dir": folder / "dvclive",
        **over,
    }
    return stage("train_student", params, "--no-progress", **paths)


def setup(ctx: Ctx, corpus_src: Path, lines: int) -> None:
    root = ctx.root / "setup"
    corpus = write_corpus(root / "corpus", corpus_src, lines)
    ctx.params = base_params(corpus)
    params = ctx.params_file(root)
    ctx.teacher = root / "models" / "teacher"
    ran = must(
        run(
            stage(
                "prepare_teacher",
                params,
                out=ctx.teacher,
                metrics=root / "reports" / "teacher.json",
            ),
            ctx.root,
        ),
        "prepare_teacher",
    )
    say(f"setup: prepare_teacher {ran.seconds:.1f} s")
    ctx.tokenized = root / "data" / "tokenized"
    ran = must(
        run(
            stage(
                "tokenize_corpus",
                params,
                teacher=ctx.teacher,
                out=ctx.tokenized,
                metrics=root / "reports" / "tokenize.json",
            ),
            ctx.root,
        ),
        "tokenize",
    )
    counts = read_json(root / "reports" / "tokenize.json") or {}
    total = counts.get("total", {})
    say(
        f"setup: tokenize {ran.seconds:.1f} s ({total.get('train_sequences')} train + "
        f"{total.get('validation_sequences')} validation rows of 64 tokens)"
    )
    ref = ctx.root / "reference"
    ran = must(
        run(tl_cmd(params, ref / "tl", teacher=ctx.teacher, tokenized=ctx.tokenized), ctx.root),
        "tl ref",
    )
    ctx.store = ref / "tl" / "out" / "teacher.zarr"
    ctx.store_metrics = ref / "tl" / "teacher_logits.json"
    ctx.r_tl = ran.seconds
    shards = sum(1 for _ in ctx.store.glob("*/ids/c/*/*/*"))
    say(f"setup: teacher_logits reference {ran.seconds:.1f} s ({shards} shards)")
    ran = must(run(ts_cmd(params, ctx, ref / "ts"), ctx.root), "train_student reference")
    ctx.student, ctx.student_metrics = ref / "ts" / "student", ref / "ts" / "student.json"
    ctx.student_live = ref / "ts" / "dvclive"
    ctx.r_ts = ran.seconds
    say(f"setup: train_student reference {ran.seconds:.1f} s")


def setup_fixtures(ctx: Ctx) -> None:
    """Small inputs for the catalogue (built with the library and the real stages)."""
    import numpy as np

    from pipeline.data.tokenized import load_tokenized, write_tokenized

    root = ctx.root / "fixtures"
    root.mkdir(parents=True, exist_ok=True)
    data = load_tokenized(ctx.tokenized)

    def rows(split: str, n: int) -> tuple[np.ndarray, list[str]]:
        s = data[split]
        langs = s.langs() if callable(s.langs) else s.langs
        return np.ascontiguousarray(s.input_ids[:n]), list(langs[:n])

    ctx.small_tokenized = root / "small-tokenized"
    write_tokenized(
        {"train": rows("train", 32), "validation": rows("validation", 16)}, ctx.small_tokenized
    )
    # "another tokenizer": ids of a 4096-token vocabulary, the teacher has 1024
    rng = np.random.default_rng(0)
    ctx.foreign_tokenized = root / "foreign-tokenized"
    write_tokenized(
        {
            s: (rng.integers(0, 4096, (n, 64), dtype=np.int32), ["en"] * n)
            for s, n in (("train", 32), ("validation", 16))
        },
        ctx.foreign_tokenized,
    )
    ctx.other_tokenizer = root / "other-tokenizer"
    _wordlevel_tokenizer(ctx.other_tokenizer, 1024)
    params = ctx.params_file(root)
    ran = must(
        run(
            tl_cmd(params, root / "small", teacher=ctx.teacher, tokenized=ctx.small_tokenized),
            ctx.root,
        ),
        "small store",
    )
    ctx.small_store = root / "small" / "out" / "teacher.zarr"
    ran2 = must(
        run(
            stage(
                "compress",
                params,
                student=ctx.student,
                out=root / "compressed",
                metrics=root / "compress.json",
            ),
            ctx.root,
        ),
        "compress",
    )
    ctx.compressed = root / "compressed"
    say(f"fixtures: small store {ran.seconds:.1f} s, compressed student {ran2.seconds:.1f} s")


def _wordlevel_tokenizer(path: Path, vocab: int) -> None:
    """A tokenizer with `vocab` ids that is not the teacher's (as tests/store_fixtures.py)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"[UNK]": 0, "</s>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>"
    ).save_pretrained(path)


# -- kill chains --------------------------------------------------------------------------------


@dataclass
class Chain:
    name: str
    kills: int = 0
    landed: int = 0
    half_written: list[str] = field(default_factory=list)
    tracebacks: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    identical: bool = False
    differences: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    final_seconds: float = 0.0
    passes: int = 0
    note: str = ""


def kill_chain(
    name: str,
    cmd: list[str],
    cwd: Path,
    reference_seconds: float,
    kills: int,
    rng: random.Random,
    check: Callable[[], list[str]],
    compare: Callable[[], list[str]],
    outputs: list[Path],
    progress: Callable[[], str],
    logs: Path,
    work: Path,
) -> Chain:
    """Kill `cmd` `kills` times at random moments, re-running it each time, then let it finish;
    `check()` lists what is half-written after a kill, `compare()` how the outputs of a finished
    run differ from the reference. A run that finishes before its kill is compared, then its work
    folder deleted, so that the next run computes again (over the finished output) instead of
    finding its finished record."""
    chain = Chain(name)
    logs.mkdir(parents=True, exist_ok=True)
    high = max(0.6, 0.9 * reference_seconds)
    for i in range(kills):
        wait = rng.uniform(0.5, high)
        log = logs / f"{name}-{i:02d}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                cmd, cwd=cwd, env=ENV, stdout=out, stderr=out, start_new_session=True
            )
            try:
                rc = proc.wait(timeout=wait)
                landed = False
            except subprocess.TimeoutExpired:
                kill_group(proc)
                rc = proc.wait()
                landed = True
        chain.kills += 1
        chain.landed += landed
        text = log.read_text(errors="replace")
        what = f"{name} run {i + 1}"
        if has_traceback(text):
            chain.tracebacks.append(f"{what}: {_tail(text)}")
        if not landed and rc != 0:
            chain.errors.append(f"{what} exited {rc} before its kill: {_tail(text)}")
        state, bad = "killed", []
        if landed:
            bad = check()
            chain.half_written += [f"after kill {i + 1}: {b}" for b in bad]
        else:
            state = f"finished before the kill (rc {rc})"
            if rc == 0:  # a complete pass: compare it, then make the next run compute again
                chain.passes += 1
                diff = compare()
                chain.differences += [f"after {what}: {d}" for d in diff]
                state += f", {'identical' if not diff else 'DIFFERS'}; work folder deleted"
        say(
            f"  {name} kill {i + 1:2d}/{kills} at {wait:5.1f} s: {state}; {progress()}"
            + (f"; HALF-WRITTEN: {bad}" if bad else "")
        )
        if not landed and rc == 0:
            shutil.rmtree(work, ignore_errors=True)
    log = logs / f"{name}-final.log"
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=ENV, stdout=out, stderr=out, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=max(STAGE_TIMEOUT, 10 * reference_seconds))
        except subprocess.TimeoutExpired:
            kill_group(proc)
            rc = proc.wait()
            chain.errors.append(f"{name} final run timed out")
    chain.final_seconds = time.monotonic() - start
    text = log.read_text(errors="replace")
    if has_traceback(text):
        chain.tracebacks.append(f"{name} final run: {_tail(text)}")
    if rc != 0:
        chain.errors.append(f"{name} final run exited {rc}: {_tail(text)}")
    chain.passes += rc == 0
    chain.differences += compare()
    chain.identical = rc == 0 and not chain.differences
    chain.leftovers = leftovers(outputs)
    chain.note = f"final run {chain.final_seconds:.1f} s" + (
        ", resumed" if "resuming" in text else ""
    )
    return chain


def _tail(text: str, n: int = 4) -> str:
    kinds = classify_stderr(text)
    lines = kinds["other"][-n:] or [ln for ln in text.splitlines() if ln.strip()][-n:]
    return " | ".join(ln[:300] for ln in lines)


def chain_teacher_logits(ctx: Ctx, kills: int, seed: int) -> Chain:
    folder = ctx.root / "kills" / "teacher_logits"
    params = ctx.params_file(folder)
    out, metrics = folder / "out" / "teacher.zarr", folder / "teacher_logits.json"
    reference = tree_bytes(ctx.store)
    ref_metrics = ctx.store_metrics.read_bytes()

    def check() -> list[str]:
        bad = []
        if out.exists():
            diff = tree_diff(reference, tree_bytes(out))
            if diff:
                bad.append(f"{out} differs from the reference in {len(diff)} files ({diff[:3]})")
        if metrics.exists():
            if not out.exists():
                bad.append(f"{metrics} exists without the store")
            elif metrics.read_bytes() != ref_metrics:
                bad.append(f"{metrics} differs from the reference")
        return bad

    def compare() -> list[str]:
        if not out.exists():
            return [f"{out} missing"]
        diff = [f"store file {d}" for d in tree_diff(reference, tree_bytes(out))]
        if not metrics.is_file() or metrics.read_bytes() != ref_metrics:
            diff.append(f"metrics {metrics}")
        return diff

    def progress() -> str:
        done = len(list((folder / "work").glob("*/shards/*.json")))
        return f"{done} shard records in work" + ("; store in place" if out.exists() else "")

    say(f"kill chain: teacher_logits (reference {ctx.r_tl:.1f} s)")
    return kill_chain(
        "teacher_logits",
        tl_cmd(params, folder, teacher=ctx.teacher, tokenized=ctx.tokenized),
        ctx.root,
        ctx.r_tl,
        kills,
        random.Random(seed),
        check,
        compare,
        [out, metrics],
        progress,
        folder / "logs",
        folder / "work",
    )


def _student_files(root: Path) -> dict[str, bytes]:
    return tree_bytes(root)


def _curves(live: Path) -> dict[str, Any]:
    files: dict[str, Any] = {
        k: v
        for k, v in tree_bytes(live / "plots" / "metrics").items()
        if not k.endswith("tokens_per_s.tsv")
    }
    files["metrics.json"] = drop_keys(read_json(live / "metrics.json"), ("tokens_per_s",))
    return files


def chain_train_student(ctx: Ctx, kills: int, seed: int) -> Chain:
    folder = ctx.root / "kills" / "train_student"
    params = ctx.params_file(folder)
    out, metrics, live = folder / "student", folder / "student.json", folder / "dvclive"
    reference = _student_files(ctx.student)
    ref_metrics = drop_keys(read_json(ctx.student_metrics), TS_TIMING)
    ref_curves = _curves(ctx.student_live)

    def check() -> list[str]:
        bad = []
        if out.exists():
            diff = tree_diff(reference, _student_files(out))
            if diff:
                bad.append(f"{out} differs from the reference in {diff[:3]}")
        if metrics.exists():
            if not out.exists():
                bad.append(f"{metrics} exists without the student")
            elif drop_keys(read_json(metrics), TS_TIMING) != ref_metrics:
                bad.append(f"{metrics} differs from the reference")
        return bad

    def compare() -> list[str]:
        if not out.exists():
            return [f"{out} missing"]
        diff = [f"student file {d}" for d in tree_diff(reference, _student_files(out))]
        got = drop_keys(read_json(metrics), TS_TIMING)
        if got != ref_metrics:
            keys = sorted(k for k in (got or {}).keys() | ref_metrics.keys()
                          if (got or {}).get(k) != ref_metrics.get(k))  # fmt: skip
            diff.append(f"metrics fields {keys}")
        curves = _curves(live)
        diff += [
            f"curve {k}"
            for k in sorted(curves.keys() | ref_curves.keys())
            if curves.get(k) != ref_curves.get(k)
        ]
        return diff

    def progress() -> str:
        ck = sorted(p.name for p in (folder / "work").glob("*/*.pt"))
        return f"checkpoints {ck or 'none'}" + ("; student in place" if out.exists() else "")

    say(f"kill chain: train_student (reference {ctx.r_ts:.1f} s)")
    chain = kill_chain(
        "train_student",
        ts_cmd(params, ctx, folder),
        ctx.root,
        ctx.r_ts,
        kills,
        random.Random(seed + 1),
        check,
        compare,
        [out, metrics],
        progress,
        folder / "logs",
        folder / "work",
    )
    got = read_json(metrics) or {}
    chain.note = (
        f"final run {chain.final_seconds:.1f} s, resumed from step {got.get('resumed_from_step')}"
    )
    return chain


# -- the catalogue ------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    expect: str  # error | problems | recovered
    rc: int | None = None
    traceback: bool = False
    one_line: bool = False
    ok: bool = False
    half_written: list[str] = field(default_factory=list)
    skipped: str = ""
    verdict: str = ""
    tail: str = ""
    seconds: float = 0.0


def excerpt(lines: list[str], head: int = 2, tail: int = 4) -> str:
    """The first `head` and last `tail` lines (all of them if that is no fewer)."""
    if len(lines) > head + tail:
        lines = [*lines[:head], f"... ({len(lines) - head - tail} more lines)", *lines[-tail:]]
    return "\n".join(lines)


def judge_error(name: str, ran: Ran, outputs: list[Path], expect_rc: int = 1) -> Result:
    """An `error` case: exit `expect_rc`, one clean `error:` line, no output left behind."""
    r = Result(name, "error", ran.rc, has_traceback(ran.stderr, ran.stdout), seconds=ran.seconds)
    kinds = classify_stderr(ran.stderr)
    other = kinds["other"]
    r.one_line = len(other) == 1 and other[0].startswith("error: ")
    r.half_written = existing(outputs) + leftovers(outputs)
    r.tail = excerpt(other or ran.stderr.strip().splitlines())
    problems = []
    if ran.timed_out:
        problems.append("timed out")
    if r.traceback:
        problems.append("traceback")
    if ran.rc == 0:
        problems.append("exit 0 (expected an error)")
    elif ran.rc != expect_rc:
        problems.append(f"exit {ran.rc} (expected {expect_rc})")
    if not r.one_line:
        if not other:
            problems.append("no error line")
        elif not other[-1].startswith("error: "):
            problems.append("last line is not `error:`")
        if len(other) > 1:
            problems.append(f"{len(other)} non-log lines")
    if r.half_written:
        problems.append(f"half-written: {', '.join(r.half_written)}")
    r.ok = not problems
    note = f" (+{len(kinds['warning'])} Python warning lines)" if kinds["warning"] else ""
    r.verdict = ("ok: one-line error" if r.ok else "FAIL: " + "; ".join(problems)) + note
    if r.ok:
        r.verdict += ": " + other[0][7:][:110]
    return r


def judge_problems(name: str, ran: Ran) -> Result:
    """`softlabels verify` on a damaged store: exit 1, `N problem(s):` and the list on stdout."""
    r = Result(name, "problems", ran.rc, has_traceback(ran.stderr, ran.stdout), seconds=ran.seconds)
    listed = re.search(r"^\S.*: (\d+) problem\(s\):$", ran.stdout, re.M)
    other = classify_stderr(ran.stderr)["other"]
    r.one_line = ran.rc == 1 and listed is not None and not other
    r.ok = r.one_line and not r.traceback
    r.tail = excerpt(ran.stdout.strip().splitlines() + other)
    if r.ok:
        first = ran.stdout.strip().splitlines()[1].strip() if listed else ""
        r.verdict = f"ok: exit 1, {listed.group(1)} problem(s): {first[:90]}"
    else:
        r.verdict = "FAIL: " + (
            "traceback" if r.traceback else f"exit {ran.rc}, problems listed: {bool(listed)}"
        )
    return r


def judge_recovered(
    name: str, ran: Ran, outputs: list[Path], aside_in: Path, metrics: Path
) -> Result:
    """A `recovered` case: exit 0, complete outputs, the damaged file set aside next to it."""
    r = Result(
        name, "recovered", ran.rc, has_traceback(ran.stderr, ran.stdout), seconds=ran.seconds
    )
    aside = sorted(p.name for p in aside_in.rglob("*.damaged*"))
    missing = [str(p) for p in outputs if not p.exists()]
    r.half_written = leftovers(outputs)
    kinds = classify_stderr(ran.stderr)
    r.tail = excerpt(kinds["other"] or ran.stderr.strip().splitlines())
    problems = []
    if r.traceback:
        problems.append("traceback")
    if ran.rc != 0:
        problems.append(f"exit {ran.rc}")
    if missing:
        problems.append(f"missing outputs {missing}")
    if not aside:
        problems.append("nothing set aside (*.damaged*)")
    if r.half_written:
        problems.append(f"left behind: {', '.join(r.half_written)}")
    r.ok = not problems
    step = (read_json(metrics) or {}).get("resumed_from_step")
    r.verdict = (
        f"ok: recovered (resumed from step {step}; set aside {', '.join(aside)})"
        if r.ok
        else "FAIL: " + "; ".join(problems)
    )
    return r


def skipped(name: str, expect: str, why: str) -> Result:
    return Result(name, expect, skipped=why, verdict=f"skipped: {why}")


CASES: list[tuple[str, str, Callable[[Ctx, Path], Result]]] = []


def case(name: str, description: str):
    def register(fn: Callable[[Ctx, Path], Result]):
        CASES.append((name, description, fn))
        return fn

    return register


# tokenize: corpus and params problems --------------------------------------------------------


def tokenize_case(ctx: Ctx, d: Path, overrides: dict | None = None, params: Path | None = None,
                  name: str = "", teacher: Path | None = None) -> Result:  # fmt: skip
    params = params or ctx.params_file(d, overrides)
    outputs = [d / "tokenized", d / "tokenize.json"]
    cmd = stage(
        "tokenize_corpus",
        params,
        teacher=teacher or ctx.teacher,
        out=outputs[0],
        metrics=outputs[1],
    )
    return judge_error(name, run(cmd, ctx.root), outputs)


def corpus_with(d: Path, files: dict[str, bytes], ctx: Ctx) -> Path:
    """A corpus folder: de.txt from the sample corpus plus `files` (name: bytes)."""
    root = d / "corpus"
    root.mkdir(parents=True, exist_ok=True)
    src = Path(ctx.params["corpus"]["path"])
    shutil.copyfile(src / "de.txt", root / "de.txt")
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


def sample_bytes(ctx: Ctx, lang: str = "en", n: int = 40) -> bytes:
    src = Path(ctx.params["corpus"]["path"]) / f"{lang}.txt"
    return b"".join(line + b"\n" for line in src.read_bytes().splitlines()[:n])


@case("tokenize_missing_corpus", "corpus.path does not exist")
def _(ctx, d):
    over = {"corpus": {"path": str(d / "no-such-corpus")}}
    return tokenize_case(ctx, d, over, name="tokenize_missing_corpus")


@case("tokenize_empty_corpus_file", "en.txt is empty")
def _(ctx, d):
    root = corpus_with(d, {"en.txt": b""}, ctx)
    over = {"corpus": {"path": str(root), "languages": ["en", "de"]}}
    return tokenize_case(ctx, d, over, name="tokenize_empty_corpus_file")


@case("tokenize_invalid_utf8", "a line of en.txt is not UTF-8 (on_invalid_utf8: error)")
def _(ctx, d):
    lines = sample_bytes(ctx).splitlines(keepends=True)
    data = b"".join(lines[:3] + [b"caf\xe9 \xff\xfe au lait\n"] + lines[3:])
    root = corpus_with(d, {"en.txt": data}, ctx)
    over = {"corpus": {"path": str(root), "languages": ["en", "de"], "on_invalid_utf8": "error"}}
    return tokenize_case(ctx, d, over, name="tokenize_invalid_utf8")


@case("tokenize_binary_as_txt", "en.txt is 16 KB of random bytes (a binary renamed .txt)")
def _(ctx, d):
    root = corpus_with(d, {"en.txt": random.Random(0).randbytes(16384)}, ctx)
    over = {"corpus": {"path": str(root), "languages": ["en", "de"]}}
    return tokenize_case(ctx, d, over, name="tokenize_binary_as_txt")


def _jsonl(ctx: Ctx, n: int = 30) -> list[str]:
    return [
        json.dumps({"text": t.decode(), "lang": lang}, ensure_ascii=False)
        for lang in ("en", "de")
        for t in sample_bytes(ctx, lang, n).splitlines()
    ]


@case("tokenize_malformed_jsonl", "corpus.jsonl with a cut-off record in the middle")
def _(ctx, d):
    d.mkdir(parents=True, exist_ok=True)
    lines = _jsonl(ctx)
    lines.insert(20, lines[20][: len(lines[20]) // 2])
    (d / "corpus.jsonl").write_text("\n".join(lines) + "\n", "utf-8")
    over = {"corpus": {"path": str(d / "corpus.jsonl"), "languages": ["en", "de"]}}
    return tokenize_case(ctx, d, over, name="tokenize_malformed_jsonl")


@case("tokenize_jsonl_without_lang", "corpus.jsonl records lack the `lang` field")
def _(ctx, d):
    d.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": json.loads(x)["text"]}) for x in _jsonl(ctx)]
    (d / "corpus.jsonl").write_text("\n".join(lines) + "\n", "utf-8")
    over = {"corpus": {"path": str(d / "corpus.jsonl"), "languages": ["en", "de"]}}
    return tokenize_case(ctx, d, over, name="tokenize_jsonl_without_lang")


@case("tokenize_malformed_parquet", "corpus.parquet: parquet magic around random bytes")
def _(ctx, d):
    d.mkdir(parents=True, exist_ok=True)
    (d / "corpus.parquet").write_bytes(b"PAR1" + random.Random(1).randbytes(4096) + b"PAR1")
    over = {"corpus": {"path": str(d / "corpus.parquet"), "languages": ["en", "de"]}}
    return tokenize_case(ctx, d, over, name="tokenize_malformed_parquet")


@case("tokenize_parquet_wrong_columns", "corpus.parquet with columns body/language")
def _(ctx, d):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d.mkdir(parents=True, exist_ok=True)
    texts = [json.loads(x)["text"] for x in _jsonl(ctx)]
    table = pa.table({"body": texts, "language": ["en"] * len(texts)})
    pq.write_table(table, d / "corpus.parquet")
    over = {"corpus": {"path": str(d / "corpus.parquet"), "languages": ["en"]}}
    return tokenize_case(ctx, d, over, name="tokenize_parquet_wrong_columns")


@case("tokenize_unknown_language", "corpus.languages names xx, which has no data")
def _(ctx, d):
    over = {"corpus": {"languages": ["en", "xx"]}}
    return tokenize_case(ctx, d, over, name="tokenize_unknown_language")


@case("params_wrong_type", "tokenize.seq_len: 'sixty-four'")
def _(ctx, d):
    return tokenize_case(ctx, d, {"tokenize": {"seq_len": "sixty-four"}}, name="params_wrong_type")


@case("params_unknown_key", "tokenize.seqlen (a typo)")
def _(ctx, d):
    return tokenize_case(ctx, d, {"tokenize": {"seqlen": 64}}, name="params_unknown_key")


@case("params_negative", "tokenize.seq_len: -64")
def _(ctx, d):
    return tokenize_case(ctx, d, {"tokenize": {"seq_len": -64}}, name="params_negative")


@case("params_not_yaml", "the params file is not YAML")
def _(ctx, d):
    d.mkdir(parents=True, exist_ok=True)
    bad = d / "params.yaml"
    bad.write_text("tokenize: [seq_len: 64\n  alpha: {0.5\n", "utf-8")
    return tokenize_case(ctx, d, params=bad, name="params_not_yaml")


@case("params_missing_file", "--params names a file that does not exist")
def _(ctx, d):
    d.mkdir(parents=True, exist_ok=True)
    return tokenize_case(ctx, d, params=d / "no-such-params.yaml", name="params_missing_file")


@case("params_missing_section", "the params file has no `tokenize` section")
def _(ctx, d):
    params = write_params(d / "params.yaml", {"corpus": ctx.params["corpus"]})
    return tokenize_case(ctx, d, params=params, name="params_missing_section")


@case("tokenize_seq_len_over_context", "tokenize.seq_len 512 > the teacher's context 256")
def _(ctx, d):
    over = {"tokenize": {"seq_len": 512}}
    return tokenize_case(ctx, d, over, name="tokenize_seq_len_over_context")


@case("tokenize_teacher_without_tokenizer", "--teacher folder without tokenizer files")
def _(ctx, d):
    teacher = Path(shutil.copytree(ctx.teacher, d / "teacher"))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (teacher / f).unlink(missing_ok=True)
    return tokenize_case(ctx, d, name="tokenize_teacher_without_tokenizer", teacher=teacher)


# teacher_logits: teacher folder, k, data, output path ------------------------------------------


def tl_case(ctx: Ctx, d: Path, name: str, overrides: dict | None = None, *,
            wrap: Callable[[list[str]], list[str]] | None = None, **over: Any) -> Result:  # fmt: skip
    """teacher_logits on the small tokenized data with the teacher, unless `over` says other."""
    params = ctx.params_file(d, overrides)
    paths = {"teacher": ctx.teacher, "tokenized": ctx.small_tokenized, **over}
    cmd = tl_cmd(params, folder=d, **paths)
    ran = run(wrap(cmd) if wrap else cmd, ctx.root)
    out = Path(over.get("out", d / "out" / "teacher.zarr"))
    metrics = Path(over.get("metrics", d / "teacher_logits.json"))
    return judge_error(name, ran, [out, metrics])


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _drop_vocab_size(provenance: Path) -> None:
    prov = json.loads(provenance.read_text("utf-8"))
    del prov["vocab_size"]
    provenance.write_text(json.dumps(prov), "utf-8")


TEACHER_DAMAGE: list[tuple[str, str, str, Callable[[Path], None]]] = [
    ("tl_teacher_without_provenance", "teacher folder without provenance.json",
     "provenance.json", Path.unlink),
    ("tl_provenance_not_json", "provenance.json is not JSON",
     "provenance.json", lambda f: f.write_text('{"name": "builtin", "sha256": ', "utf-8")),
    ("tl_provenance_incomplete", "provenance.json without vocab_size",
     "provenance.json", _drop_vocab_size),
    ("tl_provenance_not_an_object", "provenance.json holds a JSON list",
     "provenance.json", lambda f: f.write_text("[1, 2, 3]", "utf-8")),
    ("tl_teacher_without_weights", "teacher folder whose model.safetensors is gone",
     "model.safetensors", Path.unlink),
    ("tl_teacher_truncated_weights", "teacher model.safetensors cut in half",
     "model.safetensors", _truncate),
]  # fmt: skip
"""teacher_logits on a copy of the teacher with one file damaged: (case, description, file, how)."""


def _damaged_teacher_case(name: str, file: str, damage: Callable[[Path], None]):
    def run_case(ctx: Ctx, d: Path) -> Result:
        teacher = Path(shutil.copytree(ctx.teacher, d / "teacher"))
        damage(teacher / file)
        return tl_case(ctx, d, name, teacher=teacher)

    return run_case


for _name, _description, _file, _damage in TEACHER_DAMAGE:
    case(_name, _description)(_damaged_teacher_case(_name, _file, _damage))


@case("tl_k_over_vocab", "teacher_logits.k 100000 > the vocabulary (1024)")
def _(ctx, d):
    return tl_case(ctx, d, "tl_k_over_vocab", {"teacher_logits": {"k": 100000}})


@case("tl_k_negative", "teacher_logits.k: -4")
def _(ctx, d):
    return tl_case(ctx, d, "tl_k_negative", {"teacher_logits": {"k": -4}})


@case("tl_tokenized_other_tokenizer", "tokenized ids from a 4096-token tokenizer")
def _(ctx, d):
    return tl_case(ctx, d, "tl_tokenized_other_tokenizer", tokenized=ctx.foreign_tokenized)


@case("tl_tokenized_missing", "--tokenized folder does not exist")
def _(ctx, d):
    return tl_case(ctx, d, "tl_tokenized_missing", tokenized=d / "no-such-tokenized")


@case("tl_tokenized_not_a_dataset", "--tokenized is a folder of text files")
def _(ctx, d):
    (d / "tok").mkdir(parents=True)
    (d / "tok" / "dataset_dict.json").write_text("not json", "utf-8")
    (d / "tok" / "train").mkdir()
    return tl_case(ctx, d, "tl_tokenized_not_a_dataset", tokenized=d / "tok")


@case("tl_out_under_a_file", "--out somefile/x.zarr (a parent is a regular file)")
def _(ctx, d):
    d.mkdir(parents=True, exist_ok=True)
    (d / "somefile").write_text("a file, not a folder\n")
    return tl_case(ctx, d, "tl_out_under_a_file", out=d / "somefile" / "x.zarr")


@case("tl_readonly_output_folder", "output and metrics in a folder chmod 0o555")
def _(ctx, d):
    ro = d / "ro"
    ro.mkdir(parents=True)
    wrap = None
    if os.geteuid() == 0:  # root ignores permissions: run it without the capabilities that do
        capsh = shutil.which("capsh")
        if capsh is None:
            return skipped("tl_readonly_output_folder", "error", "root without capsh")
        drop = "--drop=cap_dac_override,cap_dac_read_search,cap_fowner"
        ro.chmod(0o555)
        probe = subprocess.run(
            [capsh, drop, "--", "-c", f"touch {shlex.quote(str(ro / 'probe'))}"],
            capture_output=True,
        )
        if probe.returncode == 0:
            ro.chmod(0o755)
            return skipped("tl_readonly_output_folder", "error", "capsh could not drop DAC caps")

        def wrap(cmd: list[str]) -> list[str]:
            return [capsh, drop, "--", "-c", shlex.join(cmd)]

    ro.chmod(0o555)
    try:
        return tl_case(ctx, d, "tl_readonly_output_folder", wrap=wrap,
                       out=ro / "teacher.zarr", metrics=ro / "teacher_logits.json")  # fmt: skip
    finally:
        ro.chmod(0o755)


# train_student: damaged stores, mismatched inputs, damaged checkpoints ------------------------


def ts_case(ctx: Ctx, d: Path, name: str, **over: Any) -> Result:
    params = ctx.params_file(d, {"train_student": SMALL_STUDENT})
    over = {"tokenized": ctx.small_tokenized, "logits": ctx.small_store, **over}
    cmd = ts_cmd(params, ctx, d, **over)
    outputs = [d / "student", d / "student.json", d / "dvclive"]
    return judge_error(name, run(cmd, ctx.root), outputs)


def store_copy(ctx: Ctx, d: Path) -> Path:
    return Path(shutil.copytree(ctx.small_store, d / "copy.zarr"))


def shard_file(store: Path, array: str, split: str = "train", index: int = 1) -> Path:
    from pipeline.store.format import shard_files

    return shard_files(store, split, index, (array,))[f"{split}/{array}/{index}"]


def edit_attrs(store: Path, **changes: Any) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["softlabels"].update(changes)
    (store / "zarr.json").write_text(json.dumps(meta))


@case("ts_store_deleted_shard", "store with train/extra_draws shard 1 deleted")
def _(ctx, d):
    store = store_copy(ctx, d)
    shard_file(store, "extra_draws").unlink()
    return ts_case(ctx, d, "ts_store_deleted_shard", logits=store)


@case("ts_store_truncated_shard", "store with train/ids shard 0 cut in half")
def _(ctx, d):
    store = store_copy(ctx, d)
    f = shard_file(store, "ids", index=0)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return ts_case(ctx, d, "ts_store_truncated_shard", logits=store)


@case("ts_store_flipped_bytes", "store with two bytes flipped in train/entropy shard 1")
def _(ctx, d):
    store = store_copy(ctx, d)
    f = shard_file(store, "entropy")
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    raw[len(raw) // 2 + 1] ^= 0xFF
    f.write_bytes(bytes(raw))
    return ts_case(ctx, d, "ts_store_flipped_bytes", logits=store)


@case("ts_store_attrs_k_edited", "store attributes say k=8, the arrays hold 16")
def _(ctx, d):
    store = store_copy(ctx, d)
    edit_attrs(store, k=8)
    return ts_case(ctx, d, "ts_store_attrs_k_edited", logits=store)


@case("ts_store_incomplete", "store attributes complete: false")
def _(ctx, d):
    store = store_copy(ctx, d)
    edit_attrs(store, complete=False)
    return ts_case(ctx, d, "ts_store_incomplete", logits=store)


@case("ts_store_zarr_json_garbage", "store zarr.json is not JSON")
def _(ctx, d):
    store = store_copy(ctx, d)
    (store / "zarr.json").write_text('{"zarr_format": 3, "attributes": {', "utf-8")
    return ts_case(ctx, d, "ts_store_zarr_json_garbage", logits=store)


@case("ts_store_other_token_ids", "a store made from other token ids than --tokenized")
def _(ctx, d):
    return ts_case(ctx, d, "ts_store_other_token_ids", tokenized=ctx.tokenized)


@case("ts_store_missing", "--logits does not exist")
def _(ctx, d):
    return ts_case(ctx, d, "ts_store_missing", logits=d / "no-such.zarr")


@case("ts_other_tokenizer", "--tokenizer is another tokenizer with the same vocabulary size")
def _(ctx, d):
    return ts_case(ctx, d, "ts_other_tokenizer", tokenizer=ctx.other_tokenizer)


@case("ts_bad_param", "train_student.alpha: 2")
def _(ctx, d):
    params = ctx.params_file(d, {"train_student": {**SMALL_STUDENT, "alpha": 2}})
    cmd = ts_cmd(params, ctx, d, tokenized=ctx.small_tokenized, logits=ctx.small_store)
    return judge_error("ts_bad_param", run(cmd, ctx.root),
                       [d / "student", d / "student.json", d / "dvclive"])  # fmt: skip


def _killed_after_checkpoint(ctx: Ctx, d: Path, student: dict, need: str) -> Path | None:
    """Run train_student (checkpoint every 2 steps) until `need` (latest.pt / previous.pt)
    exists in its checkpoint folder, kill -9 it; return that folder (None if it finished)."""
    over = {**SMALL_STUDENT, "steps": 200, "checkpoint_every": 2, **student}
    params = ctx.params_file(d, {"train_student": over})
    cmd = ts_cmd(params, ctx, d, tokenized=ctx.small_tokenized, logits=ctx.small_store)

    def ready() -> bool:
        return any((d / "work").glob(f"*/{need}"))

    if not run_until(cmd, ctx.root, ready, d / "killed.log"):
        return None
    (folder,) = (d / "work").glob(f"*/{need}")
    return folder.parent


@case("ts_checkpoint_truncated", "latest.pt cut in half after a kill -9 (recovered)")
def _(ctx, d):
    name = "ts_checkpoint_truncated"
    work = _killed_after_checkpoint(ctx, d, {}, "previous.pt")
    if work is None:
        return Result(name, "recovered", verdict="FAIL: could not kill before a checkpoint")
    latest = work / "latest.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    params = d / "params.yaml"
    cmd = ts_cmd(params, ctx, d, tokenized=ctx.small_tokenized, logits=ctx.small_store)
    outs = [d / "student", d / "student.json", d / "dvclive"]
    return judge_recovered(name, run(cmd, ctx.root), outs, d / "work", d / "student.json")


@case("ts_checkpoint_other_config", "the run's latest.pt is another width's (recovered)")
def _(ctx, d):
    name = "ts_checkpoint_other_config"
    wide = {"hidden_size": 32, "intermediate_size": 64}
    other = _killed_after_checkpoint(ctx, d / "wide", wide, "latest.pt")
    work = _killed_after_checkpoint(ctx, d, {}, "latest.pt")
    if other is None or work is None:
        return Result(name, "recovered", verdict="FAIL: could not kill before a checkpoint")
    for f in work.glob("*.pt"):
        f.unlink()
    shutil.copyfile(other / "latest.pt", work / "latest.pt")
    params = d / "params.yaml"
    cmd = ts_cmd(params, ctx, d, tokenized=ctx.small_tokenized, logits=ctx.small_store)
    outs = [d / "student", d / "student.json", d / "dvclive"]
    return judge_recovered(name, run(cmd, ctx.root), outs, d / "work", d / "student.json")


# compress, evaluate ---------------------------------------------------------------------------


@case("compress_missing_model", "compress --student names no folder")
def _(ctx, d):
    params = ctx.params_file(d)
    outs = [d / "compressed", d / "compress.json"]
    cmd = stage("compress", params, student=d / "no-such-student", out=outs[0],
                metrics=outs[1])  # fmt: skip
    return judge_error("compress_missing_model", run(cmd, ctx.root), outs)


@case("compress_not_a_model", "compress --student is the store folder")
def _(ctx, d):
    params = ctx.params_file(d)
    outs = [d / "compressed", d / "compress.json"]
    cmd = stage("compress", params, student=ctx.small_store, out=outs[0], metrics=outs[1])
    return judge_error("compress_not_a_model", run(cmd, ctx.root), outs)


def evaluate_case(ctx: Ctx, d: Path, name: str, model: Path) -> Result:
    params = ctx.params_file(d)
    outs = [d / "metrics.json", d / "plots", d / "report"]
    cmd = stage(
        "evaluate",
        params,
        tokenized=ctx.small_tokenized,
        logits=ctx.small_store,
        model=[f"teacher={ctx.teacher}", f"bad={model}"],
        metrics=outs[0],
        plots=outs[1],
        report=outs[2],
    )
    return judge_error(name, run(cmd, ctx.root), outs)


@case("evaluate_missing_model", "evaluate --model bad=<no folder>")
def _(ctx, d):
    return evaluate_case(ctx, d, "evaluate_missing_model", d / "no-such-model")


@case("evaluate_manifest_outside", "compressed model whose manifest names ../outside/weights")
def _(ctx, d):
    model = Path(shutil.copytree(ctx.compressed, d / "models" / "compressed"))
    manifest = json.loads((model / "compression.json").read_text())
    weights = model / manifest["weights"]["file"]
    (d / "models" / "outside").mkdir()
    shutil.copyfile(weights, d / "models" / "outside" / weights.name)
    manifest["weights"]["file"] = f"../outside/{weights.name}"
    (model / "compression.json").write_text(json.dumps(manifest, indent=2))
    return evaluate_case(ctx, d, "evaluate_manifest_outside", model)


@case("evaluate_compressed_weights_corrupt", "compressed model with flipped weight bytes")
def _(ctx, d):
    model = Path(shutil.copytree(ctx.compressed, d / "compressed"))
    manifest = json.loads((model / "compression.json").read_text())
    w = model / manifest["weights"]["file"]
    raw = bytearray(w.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    w.write_bytes(bytes(raw))
    return evaluate_case(ctx, d, "evaluate_compressed_weights_corrupt", model)


# a full disk: the outputs on a tiny tmpfs, mounted in a private mount namespace -----------------

FULL_DISK_SH = (
    'size=$1; dir=$2; listing=$3; shift 3; mount -t tmpfs -o "size=$size" tmpfs "$dir" || exit 97'
    '; "$@"; rc=$?; ls -A "$dir" > "$listing"; exit $rc'
)


def full_disk_case(ctx: Ctx, d: Path, name: str, size: str, build) -> Result:
    """Run `build(full)` with `full` a tmpfs of `size` (only this process sees it); whatever is
    left on it afterwards (outputs, partial copies) is half-written. Skipped where a mount
    namespace cannot be made (not root, no unshare)."""
    full, listing = d / "full", d / "full-listing.txt"
    full.mkdir(parents=True)
    unshare = shutil.which("unshare")
    if unshare is None:
        return skipped(name, "error", "no unshare(1) to mount a small tmpfs")
    inner = build(full)
    cmd = [unshare, "-m", "--propagation", "private", "sh", "-c", FULL_DISK_SH, "sh", size,
           str(full), str(listing), *inner]  # fmt: skip
    ran = run(cmd, ctx.root)
    if ran.rc == 97 and not listing.exists():
        return skipped(name, "error", "cannot mount a tmpfs here: " + ran.stderr.strip()[-120:])
    r = judge_error(name, ran, [])
    left = [str(full / n) for n in listing.read_text().split()] if listing.exists() else []
    if left:
        r.half_written = left
        r.ok = False
        r.verdict = f"FAIL: half-written on the full disk: {', '.join(left)}; " + r.verdict
    return r


@case("tokenize_disk_full", "tokenize --out/--metrics on a full disk (64 KB tmpfs)")
def _(ctx, d):
    params = ctx.params_file(d)
    return full_disk_case(
        ctx,
        d,
        "tokenize_disk_full",
        "64k",
        lambda full: stage(
            "tokenize_corpus",
            params,
            teacher=ctx.teacher,
            out=full / "tokenized",
            metrics=full / "tokenize.json",
        ),  # fmt: skip
    )


@case("tl_disk_full", "teacher_logits --out/--metrics on a full disk (128 KB tmpfs)")
def _(ctx, d):
    params = ctx.params_file(d)
    return full_disk_case(
        ctx,
        d,
        "tl_disk_full",
        "128k",
        lambda full: tl_cmd(
            params,
            d,
            teacher=ctx.teacher,
            tokenized=ctx.small_tokenized,
            out=full / "teacher.zarr",
            metrics=full / "teacher_logits.json",
        ),  # fmt: skip
    )


@case("ts_disk_full", "train_student --out/--metrics on a full disk (128 KB tmpfs)")
def _(ctx, d):
    params = ctx.params_file(d, {"train_student": SMALL_STUDENT})
    return full_disk_case(
        ctx,
        d,
        "ts_disk_full",
        "128k",
        lambda full: ts_cmd(
            params,
            ctx,
            d,
            tokenized=ctx.small_tokenized,
            logits=ctx.small_store,
            out=full / "student",
            metrics=full / "student.json",
        ),  # fmt: skip
    )


# softlabels inspect / verify ------------------------------------------------------------------


@case("verify_corrupt_store", "softlabels verify on a store with flipped bytes (exit 1)")
def _(ctx, d):
    store = store_copy(ctx, d)
    f = shard_file(store, "extra_draws", index=0)
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    ran = run(cli("verify", store, "--tokenizer", ctx.teacher, "--tokenized", ctx.small_tokenized),
              ctx.root)  # fmt: skip
    return judge_problems("verify_corrupt_store", ran)


def not_a_store(d: Path) -> Path:
    folder = d / "not-a-store"
    folder.mkdir(parents=True)
    (folder / "README.txt").write_text("just a folder\n")
    return folder


@case("inspect_not_a_store", "softlabels inspect on a folder that is no store (exit 2)")
def _(ctx, d):
    ran = run(cli("inspect", not_a_store(d)), ctx.root)
    return judge_error("inspect_not_a_store", ran, [], expect_rc=2)


@case("verify_not_a_store", "softlabels verify on a folder that is no store (exit 2)")
def _(ctx, d):
    ran = run(cli("verify", not_a_store(d)), ctx.root)
    return judge_error("verify_not_a_store", ran, [], expect_rc=2)


@case("inspect_missing_path", "softlabels inspect on a path that does not exist (exit 2)")
def _(ctx, d):
    ran = run(cli("inspect", d / "no-such.zarr"), ctx.root)
    return judge_error("inspect_missing_path", ran, [], expect_rc=2)


@case("verify_tokenized_mismatch", "softlabels verify --tokenized of other token ids (exit 1)")
def _(ctx, d):
    ran = run(cli("verify", ctx.small_store, "--tokenized", ctx.tokenized), ctx.root)
    return judge_problems("verify_tokenized_mismatch", ran)


def run_catalogue(ctx: Ctx, only: list[str] | None = None) -> list[Result]:
    base = ctx.root / "inputs"
    results: dict[str, Result] = {}
    cases = [c for c in CASES if not only or c[0] in only]

    def one(index: int, name: str, description: str, fn) -> None:
        start = time.monotonic()
        try:
            r = fn(ctx, base / name)
        except Exception as e:  # a bug of the harness (or a setup step of the case)
            r = Result(name, "error", verdict=f"FAIL: harness error {type(e).__name__}: {e}")
        r.name, r.seconds = name, time.monotonic() - start
        results[name] = r
        say(f"  [{index + 1}/{len(cases)}] {name} ({description}): {r.verdict} ({r.seconds:.0f} s)")

    say(f"bad inputs: {len(cases)} cases, {ctx.jobs} at a time")
    with ThreadPoolExecutor(ctx.jobs) as pool:
        for f in [pool.submit(one, i, *c) for i, c in enumerate(cases)]:
            f.result()
    return [results[name] for name, _, _ in cases]


# -- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=20, help="kills per stage (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times (default 0)")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="work folder (must be empty or absent; default: a fresh temporary folder); "
        "deleted at the end unless --keep",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, outputs)")
    parser.add_argument(
        "--only", choices=("kills", "inputs"), help="run only the kill chains or the catalogue"
    )
    parser.add_argument(
        "--case",
        action="append",
        metavar="NAME",
        help="run only this catalogue case (repeatable; implies --only inputs)",
    )
    parser.add_argument(
        "--jobs", type=int, default=2, help="catalogue cases run at a time (default 2)"
    )
    parser.add_argument(
        "--lines",
        type=int,
        default=300,
        help="corpus lines per language (default 300: teacher_logits and train_student run "
        "about 10-20 s past their start-up)",
    )
    parser.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help="sample corpus folder (default ../shared/corpora/sample, else data/corpora/sample)",
    )
    args = parser.parse_args()
    known = [name for name, _, _ in CASES]
    for name in args.case or []:
        if name not in known:
            parser.error(f"--case {name}: no such case; the cases are: {', '.join(known)}")
    if args.case:
        args.only = "inputs"
    started = time.monotonic()
    if args.workdir is None:
        root = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    else:
        root = args.workdir.resolve()
        if root.exists() and any(root.iterdir()):
            parser.error(f"--workdir {root} is not empty")
        root.mkdir(parents=True, exist_ok=True)
    say(f"work folder: {root}")
    ctx = Ctx(root=root, params={}, jobs=max(1, args.jobs))
    chains: list[Chain] = []
    results: list[Result] = []
    try:
        setup(ctx, args.corpus or default_corpus(), args.lines)
        if args.only != "inputs":
            chains.append(chain_teacher_logits(ctx, args.kills, args.seed))
            chains.append(chain_train_student(ctx, args.kills, args.seed))
        if args.only != "kills":
            setup_fixtures(ctx)
            results = run_catalogue(ctx, args.case)
    finally:
        if args.keep:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    report(chains, results, time.monotonic() - started)


def report(chains: list[Chain], results: list[Result], seconds: float) -> None:
    ran = [r for r in results if not r.skipped]
    failed = [r for r in ran if not r.ok]
    for c in chains:
        say(
            f"kill chain {c.name}: {c.kills} kills, {c.landed} landed, {c.passes} finished runs "
            f"compared; identical: {c.identical}; {c.note}"
        )
        for what, items in (
            ("differs", c.differences),
            ("half-written", c.half_written),
            ("traceback", c.tracebacks),
            ("run error", c.errors),
            ("left behind", c.leftovers),
        ):
            for item in items[:10]:
                say(f"    {what}: {item}")
    if failed:
        say("failing cases (stderr tail):")
        for r in failed:
            say(f"  {r.name}: {r.verdict}")
            for line in r.tail.splitlines():
                say(f"      | {line[:400]}")
    if results:
        say(f"{'case':<38} {'rc':>4}  verdict")
        for r in results:
            say(f"{r.name:<38} {'-' if r.rc is None else r.rc:>4}  {r.verdict}")
    cases_failed = [r.name for r in failed]
    cases_failed += [f"kills:{c.name}" for c in chains if not c.identical or c.half_written
                     or c.tracebacks or c.errors or c.leftovers]  # fmt: skip
    tb_kills = sum(len(c.tracebacks) for c in chains)
    hw_kills = sum(len(c.half_written) + bool(c.leftovers) for c in chains)
    result = {
        "bench": "faults",
        "kills": sum(c.kills for c in chains),
        "identical": all(c.identical for c in chains) if chains else None,
        "bad_inputs": len(ran),
        "one_line_errors": sum(r.ok and r.expect in ("error", "problems") for r in ran),
        "tracebacks": sum(r.traceback for r in ran) + tb_kills,
        "half_written": sum(bool(r.half_written) for r in ran) + hw_kills,
        "kills_landed": sum(c.landed for c in chains),
        "finished_runs_compared": sum(c.passes for c in chains),
        "recovered": sum(r.ok and r.expect == "recovered" for r in ran),
        "skipped": len(results) - len(ran),
        "tracebacks_kills": tb_kills,
        "half_written_kills": hw_kills,
        "cases_failed": cases_failed,
        "seconds": round(seconds, 1),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
