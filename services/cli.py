"""The `ecif` command line. Each verb parses arguments and calls one ecif_core entry point."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # ecif never downloads; avoid the hub's retry loop


def _progress_bar():
    """A bar per stage (services.bars): rows, pairs or steps of the stage, elapsed time and ETA."""
    from ecif_core.stages.table import BY_NAME

    from .bars import stage_bars

    return stage_bars(lambda stage: BY_NAME[stage].unit)


def _print_epoch(epoch: int, epochs: int, loss: float, metrics: dict[str, float]) -> None:
    line = f"epoch {epoch}/{epochs} loss/pair {loss:.4f}"
    if metrics:
        line += (f"  validation loss/pair {metrics['loss']:.4f}  image-to-text accuracy "
                 f"{metrics['image_to_text_accuracy']:.3f}")
    print(line, file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    from ecif_core.edit.from_audit import spec_ids
    from ecif_core.edit.removal import id_file
    from ecif_core.train import TrainConfig, train

    exclude = Path(args.exclude).read_text().split() if args.exclude else []
    if args.remove:
        exclude = sorted(set(exclude) | set(spec_ids(args.remove, "remove", args.audit_dir, Path.cwd())))
    demote = spec_ids(args.demote, "demote", args.audit_dir, Path.cwd()) if args.demote else ()
    keep = id_file(args.keep, "keep") if args.keep else ()
    data = json.loads(args.data) if args.data.lstrip().startswith("{") else args.data
    result = train(data, args.model_config, args.out,
                   TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                               weight_decay=args.weight_decay, seed=args.seed, exclude=exclude, demote=demote,
                               keep=keep, checkpoints=args.checkpoints, lora_rank=args.lora_rank,
                               lora_alpha=args.lora_alpha),
                   init=args.init, validation=args.validation, progress=_print_epoch)
    kept = json.loads(Path(result.sidecar).read_text()).get("kept_back", {})
    if any(kept.values()):
        print(f"kept back (on the keep list): {kept.get('exclude', 0)} of the removed, {kept.get('demote', 0)} of the "
              "demoted pairs", file=sys.stderr)
    print(f"wrote {result.checkpoint} and {result.sidecar}")
    return 0


def _no_task_tracebacks() -> None:
    """A failed task of an in-process audit ends in one `ecif: error:` line naming the stage and
    shard; the pipeline's log record of it (with the traceback, for a worker's log) is not
    printed again here unless the caller configured logging."""
    import logging

    logging.getLogger("ecif.pipeline").addHandler(logging.NullHandler())


def cmd_audit(args: argparse.Namespace) -> int:
    from ecif_core.calibration import describe, next_step
    from ecif_core.data.folder import AuditFolder
    from ecif_core.data.manifest import load_manifest

    from .embedded import run_audit

    _no_task_tracebacks()

    manifest = load_manifest(args.manifest)
    if args.flag_precision is not None:
        manifest.options.flag_precision = args.flag_precision
    if args.partners is not None:
        manifest.options.partners = args.partners
    ranked = run_audit(manifest, args.out, progress=None if args.quiet else _progress_bar())
    folder = AuditFolder(ranked.parent)
    summary = json.loads(folder.summary.read_text())
    print(describe(summary))
    print(f"wrote {folder.ranked}, {folder.summary}, {folder.rejected} and {folder.report}")
    if (step := next_step(summary, str(folder.path))) is not None:
        print(step)
    return 0


def _partners(text: str) -> int:
    """--partners: a partner count the manifest's bounds accept."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    return _within_bounds("partners", value)


def _flag_precision(text: str) -> float:
    """--flag-precision: a precision target the manifest's bounds accept."""
    return _within_bounds("flag_precision", float(text))


def _within_bounds(option: str, value: float) -> float:
    """`value` when the manifest's BOUNDS for `option` accept it; else argparse's error, with the bounds."""
    from ecif_core.data.manifest import BOUNDS

    low, high = BOUNDS[option]
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}")
    return value


def cmd_demo(args: argparse.Namespace) -> int:
    from ecif_core.demo import DemoSettings, run_demo

    settings = DemoSettings(seed=args.seed, epochs=args.epochs, n_train=args.n_train)
    from .embedded import run_audit

    _no_task_tracebacks()

    result = run_demo(args.out, settings, progress=_progress_bar(), runner=run_audit)
    print(f"\nranked pairs: {result.ranked_csv}\nreport: {result.ranked_csv.parent / 'report.html'}")
    print(f"{'method':<34}{'AUROC':>8}{'AP':>8}{'P@50':>8}")
    flags = result.flags
    for method, m in result.report.items():
        print(f"{method:<34}{m['auroc']:>8.3f}{m['ap']:>8.3f}{m['p@50']:>8.3f}")
    from ecif_core.calibration import describe, next_step

    summary = json.loads((result.ranked_csv.parent / "summary.json").read_text())
    print(describe(summary))
    print(f"suspected=true: {flags['flagged']:.0f} pairs, measured precision {flags['precision']:.2f}, "
          f"recall {flags['recall']:.2f} (against the demo's truth file)")
    print(f"train {result.train_seconds:.1f}s ({result.epoch_seconds:.2f}s/epoch), audit {result.audit_seconds:.1f}s "
          f"= {result.audit_seconds / result.epoch_seconds:.1f} epochs")
    if (step := next_step(summary, str(result.ranked_csv.parent))) is not None:
        print(step)
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    """The model's prediction for one test example and the top-k training pairs by relative-IS,
    harmful first: from an audit folder, or from the service (the worker computes the test-loss
    gradient)."""
    from ecif_core.errors import ConfigError
    from ecif_core.trace.query import examples_from_json, trace

    from .trace_output import print_trace, write_trace_csv

    if (args.audit_id is None) == (args.audit_dir is None):
        raise ConfigError("trace", "give an AUDIT_ID (service) or --audit-dir (embedded), not both")
    item = {"image": str(Path(args.image).resolve())}
    item.update({"caption": args.caption} if args.caption is not None else {"prompts": args.prompt, "label": args.label})
    if args.audit_dir is not None:
        from .bars import TaskBars

        bars = TaskBars("trace")
        (result,) = trace(args.audit_dir, examples_from_json([item]), k=args.k, progress=bars)
        bars.close()
        result = {"test_loss": result.test_loss, "prediction": result.prediction.to_json(),
                  "top": [{**p.__dict__, "signed_relative_is": p.signed_relative_is} for p in result.top]}
    else:
        client = _client(args)
        status = client.wait_trace(args.audit_id, client.trace(args.audit_id, [item], args.k))
        if status["status"] != "succeeded":
            print(f"ecif: error: trace failed: {status['error']}", file=sys.stderr)
            return 1
        result = status["results"][0]
    print_trace(result)
    if args.output:
        write_trace_csv(args.output, result["top"])
        print(f"wrote {args.output}")
    return 0


def _edit_settings(args: argparse.Namespace):
    from ecif_core.edit.settings import EditSettings

    return EditSettings.from_mapping(_edit_setting_values(args))


def _edit_setting_values(args: argparse.Namespace) -> dict:
    """The settings typed on the command line (the others take EDIT_SETTINGS' defaults where they are
    used); a deprecated flag is read as its new name, with a warning."""
    from ecif_core.edit.settings import EDIT_SETTINGS, renamed_settings

    typed = {name: getattr(args, name) for spec in EDIT_SETTINGS for name in (spec.name, spec.old_name)
             if name is not None and hasattr(args, name)}
    for spec in EDIT_SETTINGS:
        if spec.old_name in typed:
            print(f"warning: {_flag(spec.old_name)} is deprecated and will be removed: use {_flag(spec.name)} "
                  "(same value and meaning)", file=sys.stderr)
    return renamed_settings(typed, deprecated=False)


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _edit_setting_flags(parser: argparse.ArgumentParser) -> None:
    """--damping, --damping-per-removal-curvature, ... from ecif_core.edit.settings.EDIT_SETTINGS:
    default, bounds, meaning; an old name (SettingSpec.old_name) stays as a deprecated flag."""
    from ecif_core.edit.settings import EDIT_SETTINGS

    for spec in EDIT_SETTINGS:
        default = "none" if spec.default is None else f"{spec.default:g}"
        parser.add_argument(_flag(spec.name), dest=spec.name, type=spec.kind, default=argparse.SUPPRESS,
                            help=f"{spec.meaning}; in {spec.interval()} (default {default})")
        if spec.old_name is not None:
            parser.add_argument(_flag(spec.old_name), dest=spec.old_name, type=spec.kind, default=argparse.SUPPRESS,
                                help=f"deprecated: the old name of {_flag(spec.name)}")


def cmd_preview(args: argparse.Namespace) -> int:
    """Predicted effect of removing a set of pairs, from an audit folder or the service."""
    if args.audit_dir:
        from ecif_core.edit.from_audit import preview

        result = preview(args.audit_dir, args.remove, base_dir=Path.cwd())
    else:
        result = _client(args).preview(_need_audit_id(args), args.remove)
    print(json.dumps(result, indent=1))
    return 0


def _edit_action(args: argparse.Namespace) -> tuple[str, str]:
    """(action, spec) of `ecif edit`: --remove SPEC or --demote SPEC."""
    return ("demote", args.demote) if args.demote is not None else ("remove", args.remove)


def _print_stop(record: dict) -> None:
    """One line when the edit used an unfinished solve or left pairs out of its set."""
    result, action = record.get("result") or {}, record.get("action", "remove")
    if result.get("stopped") == "time budget" and result.get("method") == "replay":
        print(f"stopped: time budget, after {result.get('steps_done')} of {result.get('replay_steps')} steps of each "
              "run; the edit is the difference of the two shorter runs (a larger --max-seconds replays the whole "
              "recipe)", file=sys.stderr)
    elif result.get("stopped") == "time budget":
        print(f"stopped: time budget, after {result.get('cg_iterations')} CG iterations at relative residual "
              f"{result.get('cg_relative_residual', float('nan')):.3g}; the edit uses that iterate (a larger "
              "--max-seconds gets closer to the Newton step)", file=sys.stderr)
    section = record.get(action)
    kept = section.get("kept_back") if isinstance(section, dict) else None
    if kept:
        print(f"kept back: {kept} pairs of the set are on the keep list and were not {action}d", file=sys.stderr)
    verdict = record.get("certificate")
    if isinstance(verdict, dict) and verdict.get("verdict"):
        for warning in verdict.get("warnings") or []:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"verdict: {verdict['verdict']}: {verdict.get('reason')}", file=sys.stderr)


def cmd_edit(args: argparse.Namespace) -> int:
    """The model without a set of pairs, or with them demoted (no retraining): a checkpoint plus its sidecars in --out."""
    from ecif_core.edit.settings import METHODS

    action, spec = _edit_action(args)
    if args.audit_dir:
        from ecif_core.edit.from_audit import edit_audit

        from ecif_core.edit.from_audit import zero_shot_examples

        from .interrupt import removed_if_interrupted

        from .bars import TaskBars

        zero_shot = zero_shot_examples(_zero_shot_file(args.zero_shot)) if args.zero_shot else None
        bars = TaskBars("edit (CG)" if getattr(args, "method", METHODS[0]) == "newton" else "edit (replay)")
        with removed_if_interrupted(args.out):
            record = edit_audit(args.audit_dir, spec, args.out, _edit_settings(args), theta=args.theta,
                                base_dir=Path.cwd(), zero_shot=zero_shot, progress=bars, action=action, keep=args.keep,
                                method=getattr(args, "method", METHODS[0]))
        bars.close()
        print(json.dumps({k: record[k] for k in ("action", action, "checkpoint", "result", "validation", "certificate",
                                                     "zero_shot")
                          if k in record},
                         indent=1))
        _print_stop(record)
        return 0
    from ecif_core.edit.removal import id_file

    client = _client(args)
    keep = id_file(args.keep, "keep") if args.keep else None
    method = {"method": args.method} if hasattr(args, "method") else {}
    edit = client.create_edit(_need_audit_id(args), {action: spec, **method, **_edit_setting_values(args), "keep": keep,
                                                     "theta": args.theta, "zero_shot": _zero_shot_file(args.zero_shot)})
    status = client.wait_edit(edit["status_url"])
    if status["status"] != "succeeded":
        print(f"edit {status['status']}: {status.get('error')}", file=sys.stderr)
        return 1
    from .interrupt import removed_if_interrupted

    with removed_if_interrupted(args.out):
        target = client.download_edit(status["checkpoint_url"], Path(args.out))
    print(json.dumps({**status, "downloaded": str(target)}, indent=1))
    _print_stop(status.get("result") or {})
    return 0


def _zero_shot_file(path: str | None) -> list | None:
    """The examples with their image paths made absolute against the file's folder (a server
    checks them against its data roots)."""
    if path is None:
        return None
    from ecif_core.data.storage import read_json_file

    raw = read_json_file(path, "zero_shot")
    base = Path(path).resolve().parent
    return [{**e, "image": str((base / e["image"]).resolve())} if isinstance(e, dict) and isinstance(e.get("image"), str)
            else e for e in raw] if isinstance(raw, list) else raw


def _need_audit_id(args: argparse.Namespace) -> str:
    if not args.audit_id:
        raise SystemExit("give an AUDIT_ID (service) or --audit-dir DIR (a finished `ecif audit`)")
    return args.audit_id


def cmd_validate(args: argparse.Namespace) -> int:
    """The service's submit checks, the pair sources streamed and a sample of images looked up
    (no image decoded): the report as JSON, then the first problem as one line (exit 2)."""
    startup_s = 0.0
    if args.estimate:  # a fresh `ecif audit` imports the engine's libraries too: timed here, in a fresh process
        import time

        started = time.perf_counter()
        import open_clip  # noqa: F401

        startup_s = time.perf_counter() - started
    from .validate import validate_manifest

    report, problem = validate_manifest(args.manifest, estimate=args.estimate, batches=args.estimate_batches,
                                        startup_s=startup_s)
    print(json.dumps(report, indent=1))
    if problem:
        print(f"ecif: error: {problem}", file=sys.stderr)
        return 2
    if "estimate" in report:
        print(report["estimate"]["summary"], file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .api.app import create_app
    from .db.session import upgrade
    from .settings import get_settings

    settings = get_settings()
    if settings.database_url.startswith("sqlite"):
        upgrade(settings.database_url)  # the embedded database migrates itself; Postgres: `ecif db upgrade`
    uvicorn.run(create_app(settings), host=args.host or settings.host, port=args.port or settings.port,
                log_level="info")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    os.environ["ECIF_WORKER_PROCESSES"] = str(args.concurrency)
    from .broker import app

    # prefork even for one process: time limits and task_reject_on_worker_lost need a pool
    # parent that outlives its child; the parent never imports torch (tasks import it lazily).
    pool = args.pool or "prefork"
    argv = ["worker", "--queues", args.queues, "--concurrency", str(args.concurrency), "--pool", pool,
            "--loglevel", args.loglevel, "--without-gossip", "--without-mingle"]
    if args.hostname:
        argv += ["--hostname", args.hostname]
    app.worker_main(argv)
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    """Send again the tasks neither beating nor queued for --stale-after seconds (workers do it
    by themselves every ECIF_RECONCILE_INTERVAL seconds). Failed and cancelled audits are left
    alone: `ecif retry ID` resumes one."""
    from .dispatch import CeleryDispatcher
    from .liveness import queued_tasks
    from .reconcile import reconcile
    from .settings import get_settings

    settings = get_settings()
    stale_after = settings.stall_threshold() if args.stale_after is None else args.stale_after
    resumed = reconcile(settings.database_url, CeleryDispatcher().send, stale_after, queued_tasks(settings.broker_url))
    for audit_id, sent in resumed.items():
        print(f"{audit_id}: {sent} task(s) sent again")
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Migrate; a database that does not exist is created with --create, else named with
    what to do (never a traceback)."""
    from .db.session import DatabaseMissing, create_database, upgrade
    from .settings import get_settings

    url = get_settings().database_url
    try:
        if args.create:
            created = create_database(url)
            if created:
                print(f"created database {created}")
        upgrade(url, args.revision)
    except DatabaseMissing as exc:
        print(f"ecif db upgrade: {exc}", file=sys.stderr)
        return 2
    print(f"database at {args.revision}")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    """One line per key: id, owner, prefix (the key's first characters), created, revoked."""
    from .db.session import session_scope
    from .repository import list_keys
    from .settings import get_settings

    with session_scope(get_settings().database_url) as session:
        keys = list_keys(session, args.owner)
    print("id\towner\tprefix\tcreated_at\trevoked")
    for key in keys:
        print(f"{key.id}\t{key.owner}\t{key.prefix}\t{key.created_at.isoformat()}\t{str(key.revoked).lower()}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    """Revoke by id (from `keys list`) or by the key itself; its requests are 401 from now on."""
    from .db.session import session_scope
    from .repository import revoke_key
    from .settings import get_settings

    with session_scope(get_settings().database_url) as session:
        revoked = revoke_key(session, args.key)
    if revoked is None:
        print(f"ecif keys revoke: no key {args.key!r} (give an id from `ecif keys list` or the key)", file=sys.stderr)
        return 1
    print(f"revoked key {revoked.id} of {revoked.owner} ({revoked.prefix}...)")
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    from .db.session import session_scope
    from .repository import create_key
    from .settings import get_settings

    with session_scope(get_settings().database_url) as session:
        key = create_key(session, args.owner)
    print(key)  # shown once: only its hash is stored
    return 0


def _client(args: argparse.Namespace):
    from .client import client_from_args

    return client_from_args(args)


def cmd_submit(args: argparse.Namespace) -> int:
    client = _client(args)
    audit_id = client.submit(args.manifest)
    print(audit_id)
    if not args.wait:
        return 0
    status = client.wait(audit_id, _status_bar(), poll=args.poll)
    print(f"{audit_id} {status['status']}" + (f": {status['error']}" if status.get("error") else ""),
          file=sys.stderr)
    return 0 if status["status"] == "succeeded" else 1


def _status_bar():
    """The same bars as `ecif audit`, fed by the status JSON (stage, shards done, ETA)."""
    report = _progress_bar()
    from ecif_core.stages.table import SHARDED, position

    finished: set[str] = set()

    def on_status(status: dict) -> None:
        stage, done, total = status["stage"], status["shards_done"], status["shards_total"] or 0
        if not total:
            return
        for sharded in SHARDED:
            if sharded == stage:
                report(stage, done, total, unit="shard")  # the service's status counts shards
            elif position(stage) > position(sharded) and sharded not in finished:
                finished.add(sharded)
                report(sharded, total, total, unit="shard")
    return on_status


def cmd_status(args: argparse.Namespace) -> int:
    import json

    print(json.dumps(_client(args).status(args.audit_id), indent=1))
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    """Resume a failed or cancelled audit where it stopped (finished shards are kept)."""
    status = _client(args).retry(args.audit_id)
    print(f"{status['id']} {status['status']} at stage {status['stage']} "
          f"({status['shards_done']}/{status['shards_total']} shards done)")
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    """ranked.csv of an audit of the service (or of --audit-dir) to a file or stdout (-o -), as
    CSV or as Parquet with a `tags` column (services.export)."""
    from .export import export_results, local_results

    if args.audit_dir:
        from ecif_core.data.folder import AuditFolder

        ranked = AuditFolder(args.audit_dir).ranked
        if not ranked.is_file():
            raise SystemExit(f"ecif results: no {ranked} (give the folder of a finished `ecif audit`)")

        def write_csv(handle):
            local_results(ranked, handle, args.limit, args.suspected_only)
    else:
        client, audit_id = _client(args), _need_audit_id(args)

        def write_csv(handle):
            client.results(audit_id, handle, args.limit, args.suspected_only)
    where = export_results(write_csv, args.output, args.format, sys.stdout.buffer)
    if where != "-":  # stdout holds the results only
        print(f"wrote {where}")
    return 0


def _device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where the model runs (default ECIF_DEVICE, "
                   "else auto: cuda when torch sees a GPU); also sets ECIF_DEVICE for the processes it starts")


def _client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", help="API address (default ECIF_SERVER_URL or http://127.0.0.1:8000)")
    p.add_argument("--key", help="API key (default ECIF_API_KEY)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecif", description="Find misaligned image-text pairs with ECIF.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("train", help="deterministic fine-tuning on the ECIF objective")
    p.add_argument("--data", required=True, help="pair source: a JSONL / CSV / TSV / Parquet file or .tar shard, "
                   "or a source object as JSON, e.g. '{\"path\": \"x.tsv\", \"image_key\": \"filepath\"}'")
    p.add_argument("--model-config", required=True, help="open_clip model config JSON")
    p.add_argument("--init", help="checkpoint to start from (the base model of a LoRA fine-tune)")
    p.add_argument("--lora-rank", type=int, help="train peft LoRA adapters of this rank on --init; "
                   "--out is then an adapter folder (audit it with model.adapter)")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (scaling alpha/rank; default = rank)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0, help="delta: L2 coefficient of the objective")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exclude", help="file of ids to leave out (whitespace separated)")
    p.add_argument("--remove", help="pairs to leave out: a file of ids (one per line, or a CSV with an id column), "
                   "or with --audit-dir any edit spec (suspected, estimated, top:Q:COLUMN, ...)")
    p.add_argument("--demote", help="pairs to demote (kept as in-batch negatives, their own loss terms dropped): "
                   "a file of ids, or with --audit-dir any edit spec")
    p.add_argument("--keep", help="file of ids reviewed and kept (one per line, or a CSV with an id column): never "
                   "removed or demoted, whatever the sets say")
    p.add_argument("--audit-dir", help="the audit whose ranking --remove / --demote specs read")
    p.add_argument("--checkpoints", type=int, default=0, help="also save N intermediate checkpoints")
    p.add_argument("--validation", help="clean pairs scored after every epoch (validation loss and image-to-text "
                   "retrieval accuracy, printed and stored in the sidecar): shows the model learned")
    p.add_argument("--out", required=True)
    p.set_defaults(run=cmd_train)

    p = verbs.add_parser("audit", help="run a whole audit in this process (no servers)")
    p.add_argument("manifest")
    p.add_argument("--out", required=True, help="audit folder (ranked.csv, rejected.csv, store.zarr)")
    p.add_argument("--flag-precision", type=_flag_precision, default=None, metavar="P",
                   help="flag the most likely misaligned pairs while their estimated precision stays >= P "
                        "(default: the manifest's options.flag_precision, 0.9)")
    p.add_argument("--partners", type=_partners, default=None, metavar="M",
                   help="approximate: keep each pair's M in-batch partners of largest softmax weight only "
                        "(cheaper at large batches; ranked.csv's dropped_partner_mass says what was dropped)")
    _device_flag(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=cmd_audit)

    p = verbs.add_parser("demo", help="digits with 20%% misaligned captions: train, audit, score")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--n-train", type=int, default=None, help="fewer training pairs (faster)")
    _device_flag(p)
    p.set_defaults(run=cmd_demo)

    p = verbs.add_parser("validate", help="the service's submit checks (model, architecture, pair files) and "
                         "whether a sample of the images exists; nothing is decoded")
    p.add_argument("manifest")
    p.add_argument("--estimate", action="store_true", help="also the audit's expected wall time and store size: "
                   "loads the model and times a few real batches on this machine (seconds to minutes)")
    p.add_argument("--estimate-batches", type=int, default=None, metavar="N",
                   help="batches timed after a warm-up batch (default 3)")
    _device_flag(p)
    p.set_defaults(run=cmd_validate)

    p = verbs.add_parser("trace", help="training pairs behind one test example (relative-IS)")
    p.add_argument("audit_id", nargs="?", help="a finished audit of the service")
    p.add_argument("--audit-dir", help="or the folder of a finished `ecif audit` (no server)")
    p.add_argument("--image", required=True)
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--caption", help="the test image's caption")
    text.add_argument("--prompt", action="append", help="a class prompt of a zero-shot task (repeat; with --label)")
    p.add_argument("--label", type=int, help="index of the true class among the --prompt values")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("-o", "--output", help="also write the rows as CSV")
    _client_flags(p)
    _device_flag(p)
    p.set_defaults(run=cmd_trace)

    from ecif_core.edit.settings import METHODS

    removal_help = ("pairs to remove: suspected, estimated (as many top-ranked pairs as the audit estimates are "
                    "misaligned), top:Q:COLUMN, bottom:Q:COLUMN, random:Q[:SEED] or ids:FILE (Q a fraction with a "
                    "decimal point or a count)")
    p = verbs.add_parser("preview", help="predicted effect of removing pairs (stored numbers, instant)")
    p.add_argument("audit_id", nargs="?", help="a finished audit of the service")
    p.add_argument("--audit-dir", help="or the folder of a finished `ecif audit` (no server)")
    p.add_argument("--remove", required=True, help=removal_help)
    _client_flags(p)
    p.set_defaults(run=cmd_preview)

    p = verbs.add_parser("edit", help="the model without a set of pairs, or with them demoted, without retraining "
                         "(ECIF model edit)")
    p.add_argument("audit_id", nargs="?", help="a finished audit of the service")
    p.add_argument("--audit-dir", help="or the folder of a finished `ecif audit` (no server)")
    chosen = p.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--remove", help=removal_help)
    chosen.add_argument("--demote", help="pairs to demote, the same specs: they stay in-batch negatives, their own "
                        'loss terms are dropped (docs/METHOD.md, "Demotion")')
    p.add_argument("--keep", help="file of ids reviewed and kept (one per line, or a CSV with an id column): taken "
                   "out of the set; edit.json counts them (kept_back)")
    p.add_argument("--out", required=True, help="folder for the edited checkpoint, its sidecars and edit.json")
    p.add_argument("--method", choices=METHODS, default=argparse.SUPPRESS,
                   help='replay (default): the difference of two short runs of the training recipe from the model, '
                   'with and without the set (docs/METHOD.md, "The replay edit"); newton: one damped Newton step')
    _edit_setting_flags(p)
    p.add_argument("--theta", action="append", help="parameters to edit (fnmatch, or blocks:N for the last N "
                   "blocks + the projections; repeat); default the audit's theta")
    p.add_argument("--zero-shot", help="JSON list of {image, prompts, label}: zero-shot accuracy before and after "
                   "the edit goes into edit.json")
    _client_flags(p)
    _device_flag(p)
    p.set_defaults(run=cmd_edit)

    p = verbs.add_parser("serve", help="run the HTTP API (settings from ECIF_* variables)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.set_defaults(run=cmd_serve)

    p = verbs.add_parser("worker", help="run a Celery worker for the gpu and/or cpu queues")
    p.add_argument("--queues", default="gpu,cpu")
    p.add_argument("--concurrency", type=int, default=1, help="worker processes (each loads the model once)")
    p.add_argument("--pool", choices=("solo", "prefork", "threads"))
    p.add_argument("--hostname", help="Celery node name (default celery@HOST)")
    p.add_argument("--loglevel", default="INFO")
    _device_flag(p)
    p.set_defaults(run=cmd_worker)

    p = verbs.add_parser("reconcile", help="send lost tasks again (workers do it by themselves)")
    p.add_argument("--stale-after", type=float, help="seconds neither beating nor queued (default ECIF_STALL_AFTER)")
    p.set_defaults(run=cmd_reconcile)

    p = verbs.add_parser("db", help="database schema")
    db_verbs = p.add_subparsers(dest="db_verb", required=True)
    q = db_verbs.add_parser("upgrade", help="apply the Alembic migrations (ECIF_DATABASE_URL)")
    q.add_argument("revision", nargs="?", default="head")
    q.add_argument("--create", action="store_true", help="create the database (or the SQLite file's folder) first")
    q.set_defaults(run=cmd_db_upgrade)

    p = verbs.add_parser("keys", help="API keys")
    key_verbs = p.add_subparsers(dest="keys_verb", required=True)
    q = key_verbs.add_parser("create", help="create a key for an owner and print it once")
    q.add_argument("--owner", required=True)
    q.set_defaults(run=cmd_keys_create)
    q = key_verbs.add_parser("list", help="list keys (id, owner, prefix, created, revoked); never the keys")
    q.add_argument("--owner")
    q.set_defaults(run=cmd_keys_list)
    q = key_verbs.add_parser("revoke", help="revoke a key by its id or the key itself")
    q.add_argument("key", help="an id from `ecif keys list`, or the key")
    q.set_defaults(run=cmd_keys_revoke)

    p = verbs.add_parser("submit", help="send a manifest to the API")
    p.add_argument("manifest")
    p.add_argument("--wait", action="store_true", help="poll with a progress bar until the audit ends")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between polls")
    _client_flags(p)
    p.set_defaults(run=cmd_submit)

    p = verbs.add_parser("status", help="an audit's status JSON")
    p.add_argument("audit_id")
    _client_flags(p)
    p.set_defaults(run=cmd_status)

    p = verbs.add_parser("retry", help="resume a failed or cancelled audit where it stopped (keeps finished shards)")
    p.add_argument("audit_id")
    _client_flags(p)
    p.set_defaults(run=cmd_retry)

    p = verbs.add_parser("results", help="an audit's ranked pairs as CSV or Parquet (to a file or stdout)")
    p.add_argument("audit_id", nargs="?", help="an audit of the service")
    p.add_argument("--audit-dir", help="or the folder of a finished `ecif audit` (no server)")
    p.add_argument("-o", "--output", required=True, help="a file, or - for stdout")
    p.add_argument("--format", choices=("csv", "parquet"), default="csv",
                   help="parquet: typed columns and a `tags` list column ([\"suspected\"] or []) that pandas "
                        "and fiftyone read as is")
    p.add_argument("--limit", type=int)
    p.add_argument("--suspected-only", action="store_true")
    _client_flags(p)
    p.set_defaults(run=cmd_results)

    from .report_cli import add_report_verb

    add_report_verb(verbs, _client_flags)
    _add_threads_flag(parser)
    return parser


TORCH_VERBS = ("train", "audit", "demo", "trace", "edit", "serve", "validate")  # verbs that run torch in this process


def _add_threads_flag(parser: argparse.ArgumentParser) -> None:
    """`--threads N` on every command (and nested ones, e.g. `db upgrade`)."""
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        for sub in action.choices.values():
            if sub._subparsers is not None:
                _add_threads_flag(sub)
            else:
                sub.add_argument("--threads", type=int, default=None,
                                 help="torch threads (default: all cores for this process; for `worker`, "
                                      "cores / --concurrency per process); also sets ECIF_TORCH_THREADS")


def apply_threads(args: argparse.Namespace) -> int | None:
    """Export --device as ECIF_DEVICE and --threads as ECIF_TORCH_THREADS (workers and in-process
    audits read them) and set torch's threads for the verbs that compute here; returns the
    threads set, if any. A device that is not there is refused now, before any work."""
    if getattr(args, "device", None):  # read where models are placed (ecif_core.models.runtime.model_device)
        os.environ["ECIF_DEVICE"] = args.device
        if args.verb != "worker":  # the worker's parent never imports torch; its tasks check it
            from ecif_core.models.runtime import model_device

            model_device()
    threads = getattr(args, "threads", None)
    if threads is not None:
        os.environ["ECIF_TORCH_THREADS"] = str(threads)
    if args.verb in TORCH_VERBS:  # client verbs never import torch
        from ecif_core.models.runtime import set_threads

        env = os.environ.get("ECIF_TORCH_THREADS")
        return set_threads(threads if threads is not None else (int(env) if env else None))
    return None


def main(argv: list[str] | None = None) -> int:
    from ecif_core.errors import EcifError

    args = build_parser().parse_args(argv)
    try:
        apply_threads(args)
        return args.run(args)
    except EcifError as exc:
        print(f"ecif: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line saying what to do next, never a traceback
        from .interrupt import EXIT_INTERRUPTED, close_progress_bars, interrupted_line

        close_progress_bars()
        print(f"\necif: {interrupted_line(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
