"""`dualbench run`: train models on both backends (one worker subprocess per run) and report.

Order of work: validate every option and the dataset in this process (no
worker starts on bad input) -> each backend's execution configuration
(``--mode auto``: cached per machine, searched where it pays; compare.tune_resolve)
-> fairness audit (one audit-only worker per model
and backend; ``--strict`` stops on an asymmetry) -> runs in ABBA order, each
upserted into OUT/runs.jsonl as it finishes (already-ok runs are skipped) ->
tables, plots, report.md/.html. Exit codes: 0 all runs ok, 1 some run failed,
2 bad input, 130 interrupted (what finished is kept and reported).
"""
from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from typing import Any

from common.config import RunSpec
from common.errors import ConfigError
from compare import options
from compare.runner import plan_world_runs

# pandas / matplotlib / tqdm are imported inside the functions that use them, so that
# building the CLI parser (every `dualbench` command, even `list`) stays fast


def register(parser: argparse.ArgumentParser, nproc_default: str = "1") -> None:
    """Options of `dualbench run` (and of `dualbench scale`, which changes the --nproc default)."""
    options.add_selection_options(parser)
    parser.add_argument("--seeds", default="0",
                        help="comma-separated seeds, e.g. 0,1,2; a seed pairs the frameworks' runs (same initial "
                             "weights and data order) (default 0)")
    options.add_alias(parser, "--seed", "--seeds")
    options.add_recipe_options(parser)
    options.add_spec_options(parser)
    options.add_tune_options(parser)
    options.add_distributed_options(parser, nproc_default)
    options.add_evaluation_options(parser)
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="seconds per worker (per group of ranks in a data-parallel run) before its process "
                             "groups are killed, status timeout (default: no limit)")
    parser.add_argument("--out", required=True, help="results folder (created; reruns resume in it); required")
    parser.add_argument("--force", action="store_true",
                        help="rerun runs that are already ok in --out (default: skip them)")
    parser.add_argument("--strict", action="store_true",
                        help="refuse to train (exit 2) when the fairness audit finds an asymmetry (default: report it)")
    parser.add_argument("--verbose", action="store_true",
                        help="print the full fairness audit table (default: one summary line unless there is an "
                             "asymmetry; the table is always in OUT/audit.csv)")
    parser.add_argument("--checkpoint", "--resume-epochs", dest="checkpoint", action="store_true",
                        help="checkpoint every epoch under OUT/checkpoints/<run_id>; a killed run resumes there "
                             "(default off)")
    parser.add_argument("--tensorboard", default=None, metavar="DIR",
                        help="TensorBoard logs of every run under DIR/<model>/<backend>/seed<k>, the same tags and "
                             "steps for both frameworks (open both with `tensorboard --logdir DIR`) (default: none)")
    parser.add_argument("--retrieval", action="store_true",
                        help="after training, image retrieval with each run's final weights: recall@1/5/10, mAP@R "
                             "and the cross-framework agreement of the embeddings, as `dualbench retrieval OUT` "
                             "(default off)")


def build_specs(args: argparse.Namespace, store: Any) -> list[RunSpec]:
    """Every run's validated RunSpec, in ABBA execution order."""
    models, backends = options.parse_selection(args)
    seeds = options.parse_seeds(args.seeds)
    nprocs = options.parse_nprocs(args.nproc)
    modes = options.parse_modes(args.mode, backends)
    series = options.parse_styles(args.style, backends)
    recipe = options.build_recipe(args)
    shared = options.spec_kwargs(args)
    if args.timeout is not None and args.timeout <= 0:
        raise ConfigError(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
    options.check_tune_budget(args)
    if args.target_accuracy is not None and not 0 < args.target_accuracy <= 1:
        raise ConfigError(f"--target-accuracy is a fraction in (0, 1], got {args.target_accuracy:g} "
                          "(e.g. 0.8 for 80%)")
    specs = []
    for model, seed, (backend, style), nproc in plan_world_runs(models, series, seeds, nprocs):
        spec = options.make_spec(model, backend, seed, modes[backend], recipe, shared, style=style, nproc=nproc)
        if args.checkpoint:
            spec = dataclasses.replace(spec, checkpoint_dir=str(store.checkpoint_dir(spec.run_id()).resolve()))
        specs.append(spec)
    return specs


def apply_data_defaults(specs: list[RunSpec], args: argparse.Namespace) -> list[RunSpec]:
    """Every spec with the dataset's augmentation/normalisation defaults in the fields no flag set.

    Loads the full dataset (cached) in this process: the defaults of an unknown dataset are
    statistics of its whole training split, the same for every seed's subset.
    """
    from common.data import load_dataset
    from common.data.defaults import apply_defaults, dataset_defaults

    full = load_dataset(specs[0].data, progress=sys.stderr.isatty())
    defaults = dataset_defaults(specs[0].data, full)
    try:
        recipe = apply_defaults(specs[0].recipe, defaults, options.explicit_recipe_fields(args))
    except ConfigError as exc:
        raise options.name_the_flag(exc) from None
    return [dataclasses.replace(spec, recipe=recipe) for spec in specs]


def validate_dataset(spec: RunSpec, seeds: list[int]) -> Any:
    """Load (and cache) the dataset once in this process, so a bad SPEC fails before any worker starts."""
    from common.data import load_dataset

    dataset = None
    for seed in seeds:  # subsets are drawn per seed: every one must be possible
        dataset = load_dataset(spec.data, train_subset=spec.train_subset, test_subset=spec.test_subset,
                               subset_seed=seed, progress=sys.stderr.isatty())
        if spec.train_subset is None and spec.test_subset is None:
            break
    n_train = len(dataset.train_labels)
    if spec.recipe.drop_last and spec.recipe.batch_size > n_train:
        raise ConfigError(f"--batch-size {spec.recipe.batch_size} is larger than the {n_train} training images "
                          "(the last partial batch is dropped): lower --batch-size")
    return dataset


def resolve_executions(args: argparse.Namespace, specs: list[RunSpec], dataset: Any, store: Any) -> list[RunSpec]:
    """Every spec with its execution configuration (--mode auto: cache or search); tuning.json written."""
    from compare.tune_resolve import AUTO_SEARCH_MIN_STEPS, Resolver, planned_steps

    from common.execution import requested

    single = [s for s in specs if s.world_size == 1]  # the search measures one process per candidate
    seeds = len({s.seed for s in specs})
    steps = planned_steps(single[0], len(dataset.train_labels), seeds) if single else 0
    resolver = Resolver(dataset, retune=args.retune, search_if_missing=steps >= AUTO_SEARCH_MIN_STEPS,
                        budget_s=args.tune_budget_s)
    resolver.plan(single)
    resolved = [resolver.resolve_one(s) if s.world_size == 1 else
                dataclasses.replace(s, execution=requested(s).replace(
                    source="fallback (data-parallel: the search measures single processes)")) for s in specs]
    store.write_json("tuning.json", {"planned_steps_per_backend_model": steps,
                                     "search_min_steps": AUTO_SEARCH_MIN_STEPS, "cache": str(resolver.cache.path),
                                     "fingerprint": resolver.cache.fingerprint, "resolutions": resolver.summary()})
    for record in resolver.summary():
        print(f"execution {record['backend']} / {record['model']}: {record['label']} ({record['source']})",
              flush=True)
    return resolved


def check_global_batches(specs: list[RunSpec], n_train: int) -> None:
    """Every data-parallel run needs at least one global batch (per-process batch x world size)."""
    for spec in specs:
        global_batch = spec.recipe.batch_size * spec.world_size
        if global_batch > n_train:
            raise ConfigError(f"--batch-size {spec.recipe.batch_size} x {spec.world_size} processes = a global "
                              f"batch of {global_batch}, more than the {n_train} training images: lower "
                              "--batch-size or --nproc")


def _write_manifest(store: Any, specs: list[RunSpec], dataset: Any, args: argparse.Namespace,
                    started_commit: str | None) -> None:
    """manifest.json: the machine, versions and command; ``git_commit`` is the project's commit when the
    command started (the search before this point may take minutes); a different commit by now is
    recorded beside it as ``git_commit_at_manifest`` (the code changed while the command ran)."""
    import shlex

    from common.manifest import collect_manifest, git_commit
    from compare.command_line import command_for

    # the target travels in every RunSpec (its target_accuracy) and so in command_for's command line
    extra = (["--tensorboard", args.tensorboard] if args.tensorboard else []) + (
        ["--retrieval"] if args.retrieval else [])
    command = command_for([s.to_dict() for s in specs], str(store.root))
    now = git_commit()
    changed = {"git_commit_at_manifest": now} if now != started_commit else {}
    store.write_json("manifest.json", collect_manifest(
        git_commit=started_commit, **changed,
        command=command + (" " + shlex.join(extra) if extra else ""), tensorboard_dir=args.tensorboard,
        retrieval=bool(args.retrieval), data_verification=dataset.verification,
        argv=sys.argv, data_spec=specs[0].data, data_fingerprint=dataset.fingerprint,
        train_images=int(len(dataset.train_labels)), test_images=int(len(dataset.test_labels)),
        models=list(dict.fromkeys(s.model for s in specs)),
        backends=list(dict.fromkeys(s.backend for s in specs)),
        series=list(dict.fromkeys(s.series() for s in specs)),
        seeds=sorted({s.seed for s in specs})))


def _print_audit(audit: dict[str, Any], csv_path: Any, warn: bool, verbose: bool) -> None:
    """One summary line, or the full table when there is an asymmetry or ``verbose``; fallbacks always."""
    from compare.tables import audit_frame, to_text

    frame = audit_frame(audit)
    found = int(frame["asymmetry"].sum())
    compared = int((frame["kind"] == "must match").sum())
    backends = list(dict.fromkeys(b for entry in audit.values() for b in entry.get("backends", [])))
    print(f"\nFairness audit: {compared} must-match settings compared ({len(audit)} model(s) x "
          f"{len(backends)} backends), {found} asymmetr{'y' if found == 1 else 'ies'} found; "
          f"full table: {csv_path}")
    if found or verbose:
        frame["asymmetry"] = ["ASYMMETRY" if flag else "" for flag in frame["asymmetry"]]
        for column in frame.columns[2:-2]:  # backend value columns: fingerprints are 64 hex digits
            frame[column] = [v if len(v) <= 24 else v[:16] + "..." for v in frame[column]]
        print(to_text(frame))
    for model, entry in audit.items():
        row = next((r for r in entry.get("rows", []) if r["setting"] == "fallbacks"), {})
        for backend in entry.get("backends", []):
            if row.get(backend) not in (None, "none", "<not reported>"):
                print(f"note: {model} on {backend} could not apply everything as asked: {row[backend]}")
        for backend, error in (entry.get("failures") or {}).items() if warn else ():
            print(f"warning: the audit worker for {model} on {backend} failed ({error})", file=sys.stderr)


def _strict_check(audit: dict[str, Any]) -> None:
    failed = [f"{model} on {backend} ({error})" for model, entry in audit.items()
              for backend, error in (entry.get("failures") or {}).items()]
    if failed:
        raise ConfigError(f"--strict: the fairness audit could not run for {'; '.join(failed)}; "
                          "see OUT/logs/audit__*.log, or drop --strict")
    problems = []
    for model, entry in audit.items():
        for row in entry["rows"]:
            if row["asymmetry"]:
                values = ", ".join(f"{b}={row.get(b)!r}" for b in entry["backends"])
                problems.append(f"{model}: {row['setting']} ({values})")
    if problems:
        raise ConfigError(f"--strict: the fairness audit found {len(problems)} asymmetr"
                          f"{'y' if len(problems) == 1 else 'ies'}: {'; '.join(problems)}; "
                          "fix them or drop --strict")


def _after_runs(args: argparse.Namespace, store: Any, specs: list[RunSpec]) -> None:
    """TensorBoard logs of the runs skipped as already done; retrieval with every run's final weights."""
    ids = {s.run_id() for s in specs}
    results = [r for r in store.load_runs() if r.run_id in ids]
    if args.tensorboard:
        from compare.tensorboard import write_all

        write_all(args.tensorboard, results)
    if args.retrieval:
        from compare.retrieval import run_retrieval

        run_retrieval(store, results, timeout_s=args.timeout)


def _raise_interrupt(signum, frame):  # SIGTERM (CI cancel, kill): stop the worker like Ctrl-C does
    raise KeyboardInterrupt


def main(args: argparse.Namespace) -> int:
    """Validate, audit, run, report. Returns the exit code."""
    from compare.store import ResultsStore

    store = ResultsStore(args.out)
    specs = build_specs(args, store)
    launch = options.launch_from_args(args)
    store.ensure_writable()
    if launch.node_rank > 0:  # another host's ranks: follow host 0's launches, write no results
        from compare.rendezvous import follow

        # host 0 sends its specs with the dataset's defaults filled in: compare like with like
        return follow(store, apply_data_defaults(specs, args), launch, timeout_s=args.timeout)
    if args.tensorboard:
        from compare.tensorboard import check_writable

        check_writable(args.tensorboard)  # fails now, not after hours of training
    with store.exclusive():  # one run per results folder
        return _run(args, store, specs, launch)


def _run(args: argparse.Namespace, store: Any, specs: list[RunSpec], launch: Any) -> int:
    from common.manifest import git_commit
    from compare.runner import Runner

    started_commit = git_commit()  # the code this command started with, before minutes of searching

    seeds = sorted({s.seed for s in specs}, key=[s.seed for s in specs].index)
    specs = apply_data_defaults(specs, args)
    dataset = validate_dataset(specs[0], seeds)
    check_global_batches(specs, len(dataset.train_labels))
    from compare.progress import Progress

    specs = resolve_executions(args, specs, dataset, store)
    runner = Runner(store, timeout_s=args.timeout, force=args.force, launch=launch)
    runner.check_existing(specs)
    _write_manifest(store, specs, dataset, args, started_commit)
    pending = runner.pending(specs)
    interrupted, failed, progress = False, False, None
    try:
        previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread (embedded use): Ctrl-C handling still works
        previous_handler = None
    try:
        if pending:  # audit every backend of each model that still has runs to do
            audit = runner.audit([s for s in specs if s.model in {p.model for p in pending}])
            # with --strict the error line names failures
            _print_audit(audit, store.audit_csv, warn=not args.strict, verbose=args.verbose)
            if args.strict:
                _strict_check(audit)
        progress = runner.progress = Progress(len(specs))  # bars start after the audit table is printed
        if args.tensorboard:
            from compare.tensorboard import write_all

            runner.on_result = lambda result: write_all(args.tensorboard, [result])
        runner.run_all(specs)
        progress.close()
        _after_runs(args, store, specs)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: the current worker was stopped; rendering what finished", file=sys.stderr)
    except BaseException:
        failed = True  # e.g. a follower refused: tell the others briefly, never wait the full rendezvous
        raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        if progress is not None:
            progress.close()
        if launch.nnodes > 1 and not interrupted:
            from compare.rendezvous import finish_followers

            finish_followers(launch, after_error=failed)  # the other hosts stop waiting for the next launch
    if store.load_rows():
        from compare.report import render_and_print

        render_and_print(store, args.target_accuracy)  # this command's target, also for runs done before
    if interrupted:
        return 130
    ids = {s.run_id() for s in specs}
    statuses = [row.get("status") for row in store.load_rows() if row.get("run_id") in ids]
    return 0 if statuses and all(status == "ok" for status in statuses) else 1
