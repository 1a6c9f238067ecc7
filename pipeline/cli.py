"""The `softlabels` command line: tools around the artifacts the pipeline shares.

One argparse subcommand per tool. Each lives in a `_add_<name>(subparsers)` function that builds
its parser and sets `func` to a handler taking the parsed args and returning the exit status; to
add a command, write such a function and list it in `COMMANDS`. Exit statuses: 0 success, 1 the
command ran and found problems, 2 usage or input errors. `SoftlabelsError` (a problem the user
can fix) is caught here and printed as `error: <message>` without a traceback; anything else is a
bug and keeps its traceback. Text that may hold strings read from an artifact (messages, problem
lines, `inspect` output) is printed with control characters escaped (`pipeline.core.text`).

Every DVC stage is a command too (`softlabels train-student ...`, one per module of
`pipeline.stages`, `_` written `-`): its argv is handed unchanged to that module's `main(argv)`,
so `--help`, usage errors (2) and failures (1) are the stage's own, exactly as under
`python -m pipeline.stages.<name>` (what dvc.yaml runs). The stage module is imported only when
its command runs: the other commands stay free of torch's import time.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import json
import pkgutil
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline import __version__
from pipeline.core.errors import SoftlabelsError, user_error
from pipeline.core.text import printable, printable_json

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="print a logits store's provenance, layout and size",
        description=(
            "Print a logits store's provenance (teacher, tokenizer, dataset fingerprints, method, "
            "k, seed), per split the shapes, chunks, shards and compressors of its arrays, the "
            "shard files present, bytes on disk, bytes per position (in all and per array) and "
            "the format's encoding, and whether it is complete. Reads metadata only: instant, "
            "even on a store in progress. Reads format 1 and format 2 stores."
        ),
    )
    p.add_argument(
        "store", metavar="STORE", help="path of the store, e.g. data/logits/teacher.zarr"
    )
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(func=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    from pipeline.classify.store import class_store_summary, describe_class_store
    from pipeline.store.describe import describe_store, store_summary

    if _is_class_store(args.store):
        summary, text = class_store_summary, describe_class_store
        print(json.dumps(summary(args.store), indent=2) if args.json else text(args.store))
    elif args.json:
        print(printable_json(store_summary(args.store), indent=2))
    else:
        print(describe_store(args.store))
    return EXIT_OK


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="check a logits store's checksums, data and compatibility",
        description=(
            "Check a logits store: format version, complete flag, every shard file present and "
            "matching its recorded sha256, attributes consistent with the arrays, values in range "
            "(ids inside the vocabulary, log-probabilities <= 0, probability mass summing to 1; "
            "format-2 sample stores: distinct ascending ids, counts summing to k, entropy >= 0), "
            "and optionally that a tokenizer and a tokenized dataset match it. Decompresses the "
            "whole store, one chunk at a time. Prints OK, or one line per problem."
        ),
        epilog="exit status: 0 OK, 1 problems found, 2 usage or input error",
    )
    p.add_argument(
        "store", metavar="STORE", help="path of the store, e.g. data/logits/teacher.zarr"
    )
    p.add_argument(
        "--tokenized",
        metavar="DIR",
        help="tokenized dataset (tokenize stage output, e.g. data/tokenized): its input_ids must "
        "be the ones the store was made from",
    )
    p.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="tokenizer folder (e.g. models/teacher): its identity must match the store's",
    )
    p.add_argument(
        "--params",
        metavar="FILE",
        help="classification stores: a params file whose classify_corpus section names the "
        "corpus and label set the store must match, row by row (e.g. params.yaml)",
    )
    p.set_defaults(func=_run_verify)


def _is_class_store(store: str) -> bool:
    from pipeline.classify.store import is_class_store
    from pipeline.store.format import read_attrs_any_version

    return is_class_store(read_attrs_any_version(store))


def _run_verify(args: argparse.Namespace) -> int:
    from pipeline.store.verify import verify_store

    if _is_class_store(args.store):
        from pipeline.classify.corpus import ClassifyCorpusConfig, read_labeled_corpus
        from pipeline.classify.store import verify_class_store
        from pipeline.core.stage_cli import load_section

        if args.tokenized or args.tokenizer:
            print(
                "error: a classification store depends on no tokenizer; check it against a "
                "corpus with --params PARAMS (its classify_corpus section)",
                file=sys.stderr,
            )
            return EXIT_USAGE
        corpus = None
        if args.params:
            cfg = load_section(Path(args.params), ClassifyCorpusConfig, "classify_corpus")
            corpus = read_labeled_corpus(cfg)
        problems = verify_class_store(args.store, corpus)
    else:
        problems = verify_store(args.store, tokenizer=args.tokenizer, tokenized=args.tokenized)
    if not problems:
        print(f"OK: {args.store}")
        return EXIT_OK
    print(f"{args.store}: {len(problems)} problem(s):")
    for problem in problems:
        print(f"  - {printable(problem)}")
    return EXIT_PROBLEMS


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="rewrite a format-1 logits store as format 2 (verified, atomic)",
        description=(
            "Rewrite a complete format-1 logits store as format 2 (docs/logits-store.md): ids "
            "as narrow as the vocabulary allows and, for a sample store, distinct ids + counts "
            "instead of k raw draws, about half the bytes. No teacher is needed. The source is "
            "checked (complete, checksums) first and only read; every converted shard is "
            "decoded and compared with the source rows; OUT appears only when all of it passed. "
            "A converted sample store records the draws' mean -log p in place of the teacher's "
            "entropy, so students see the same loss as on the source."
        ),
        epilog="exit status: 0 converted, 2 refused (the message says why and what to do)",
    )
    p.add_argument("store", metavar="STORE", help="the format-1 store, e.g. old/teacher.zarr")
    p.add_argument("out", metavar="OUT", help="where the format-2 store goes (must not exist)")
    p.add_argument(
        "--sample-logprobs",
        action="store_true",
        help="sample stores: keep each drawn id's log-probability and the tail mass (needed for "
        "a student temperature != 1 or inclusion weights; about +32 B per position at k = 32)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from pipeline.store.convert import convert_store
    from pipeline.store.describe import store_summary

    convert_store(
        args.store, args.out, sample_logprobs=args.sample_logprobs, progress=not args.no_progress
    )
    before, after = store_summary(args.store), store_summary(args.out)
    print(
        f"converted {args.store} (format {before['format_version']}, "
        f"{before['bytes_per_position']:.2f} B per position) -> {args.out} (format "
        f"{after['format_version']}, {after['bytes_per_position']:.2f} B per position); verified"
    )
    return EXIT_OK


def _stage_names() -> list[str]:
    """The modules of `pipeline.stages` (one per DVC stage), found without importing them."""
    import pipeline.stages

    return sorted(
        m.name
        for m in pkgutil.iter_modules(pipeline.stages.__path__)
        if not m.ispkg and not m.name.startswith("_")
    )


def _stage_summary(name: str) -> str:
    """The first paragraph of a stage module's docstring, on one line, read from its source (not
    imported: that would import torch)."""
    spec = importlib.util.find_spec(f"pipeline.stages.{name}")
    source = Path(spec.origin).read_text(encoding="utf-8") if spec and spec.origin else ""
    doc = ast.get_docstring(ast.parse(source)) or f"DVC stage `{name}`"
    return " ".join(doc.split("\n\n")[0].split())


def _add_stages(sub: argparse._SubParsersAction) -> None:
    for name in _stage_names():
        # No options of its own, not even -h: every argument after the command name, --help
        # included, goes to the stage (main() collects them with parse_known_args).
        p = sub.add_parser(
            name.replace("_", "-"),
            help=_stage_summary(name).replace("%", "%%"),
            add_help=False,
        )
        p.set_defaults(func=_run_stage, stage=name)


def _run_stage(args: argparse.Namespace) -> int:
    """Hand `args.stage_argv` to `pipeline.stages.<stage>.main`; return its exit status."""
    module = importlib.import_module(f"pipeline.stages.{args.stage}")
    if args.whole_process:  # as `python -m pipeline.stages.<name>` does in its __main__ block
        from pipeline.core.allocator import keep_freed_memory

        keep_freed_memory()
    prog = sys.argv[0] if sys.argv else None
    sys.argv[:1] = [f"softlabels {args.command}"]  # the stage parser's prog, in its usage lines
    try:
        return module.main(args.stage_argv)
    except SystemExit as e:  # the stage's argparse: --help (0), usage errors (2)
        return EXIT_OK if e.code is None else e.code if isinstance(e.code, int) else EXIT_USAGE
    finally:
        sys.argv[:1] = [] if prog is None else [prog]


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_inspect,
    _add_verify,
    _add_convert,
    _add_stages,
]
"""Subcommand registrars, in the order `--help` lists them. Add new commands here."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softlabels",
        description=(
            "Tools for softlabels artifacts (offline teacher soft labels for knowledge "
            "distillation), and the pipeline's stages, one command each (`dvc repro` runs them "
            "as `python -m pipeline.stages.<name>`)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"softlabels {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (also for usage errors and --help). With
    `argv` None (the console script) it reads sys.argv, and the process is this one command."""
    parser = build_parser()
    try:
        # parse_known_args: what follows a stage command is the stage's (in order, `--` kept);
        # any other command takes no unknown arguments, as with parse_args.
        args, rest = parser.parse_known_args(argv)
        if rest and getattr(args, "stage", None) is None:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
    except SystemExit as e:  # argparse exits on --help (0) and on usage errors (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    args.stage_argv, args.whole_process = rest, argv is None
    try:
        return args.func(args)
    except (SoftlabelsError, OSError) as e:  # OSError: the user's filesystem, or a bug
        message = user_error(e)
        if message is None:
            raise
        print(f"error: {printable(message)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
