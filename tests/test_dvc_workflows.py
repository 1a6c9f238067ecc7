"""End to end with real git and DVC, offline: the workflows issue 6 promises, on a tiny pipeline.

A temp directory holds a DVC remote (a plain folder standing in for shared storage) and these
git repositories, each a real `git init` + `dvc init`:

- team A: this project's dvc.yaml, pipeline/ (the stages' modules in pipeline/stages/ included)
  and a 3-language slice of the sample corpus, with tiny params; runs `dvc repro teacher_logits`,
  `dvc push --run-cache`, commits dvc.lock;
- team B: a fresh `git clone` of A with an empty cache; `dvc repro --pull` trains a student, and
  every later run and param change happens there;
- team C: another project that `dvc import`s the store, the tokenized data and the tokenizer
  files from A and trains its own student with its own params, with no code of its own: its
  stage is the installed `softlabels train-student` (examples/student-project);
- team D: like C but with its own tokenizer, which the student stage must refuse.

Every Python process DVC starts runs with `tests/read_trace/sitecustomize.py`, which records the
files each stage process opens; `test_dvc_yaml_lists_exactly_what_each_stage_reads` compares
that record with the deps DVC resolved for each stage. Paths reach DVC only through the copied
dvc.yaml, so these tests exercise the real file, not a copy of it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import pipeline
from pipeline.store.format import read_attrs
from pipeline.store.verify import content_sha256
from tests.classify_fixtures import write_sib_slice
from tests.conftest import REPO, make_tokenizer, sample_lines

pytestmark = pytest.mark.slow

LANGS = ["de", "en", "ja"]
DOCS_PER_LANG = 60
TRACE_DIR = Path(__file__).parent / "read_trace"

TINY = {
    "corpus": {"languages": LANGS},
    "teacher": {
        "vocab_size": 320,
        "hidden_size": 32,
        "num_layers": 1,
        "num_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        "seq_len": 32,
        "batch_size": 8,
        "steps": 3,
        "warmup_steps": 1,
        "threads": 1,
    },
    "tokenize": {"seq_len": 32, "num_proc": 1},
    "teacher_logits": {"k": 8, "batch_size": 16, "chunk_sequences": 16, "shard_chunks": 2},
    "train_student": {
        "hidden_size": 32,
        "num_heads": 2,
        "intermediate_size": 64,
        "steps": 3,
        "warmup_steps": 1,
        "batch_size": 8,
        "eval_every": 2,
        "eval_sequences": 8,
        "checkpoint_every": 2,
        "log_every": 1,
    },
    "evaluate": {
        "batch_size": 8,
        "max_sequences": 16,
        "throughput_sequences": 4,
        "throughput_repeats": 1,
    },
    "classify_corpus": {"languages": LANGS},
    "classify_teacher": {
        "steps": 3,
        "batch_size": 8,
        "warmup_steps": 1,
        "eval_every": 2,
        "max_length": 32,
        "eval_batch_size": 16,
        "threads": 1,
    },
    "classify_logits": {"batch_size": 16, "max_length": 32, "chunk_rows": 16, "shard_chunks": 2},
    "classify_student": {
        "hidden_size": 32,
        "num_heads": 2,
        "intermediate_size": 64,
        "steps": 3,
        "warmup_steps": 1,
        "batch_size": 8,
        "max_length": 32,
        "eval_every": 2,
        "eval_batch_size": 16,
        "checkpoint_every": 2,
        "log_every": 1,
        "threads": 1,
    },
    "classify_evaluate": {
        "batch_size": 16,
        "max_length": 32,
        "throughput_examples": 8,
        "throughput_repeats": 1,
        "threads": 1,
    },
}

# The stages that load the teacher's weights (prepare_teacher builds or loads it; evaluate
# measures it); a student trained from a pulled or imported store must run none of them.
TEACHER_STAGES = {"prepare_teacher", "teacher_logits", "evaluate"}
SIB_ROWS = {"train": 30, "dev": 8, "test": 8}  # per language: the classification corpus slice
# What a student stage may open inside the teacher's folder: the tokenizer's files only.
TOKENIZER_FILES = {"config.json", "tokenizer.json", "tokenizer_config.json"}


# --- helpers ---------------------------------------------------------------------------------


def sh(args: list[str], cwd: Path, env: dict[str, str], ok: bool = True) -> str:
    """Run a command; return stdout+stderr; fail the test with both if `ok` and it fails."""
    p = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    out = p.stdout + p.stderr
    if ok and p.returncode != 0:
        pytest.fail(f"{' '.join(args)} (in {cwd}) exited {p.returncode}:\n{out[-4000:]}")
    if not ok and p.returncode == 0:
        pytest.fail(f"{' '.join(args)} (in {cwd}) succeeded, expected a failure:\n{out[-4000:]}")
    return out


def dvc(cwd: Path, env: dict[str, str], *args: str, ok: bool = True) -> str:
    return sh([sys.executable, "-m", "dvc", *args], cwd, env, ok)


def git(cwd: Path, env: dict[str, str], *args: str) -> str:
    return sh(["git", *args], cwd, env)


def ran(output: str) -> set[str]:
    """The stages a `dvc repro` ran (not skipped, not restored from the run cache)."""
    return set(re.findall(r"Running stage '([^']+)'", output))


def set_params(repo: Path, changes: dict[str, dict]) -> None:
    """Merge `changes` (section -> {key: value}) into repo/params.yaml."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, keys in changes.items():
        params.setdefault(section, {}).update(keys)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_env(root: Path, trace: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(TRACE_DIR),
        SOFTLABELS_READ_TRACE=str(trace),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(root / "dvc-site-cache"),
        DVC_GLOBAL_CONFIG_DIR=str(root / "dvc-global"),
        GIT_AUTHOR_NAME="softlabels tests",
        GIT_AUTHOR_EMAIL="tests@softlabels.invalid",
        GIT_COMMITTER_NAME="softlabels tests",
        GIT_COMMITTER_EMAIL="tests@softlabels.invalid",
        GIT_CONFIG_NOSYSTEM="1",
        HOME=str(root / "home"),
    )
    (root / "home").mkdir(exist_ok=True)
    return env


def new_repo(path: Path, env: dict[str, str]) -> None:
    path.mkdir(parents=True)
    git(path, env, "init", "-q", "-b", "main")
    dvc(path, env, "init", "-q")


def student_record(model_dir: Path) -> dict:
    return json.loads((model_dir / "softlabels.json").read_text())


# --- the world: remote, team A, team B -------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    """Team A's repository after `dvc repro teacher_logits classify_logits` (both tasks' teacher
    passes) + `dvc push --run-cache`."""
    root = tmp_path_factory.mktemp("dvc-world")
    trace = root / "reads.jsonl"
    env = make_env(root, trace)
    remote = root / "remote"
    a = root / "team-a"
    new_repo(a, env)
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, a / name)
    for folder in ("pipeline",):  # the stages' code deps (their modules: pipeline/stages/)
        shutil.copytree(REPO / folder, a / folder, ignore=shutil.ignore_patterns("__pycache__"))
    corpus = a / "data" / "corpora" / "sample"
    corpus.mkdir(parents=True)
    for lang in LANGS:
        lines = sample_lines(lang, DOCS_PER_LANG)
        (corpus / f"{lang}.txt").write_text("".join(x + "\n" for x in lines), "utf-8")
    write_sib_slice(a / "data" / "corpora" / "sib200", LANGS, SIB_ROWS)
    shutil.copy2(REPO / "params.yaml", a / "params.yaml")
    set_params(a, TINY)
    dvc(a, env, "remote", "add", "-d", "shared", str(remote))
    git(a, env, "add", "-A")
    git(a, env, "commit", "-q", "-m", "pipeline")
    out = dvc(a, env, "repro", "teacher_logits", "classify_logits")
    dvc(a, env, "push", "--run-cache")
    git(a, env, "add", "-A")
    git(a, env, "commit", "-q", "-m", "teacher logits")
    return SimpleNamespace(root=root, env=env, trace=trace, a=a, remote=remote, a_ran=ran(out))


@pytest.fixture(scope="module")
def team_b(world) -> SimpleNamespace:
    """A fresh clone of team A (empty cache) after `dvc repro --pull train_student@kd` with its
    own student width: the store and the tokenized data come from the remote."""
    b = world.root / "team-b"
    git(world.root, world.env, "clone", "-q", str(world.a), str(b))
    assert not (b / ".dvc" / "cache").exists()  # nothing local: all data comes from the remote
    set_params(b, {"train_student": {"hidden_size": 16, "num_heads": 1, "intermediate_size": 48}})
    out = dvc(b, world.env, "repro", "--pull", "train_student@kd")
    return SimpleNamespace(path=b, ran=ran(out), output=out)


@pytest.fixture(scope="module")
def team_b_classify(world, team_b) -> SimpleNamespace:
    """Team B then trains a classification student from team A's pulled classification store."""
    out = dvc(team_b.path, world.env, "repro", "--pull", "classify_student@kd")
    return SimpleNamespace(ran=ran(out), output=out)


@pytest.fixture(scope="module")
def team_b_full(world, team_b, team_b_classify) -> str:
    """Team B then runs the rest of the pipeline (the other students, compress, evaluate)."""
    return dvc(team_b.path, world.env, "repro")


def test_team_a_ran_the_teacher_once(world):
    assert world.a_ran == {
        "prepare_teacher",
        "tokenize",
        "teacher_logits",
        "classify_teacher",
        "classify_logits",
    }
    assert read_attrs(world.a / "data/logits/teacher.zarr")["complete"] is True
    assert read_attrs(world.a / "data/logits/classify.zarr")["complete"] is True
    assert any(world.remote.rglob("*")), "dvc push left the remote empty"


def test_team_b_trains_from_the_pulled_store_without_the_teacher(world, team_b):
    assert team_b.ran == {"train_student@kd"}, team_b.output
    stage_runs = [r for r in _records(world.trace) if Path(r["cwd"]) == team_b.path]
    assert {_stage_of(r) for r in stage_runs} == {"train_student@kd"}
    (run,) = stage_runs
    teacher_dir = team_b.path / "models" / "teacher"
    opened = {Path(p).name for p in run["reads"] if Path(p).parent == teacher_dir}
    assert opened <= TOKENIZER_FILES, f"the student stage opened teacher files {opened}"
    # The student says which store it learned from: team A's, byte for byte.
    record = student_record(team_b.path / "models" / "student-kd")
    attrs = read_attrs(world.a / "data/logits/teacher.zarr")
    assert record["store_sha256"] == content_sha256(attrs)
    assert record["teacher"] == {k: attrs["teacher"][k] for k in ("name", "revision", "sha256")}
    assert record["k"] == attrs["k"] == TINY["teacher_logits"]["k"]
    assert record["dataset"] == attrs["dataset"]
    assert f"content sha256 {content_sha256(attrs)[:12]}" in team_b.output  # in the stage's log


def test_team_b_trains_a_classifier_from_the_pulled_store_without_the_teacher(
    world, team_b, team_b_classify
):
    assert team_b_classify.ran == {"classify_student@kd"}, team_b_classify.output
    runs = [
        r
        for r in _records(world.trace)
        if Path(r["cwd"]) == team_b.path and _stage_of(r) == "classify_student@kd"
    ]
    assert len(runs) == 1
    teacher_dir = team_b.path / "models" / "classify-teacher"
    opened = {Path(p).name for p in runs[0]["reads"] if Path(p).parent == teacher_dir}
    assert opened <= TOKENIZER_FILES, f"the classification student opened teacher files {opened}"
    assert not any("model.safetensors" in p for p in runs[0]["reads"] if "classify-teacher" in p)
    attrs = read_attrs(world.a / "data/logits/classify.zarr")
    record = student_record(team_b.path / "models" / "classify-student-kd")
    assert record["store"]["content_sha256"] == content_sha256(attrs)


def test_run_cache_restores_a_student_someone_already_trained(world, team_b):
    """Team A's params for `kd`: a second clone restores everything from the remote, runs nothing."""
    a2 = world.root / "team-a-clone"
    git(world.root, world.env, "clone", "-q", str(world.a), str(a2))
    dvc(world.a, world.env, "repro", "train_student@kd")  # team A trains it once...
    dvc(world.a, world.env, "push", "--run-cache")  # ...and shares it
    out = dvc(a2, world.env, "repro", "--pull", "train_student@kd")
    assert ran(out) == set(), out
    assert "Stage 'train_student@kd' is cached - skipping run" in out, out
    assert (a2 / "models" / "student-kd" / "model.safetensors").is_file()


def test_reruns_touch_only_what_changed(world, team_b, team_b_full):
    b, env = team_b.path, world.env
    assert ran(team_b_full) == {
        "train_student@ce",
        "compress",
        "evaluate",
        "classify_student@ce",
        "classify_student@gold",
        "classify_compress",
        "classify_evaluate",
    }, team_b_full

    assert ran(dvc(b, env, "repro")) == set()  # twice in a row: nothing
    assert "up to date" in dvc(b, env, "status")

    # A file no stage reads.
    (b / "NOTES.md").write_text("notes\n")
    (b / "README.md").write_text("changed\n")
    assert "up to date" in dvc(b, env, "status")
    assert ran(dvc(b, env, "repro")) == set()

    # A student param: the students and what follows them, nothing upstream.
    set_params(b, {"train_student": {"steps": 4}})
    out = dvc(b, env, "repro")
    assert ran(out) == {"train_student@kd", "train_student@ce", "compress", "evaluate"}, out

    # The rest, checked with `dvc status` (what a change touches itself; the student case above
    # shows DVC then reruns what follows), each change undone before the next.
    # k: the store, not the tokenizer or the teacher.
    assert touched(b, env, {"teacher_logits": {"k": 6}}) == {"teacher_logits"}
    # A classification student's own param: that variant alone.
    changes = {"classify_students": {"kd": {"alpha": 0.3}}}
    assert touched(b, env, changes) == {"classify_student@kd"}
    # A param every classification student reads: the three of them, nothing of the LM task.
    expected = {f"classify_student@{k}" for k in ("kd", "ce", "gold")}
    assert touched(b, env, {"classify_student": {"steps": 4}}) == expected
    assert "up to date" in dvc(b, env, "status")


def touched(repo: Path, env: dict[str, str], changes: dict[str, dict]) -> set[str]:
    """The stages `dvc status` reports changed once `changes` are in params.yaml; then undone."""
    params = repo / "params.yaml"
    before = params.read_text()
    set_params(repo, changes)
    try:
        out = dvc(repo, env, "status", "--json")
    finally:
        params.write_text(before)
    return set(json.loads(next(line for line in out.splitlines() if line.startswith("{"))))


# --- team C: another project that imports the store -----------------------------------------

EXAMPLE = REPO / "examples" / "student-project"
TOKENIZER_IMPORTS = [f"models/teacher/{name}" for name in sorted(TOKENIZER_FILES)]
DATA_IMPORTS = ["data/logits/teacher.zarr", "data/tokenized"]


def consumer(world, name: str, imports: list[str]) -> Path:
    """A new project made from examples/student-project (its dvc.yaml as written, its params
    with tiny sizes) and `imports` brought in from team A. No code is copied: its stage runs
    the `softlabels` console script of the installed package (on PATH: `make_env`)."""
    installed = shutil.which("softlabels", path=world.env["PATH"])
    assert installed and Path(installed).parent == Path(sys.executable).parent, installed
    repo = world.root / name
    new_repo(repo, world.env)
    for f in ("dvc.yaml", "params.yaml"):
        shutil.copy2(EXAMPLE / f, repo / f)
    tiny = {k: v for k, v in TINY["train_student"].items() if k not in ("hidden_size",)}
    set_params(repo, {"train_student": {**tiny, "num_layers": 1, "hidden_size": 48}})
    for path in imports:
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        dvc(repo, world.env, "import", str(world.a), path, "-o", path, "--rev", "main")
    return repo


def test_team_c_imports_the_store_and_trains_its_own_student(world):
    c = consumer(world, "team-c", DATA_IMPORTS + TOKENIZER_IMPORTS)
    assert not (c / "models" / "teacher" / "model.safetensors").exists()
    git(c, world.env, "add", "-A")
    git(c, world.env, "commit", "-q", "-m", "student from team A's logits")
    out = dvc(c, world.env, "repro")
    assert ran(out) == {"train_student"}, out
    record = student_record(c / "models" / "student")
    attrs = read_attrs(world.a / "data/logits/teacher.zarr")
    assert record["store_sha256"] == content_sha256(attrs)
    config = json.loads((c / "models" / "student" / "config.json").read_text())
    assert config["hidden_size"] == 48  # team C's own params
    lock = yaml.safe_load((c / "data" / "logits" / "teacher.zarr.dvc").read_text())
    assert lock["deps"][0]["repo"]["url"] == str(world.a)  # DVC remembers where it came from


def test_team_d_with_another_tokenizer_is_refused(world):
    d = consumer(world, "team-d", DATA_IMPORTS)  # its own tokenizer, not team A's
    texts = [line for lang in LANGS for line in sample_lines(lang, 20)]
    make_tokenizer(texts, vocab_size=300).save_pretrained(d / "models" / "teacher")
    out = dvc(d, world.env, "repro", ok=False)
    assert "tokenizer.sha256 differs: store" in out, out
    assert "tokenizer.vocab_size differs: store" in out, out
    assert not (d / "models" / "student").exists()


def test_the_examples_are_not_stages_of_this_project():
    """examples/ holds other projects' dvc.yaml files; .dvcignore keeps DVC at the repository
    root from collecting them, so `dvc status` and `dvc repro` here see this pipeline only."""
    assert (EXAMPLE / "dvc.yaml").is_file()
    p = subprocess.run(
        [sys.executable, "-m", "dvc", "stage", "list", "--all", "--name-only"],
        cwd=REPO,
        env={**os.environ, "DVC_NO_ANALYTICS": "1"},
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    listed = set(p.stdout.split())
    assert not [name for name in listed if "examples" in name], p.stdout
    assert listed == set(_stage_commands()), p.stdout


# --- dvc.yaml lists exactly what each stage reads --------------------------------------------


def _records(trace: Path) -> list[dict]:
    if not trace.exists():
        return []
    return [json.loads(line) for line in trace.read_text().splitlines() if line.strip()]


def _stage_module_path(argv: list[str]) -> str:
    """The repo-relative source of the module a stage command runs: `python -m
    pipeline.stages.x ...` -> pipeline/stages/x.py."""
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("pipeline.stages."), argv
    return argv[2].replace(".", "/") + ".py"


def _stage_commands() -> dict[str, tuple[str, ...]]:
    """{stage (a foreach entry as name@key): (its module's source, its arguments)}, from the
    project's dvc.yaml and params.yaml (a module may serve several stages, as compress does)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    out: dict[str, tuple[str, ...]] = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        if "foreach" in stage:
            for key in params[stage["foreach"].strip("${}")]:
                argv = shlex.split(body["cmd"].replace("${key}", key))
                out[f"{name}@{key}"] = (_stage_module_path(argv), *argv[3:])
        else:
            argv = shlex.split(body["cmd"])
            out[name] = (_stage_module_path(argv), *argv[3:])
    return out


def _stage_of(record: dict) -> str:
    argv = record["argv"]  # under `python -m`, argv[0] is the module's source path
    for name, cmd in _stage_commands().items():
        if Path(argv[0]).as_posix().endswith("/" + cmd[0]) and tuple(argv[1:]) == cmd[1:]:
            return name
    raise AssertionError(f"no dvc.yaml stage runs {argv}")


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _relative_reads(record: dict, outs: list[str]) -> set[str]:
    """What a stage process read, as repo-relative paths: its inputs and the library modules it
    imported (pipeline/pkg/x.py for pipeline/pkg/__pycache__/x.*.pyc, pipeline/pkg/x.c for an
    extension module pipeline/pkg/x.*.so). Leaves out params.yaml (tracked
    as params), DVC's and the stage's own work folders, and the stage's outputs and their
    temporary siblings (`.name.partial-*`), which a stage may reopen while writing them."""
    cwd = record["cwd"]
    lib = record["pipeline_dir"] or str(Path(pipeline.__file__).resolve().parent)
    rel: set[str] = set()
    for p in record["reads"]:
        if _under(p, lib):
            q = Path(p).relative_to(lib)
            if q.parent.name == "__pycache__":  # pipeline/<pkg>/__pycache__/x.cpython-*.pyc
                q = q.parent.parent / (q.name.split(".")[0] + ".py")
            elif q.suffix in (".so", ".pyd"):  # pipeline/<pkg>/x.cpython-*.so, built from x.c
                q = q.parent / (q.name.split(".")[0] + ".c")
            rel.add(str(Path("pipeline") / q))
        elif _under(p, cwd):
            rel.add(str(Path(p).relative_to(cwd)))
    own = [".dvc", ".softlabels", "params.yaml", *outs]
    hidden = tuple(f".{Path(o).name}." for o in outs)
    return {
        r
        for r in rel
        if not any(_under(r, o) for o in own)
        and not any(part.startswith(hidden) for part in Path(r).parts)
    }


def test_dvc_yaml_lists_exactly_what_each_stage_reads(world, team_b, team_b_full):
    lock = yaml.safe_load((team_b.path / "dvc.lock").read_text())["stages"]
    reads: dict[str, set[str]] = {}
    for record in _records(world.trace):
        if Path(record["cwd"]) in (world.a, team_b.path):
            stage = _stage_of(record)
            outs = [o["path"] for o in lock[stage].get("outs", [])]
            reads.setdefault(stage, set()).update(_relative_reads(record, outs))
    assert set(reads) == set(lock), "every stage ran at least once under the tracer"
    problems = []
    for stage, opened in sorted(reads.items()):
        deps = [d["path"] for d in lock[stage]["deps"]]
        module = _stage_commands()[stage][0]
        opened.add(module)  # the stage's own module, which runpy may load from its .pyc
        unlisted = sorted(p for p in opened if not any(_under(p, d) for d in deps))
        unread = sorted(d for d in deps if not any(_under(p, d) for p in opened))
        if unlisted:
            problems.append(f"{stage} reads files dvc.yaml does not list as deps: {unlisted}")
        if unread:
            problems.append(f"{stage} lists deps in dvc.yaml it never reads: {unread}")
    assert not problems, "\n".join(problems)


def test_dvc_yaml_lists_exactly_the_params_each_stage_reads(monkeypatch):
    """Each stage module is called as dvc.yaml calls it, with its work replaced by a stub: the
    params sections it loads must be the ones its dvc.yaml entry lists, and vice versa. (A
    section is read whole: `from_params` rejects keys its config does not have.)"""
    import importlib.util

    import pipeline.core.stage_cli as stage_cli

    plumbing = {"load_section", "run_stage", "stage_parser", "parse_named", "keep_freed_memory"}
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    monkeypatch.chdir(REPO)
    for name, stage in spec.items():
        variants = params[stage["foreach"].strip("${}")] if "foreach" in stage else None
        items = {f"{name}@{k}": k for k in variants} if variants else {name: ""}
        body = stage.get("do", stage)
        for full, key in items.items():
            argv = shlex.split(body["cmd"].replace("${key}", key))
            listed = {p.replace("${key}", key) for p in body.get("params", [])}
            loaded: set[str] = set()

            def record(path, cls, section, overrides=None, _loaded=loaded):
                _loaded.update(filter(None, (section, overrides)))
                return stage_cli.load_section(path, cls, section, overrides)

            path = REPO / _stage_module_path(argv)  # a fresh copy: its stubs stay in it
            mod_spec = importlib.util.spec_from_file_location(f"_stage_{name}", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
            for attr, value in list(vars(module).items()):
                if attr in plumbing or isinstance(value, type) or not callable(value):
                    continue
                if getattr(value, "__module__", "").startswith("pipeline."):  # the stage's work
                    stub = {"metrics": {}, "provenance": {"name": "stub"}}
                    monkeypatch.setattr(module, attr, lambda *a, _s=stub, **k: _s)
            monkeypatch.setattr(module, "load_section", record)
            assert module.main(argv[3:]) == 0
            assert loaded == listed, (
                f"{full}: reads params {sorted(loaded)}, lists {sorted(listed)}"
            )
