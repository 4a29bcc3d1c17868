"""Command line: ``advkit data`` (prepare Fashion-MNIST), ``advkit run -p NAME VALUE ...`` (one experiment
notebook through papermill, the run's record kept safe), ``advkit evaluate --arch A --weights FILE --name N``
(a state dict the kit did not train, evaluated into a run folder), ``advkit sweep FILE`` (``--plan``: its cost),
``advkit summary ROOT``, ``advkit study`` (export the study's runs, print its claims; ``--gate RUN``: the validity
gate; ``--readme``: the README's study section), ``advkit figures`` (every analysis notebook through papermill)."""

from __future__ import annotations

import argparse
import sys


def _sweep(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .sweep import run_shards, run_sweep

    try:
        shard, shards = (int(part) for part in args.shard.split("/"))
    except ValueError:
        parser.error(f"--shard={args.shard!r} is not accepted; give I/N with integers, e.g. 0/2")
    chosen = [f"--{name}" for name in ("gpus", "slurm", "point") if getattr(args, name) is not None]
    if chosen and (args.jobs != 1 or args.shard != "0/1"):
        parser.error(f"{chosen[0]} is not accepted together with --jobs or --shard; give one way to run the sweep")
    if args.jobs != 1 and args.shard != "0/1":
        parser.error("--jobs and --shard are not accepted together: --jobs N runs N shards of its own; give one")
    if args.jobs != 1 and (args.check or args.plan):
        parser.error("--jobs is not accepted with --check or --plan, which run nothing; give --shard I/N to see "
                     "one shard")
    if args.check and args.plan:
        parser.error("--check and --plan are not accepted together; give one")
    if args.check:
        return _check_sweep(args, shard, shards)
    if args.plan:
        from .plan import run_plan
        from .sweep import load_sweep, shard_points

        return run_plan(args.file, shard_points(load_sweep(args.file), shard, shards))
    if args.point is not None:
        from .slots import run_point

        return run_point(args.file, args.point, args.kernel)
    if args.gpus is not None:
        from .slots import run_slots

        return 1 if run_slots(args.file, args.gpus, args.kernel)["failed"] else 0
    if args.slurm is not None:
        from .slurm import run_slurm

        return 1 if run_slurm(args.file, args.slurm, args.kernel)["failed"] else 0
    if args.jobs != 1:
        return run_shards(args.file, args.jobs, args.kernel)
    outcome = run_sweep(args.file, kernel=args.kernel, shard=shard, shards=shards)
    return 1 if outcome["failed"] else 0


def _check_sweep(args: argparse.Namespace, shard: int, shards: int) -> int:
    """``--check``: validate the file (and --gpus or --slurm with its points), make every point's preflight
    (:func:`advkit.sweep.preflight`) and list the points; run nothing."""
    from .sweep import load_sweep, point_named, preflight, shard_points

    points = shard_points(load_sweep(args.file), shard, shards)
    if args.point is not None:
        points = [point_named(points, args.point, args.file)]
    if args.gpus is not None:
        from .slots import check_devices, parse_gpus

        check_devices(points, parse_gpus(args.gpus))
    if args.slurm is not None:
        from .slurm import check_points, parse_slurm

        check_points(points, parse_slurm(args.slurm))
    preflight(points)
    for point in points:
        print(f"{point.config.name}: {point.config.strategy}, norm={point.config.norm} -> {point.output}")
    return 0


def _parameters(args: argparse.Namespace) -> dict:
    """The parameters of ``-f FILE`` (YAML) and ``-p NAME VALUE`` (each value read as YAML, like papermill's);
    ValueError naming the option for a file that cannot be read, is not a mapping or sets a key twice, and for a
    value that is not YAML."""
    import yaml

    from .sweep import StrictLoader

    parameters = {}
    if args.file:
        try:
            with open(args.file) as handle:
                loaded = yaml.load(handle, Loader=StrictLoader) or {}
        except (OSError, yaml.YAMLError, ValueError) as exc:
            raise ValueError(f"-f {args.file} is not accepted: {str(exc).strip()}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"-f {args.file} is not accepted: it must hold a mapping of parameter: value, not a "
                             f"{type(loaded).__name__}")
        parameters |= loaded
    for name, value in args.parameter:
        try:
            parameters[name] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ValueError(f"-p {name} {value!r} is not accepted: not a YAML value ({str(exc).splitlines()[0]})") \
                from None
    return parameters


def _run(args: argparse.Namespace) -> int:
    """``advkit run -p name my-run -p preset demo ...``: one execution of the experiment notebook. Values are read
    as YAML (``-p epochs 8``, ``-p lr_decay_epochs "[2]"``), like papermill's ``-p``; ``-f FILE`` adds a YAML file
    of parameters. Every value is checked before papermill starts, and a refused run (an existing run without
    resume/overwrite, a run in use) leaves the earlier executed notebook as it was."""
    from .config import config_from_parameters
    from .paths import project_root
    from .rundir import RunDir
    from .sweep import execute

    try:
        cfg = config_from_parameters(_parameters(args))
    except ValueError as exc:
        print(f"advkit run: {exc}", file=sys.stderr)
        return 2
    print(f"advkit run: {cfg.name}: {cfg.strategy}, norm={cfg.norm} -> {cfg.run_dir}", flush=True)
    try:
        execute(project_root() / "notebooks" / "experiment.ipynb", cfg, kernel=args.kernel)
    except Exception as exc:  # the notebook's error, short; the executed notebook has the whole traceback
        name = getattr(exc, "ename", type(exc).__name__)
        print(f"advkit run: {name}: {getattr(exc, 'evalue', exc)}", file=sys.stderr)
        return 1
    print(f"advkit run: done; the executed notebook is {RunDir(cfg.run_dir).notebook}")
    return 0


def _numbers(option: str, text: str | None) -> list[float] | None:
    """``--mean 0.485,0.456,0.406`` as floats (None when not given)."""
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--{option}={text!r} is not accepted; give numbers separated by commas, e.g. "
                         "0.485,0.456,0.406") from None


def _evaluate(args: argparse.Namespace) -> int:
    """``advkit evaluate --arch A --weights FILE [--norm-inside | --mean M --std S] --name N [-p NAME VALUE]``: a
    state dict the kit did not train, evaluated under the run's evaluation parameters into ``runs/N/``
    (:func:`advkit.external.evaluate_weights`). Refusals (status 2) come before anything is written."""
    from .config import config_from_parameters
    from .external import evaluate_weights
    from .rundir import RunLocked

    try:
        parameters = _parameters(args)
        for option in ("arch", "dataset", "name"):
            if getattr(args, option) is not None and option in parameters:
                raise ValueError(f"{option} is given twice (--{option} and -p {option}); give it once")
            if getattr(args, option) is not None:
                parameters[option] = getattr(args, option)
        mean, std = _numbers("mean", args.mean), _numbers("std", args.std)
        cfg = config_from_parameters(parameters)
        print(f"advkit evaluate: {cfg.name}: {cfg.arch}, norm={cfg.norm}, {args.weights} on {cfg.dataset} -> "
              f"{cfg.run_dir}", flush=True)
        results = evaluate_weights(cfg, args.weights, norm_inside=args.norm_inside, mean=mean, std=std)
    except (ValueError, FileExistsError, FileNotFoundError, RunLocked) as exc:
        print(f"advkit evaluate: {exc}", file=sys.stderr)
        return 2
    print(results[["branch", "attack", "steps", "accuracy", "worst_accuracy", "n"]].to_string(index=False))
    return 0


def _study(args: argparse.Namespace) -> int:
    """``advkit study``: export the runs into the tables, record validity gates, print the claims and the
    undecided ones, rewrite the README's study section; bad ``--readme``/``--gate`` refused before any of it."""
    from . import study
    from .paths import project_root, resolve_output
    from .rundir import RunDir

    tables = study.TABLES_DIR if args.tables is None else project_root() / args.tables
    readme = None if args.readme is None else project_root() / args.readme
    if readme is not None:
        try:
            study.readme_block(readme)  # refused before anything is exported
        except (OSError, ValueError) as exc:
            print(f"advkit study: --readme={args.readme!r} is not accepted: {exc}", file=sys.stderr)
            return 2
    gates = [resolve_output(run) for run in args.gate]
    unfinished = [str(run) for run in gates if not RunDir(run).finished()]
    if unfinished:
        print(f"advkit study: --gate {unfinished[0]} is not accepted: give the folder of a finished run (status "
              "done, results.csv)", file=sys.stderr)
        return 2
    if not args.no_export:
        print(study.export(resolve_output(args.runs), tables))
    if gates:
        print(study.record_gates([_gate_row(run) for run in gates], tables).to_string(index=False))
    claims = study.all_claims(*study.load(tables))
    print(study.findings_markdown(claims))
    print(f"\nundecided (the stopping rule):\n{study.undecided(claims).to_string(index=False)}")
    if readme is not None:
        study.write_readme_section(readme, study.readme_section(tables))
        print(f"[study] {readme}: study section rewritten from {tables}")
    return 0


def _gate_row(run_dir) -> dict:
    """``advkit study --gate RUN``: the run's clean accuracy on its full test set, with its name and code commit."""
    from .evaluate import full_test_accuracy
    from .rundir import RunDir
    from .run import load_run

    cfg, model = load_run(run_dir)
    environment = RunDir(run_dir).read_json(RunDir(run_dir).environment_file)
    return dict(run=cfg.name, code=environment.get("code"), **full_test_accuracy(model, cfg))


def _summary(root: str) -> int:
    """Print the table of finished runs; list damaged runs on stderr (status 1); a missing folder: status 2."""
    import warnings

    from .results import summary_table, unfinished_runs

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the damaged runs are listed below, once
            table = summary_table(root)
    except ValueError as exc:
        print(f"advkit summary: {exc}", file=sys.stderr)
        return 2
    print(table.to_string(index=False))
    damaged = unfinished_runs(root).query("state == 'damaged'")
    for error in damaged["error"]:
        print(f"advkit summary: left out: {error}", file=sys.stderr)
    return 1 if len(damaged) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="advkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_data = sub.add_parser("data", help="prepare Fashion-MNIST into the data root (idempotent)")
    p_data.add_argument("--root", default=None, help="data root (default: $ADVKIT_DATA or <repo>/data)")
    p_data.add_argument("--no-download", action="store_true", help="never try torchvision's downloader")
    p_run = sub.add_parser("run", help="run one experiment notebook through papermill (parameters as -p NAME VALUE)")
    p_run.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                       help="a notebook parameter (the value is read as YAML); repeat for several")
    p_run.add_argument("-f", "--file", default=None, help="a YAML file of parameters")
    p_run.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebook's)")
    p_eval = sub.add_parser("evaluate", help="evaluate a state dict the kit did not train (the paper's PGD curve, "
                            "AutoAttack with -p eval_autoattack_n N) into a run folder; nothing is trained")
    p_eval.add_argument("--arch", required=True, help="the kit's architecture the weights fit, e.g. resnet152")
    p_eval.add_argument("--weights", required=True, metavar="FILE",
                        help="a state dict (plain, or under 'state_dict'/'model'; 'module.' prefixes are stripped)")
    p_eval.add_argument("--norm-inside", action="store_true",
                        help="the weights' model normalises its [0, 1] inputs itself: the kit's normaliser is the "
                             "identity")
    p_eval.add_argument("--mean", metavar="M1,M2,M3", help="per-channel mean the weights expect their inputs "
                        "normalised with (with --std; default: the data set's)")
    p_eval.add_argument("--std", metavar="S1,S2,S3", help="per-channel standard deviation (with --mean)")
    p_eval.add_argument("--dataset", default=None, help="evaluation data set (default: the preset's)")
    p_eval.add_argument("--name", required=True, help="run folder: <runs_root>/<name>")
    p_eval.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="an evaluation parameter (preset, n_test, eval_*, device ...; read as YAML); repeat")
    p_eval.add_argument("-f", "--file", default=None, help="a YAML file of parameters")
    p_sweep = sub.add_parser("sweep", help="run every point of a sweep file through papermill")
    p_sweep.add_argument("file")
    p_sweep.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebook's)")
    p_sweep.add_argument("--check", action="store_true", help="validate the file and list its points; run nothing")
    p_sweep.add_argument("--plan", action="store_true",
                         help="print each point's state and core-minutes (measured, or the median of its finished "
                              "seeds) and the core-hours left; run nothing")
    p_sweep.add_argument("--shard", default="0/1", metavar="I/N",
                         help="run only shard I of N (0-based), e.g. 0/2 and 1/2 in two processes (default: 0/1)")
    p_sweep.add_argument("--jobs", type=int, default=1, metavar="N",
                         help="run the sweep as N shards at once, each with cores/N threads (default: 1)")
    where = p_sweep.add_mutually_exclusive_group()
    where.add_argument("--gpus", default=None, metavar="0,1,2,3",
                       help="one point per slot at once, each process seeing only its device (0,0,1,1: two per "
                            "device); a point with gpus: N takes N slots of distinct devices")
    where.add_argument("--slurm", default=None, metavar="KEY=VALUE,...",
                       help="one submitit job per point, e.g. partition=gpu,timeout_min=240 (keys: cluster, partition, "
                            "account, qos, constraint, timeout_min, gpus_per_node, cpus_per_task, mem_gb, "
                            "signal_delay_s, array_parallelism, max_num_timeout, folder)")
    where.add_argument("--point", default=None, metavar="NAME",
                       help="run only the point NAME (what each --gpus slot and --slurm job runs)")
    p_sum = sub.add_parser("summary", help="print the results of every run under a folder as one table (exit "
                           "status 1: some run folders are damaged, listed on stderr; 2: no such folder)")
    p_sum.add_argument("root")
    p_study = sub.add_parser("study", help="export the study's runs into its tables and print the claims")
    p_study.add_argument("--runs", default="runs/decisive", help="study runs root (default: runs/decisive)")
    p_study.add_argument("--tables", default=None,
                         help="the study's tables (default: data/results/decisive; the older three-seed study: "
                              "data/results/study with --runs runs/study)")
    p_study.add_argument("--gate", action="append", default=[], metavar="RUN",
                         help="a finished run whose clean accuracy on the full test set is recorded in the tables' "
                              "gates.csv (the validity gate; repeatable)")
    p_study.add_argument("--readme", default=None, metavar="FILE",
                         help="also rewrite the study section of FILE (between its study markers) from the tables")
    p_study.add_argument("--no-export", action="store_true", help="only print the claims of the committed tables")
    p_fig = sub.add_parser("figures", help="execute every analysis notebook headlessly: figures and tables")
    p_fig.add_argument("--runs", default="runs", help="runs root searched recursively (default: runs)")
    p_fig.add_argument("--out", default="figures", help="figures folder (default: figures)")
    args = parser.parse_args(argv)

    if args.command == "data":
        from .data import prepare_fashion_mnist

        print(prepare_fashion_mnist(args.root, download=not args.no_download))
        return 0
    if args.command == "run":
        return _run(args)
    if args.command == "evaluate":
        return _evaluate(args)
    if args.command == "sweep":
        try:
            return _sweep(args, parser)
        except ValueError as exc:  # a bad sweep file or option: its message, not a traceback
            print(f"advkit sweep: {exc}", file=sys.stderr)
            return 2
    if args.command == "study":
        return _study(args)
    if args.command == "figures":
        from .figures import run_analysis_notebooks

        try:
            outcome = run_analysis_notebooks(args.runs, args.out)
        except ValueError as exc:  # a runs root that does not exist: its message, not a traceback
            print(f"advkit figures: {exc}", file=sys.stderr)
            return 2
        return 1 if outcome["failed"] else 0
    return _summary(args.root)

if __name__ == "__main__":
    sys.exit(main())
