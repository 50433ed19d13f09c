"""The ``tapio`` command line: run | validate | components | graph.

Exit status, as the OpenTelemetry Collector's: 0 success; 1 an invalid
configuration, or a component that failed (to start or while running); 2 a
usage error (an unknown command or option). Only this module unpacks exception groups: each leaf is
reported as one line naming its component, with what to do next; no
traceback unless ``--debug``.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import logging
import os
import sys
import textwrap
from typing import Any, Callable, Mapping, Sequence

import trio

from tapio import __version__
from tapio.builtin import default_registry
from tapio.component import DescribesItself, Kind, Listens, Registry, describe_signals
from tapio.units import parse_listen_address

EXAMPLES = """\
examples:
  tapio run                                   run ./pipelines.yaml
  tapio run -c pipelines.yaml -c local.yaml   merge two files (later wins)
  tapio run -c pipelines.yaml --set processors::batch::timeout=1s
  tapio run -c env:TAPIO_CONFIG               the config is in an environment variable
  tapio run -c pipelines.yaml --watch         reload when the file changes (SIGHUP always reloads)
  tapio validate -c pipelines.yaml            check a config without starting anything
  tapio components                            list component types and their signals
  tapio graph | tee graph.mmd                 the pipeline graph as Mermaid
  tapio graph --format dot | dot -Tsvg > graph.svg
"""

log = logging.getLogger("tapio.cmd")

#: how often ``tapio run --watch`` looks at the config files, in seconds
WATCH_INTERVAL = 2.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tapio",
        description="Kubernetes node agent for observability: kernel, network and cluster events, exported over OpenTelemetry.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"tapio {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "-c", "--config", action="append", metavar="URI",
            help="a config file path, file:PATH, env:NAME (YAML in an environment variable) or yaml:TEXT "
                 "(inline YAML, nested keys joined by ::); repeat to merge several, later ones win (default: ./pipelines.yaml)",
        )
        sp.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
            help="set one value after every --config is merged; nested keys joined by :: (processors::batch::timeout=1s); "
                 "the value is read as YAML; repeatable",
        )

    run = sub.add_parser("run", help="run the pipelines", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    with_config(run)
    run.add_argument("--debug", action="store_true", help="show tracebacks of failures")
    run.add_argument(
        "--watch", nargs="?", type=_seconds, const=WATCH_INTERVAL, default=None, metavar="SECONDS",
        help=f"reload when a config file changes, checking every SECONDS (default {WATCH_INTERVAL:g}); SIGHUP always reloads",
    )
    val = sub.add_parser("validate", help="check the config and exit (no side effects)")
    with_config(val)
    sub.add_parser("components", help="list the component types tapio knows")
    graph = sub.add_parser("graph", help="print the pipeline graph (Mermaid, or Graphviz DOT)")
    with_config(graph)
    graph.add_argument("--format", choices=("mermaid", "dot"), default="mermaid")
    return p


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"expected between 0.1 and 3600 seconds, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    registry = default_registry()
    handler = {"run": cmd_run, "validate": cmd_validate, "components": cmd_components, "graph": cmd_graph}[args.command]
    try:
        return handler(args, registry)
    except KeyboardInterrupt:
        return 130


def _config_paths(args: argparse.Namespace) -> list[str]:
    return args.config or ["pipelines.yaml"]


def _load(args: argparse.Namespace, registry: Registry):
    """Load and validate; print problems and return None on error."""
    from tapio.config import ConfigError, load_config

    try:
        cfg = load_config(_config_paths(args), registry, overrides=args.overrides)
    except ConfigError as e:
        for problem in e.problems:
            print(f"tapio: {problem}", file=sys.stderr)
        n = sum(1 for p in e.problems if getattr(p, "severity", "error") == "error")
        print(f"tapio: the configuration has {n} error{'s' if n != 1 else ''}; fix {'them' if n != 1 else 'it'} and run `tapio validate` again", file=sys.stderr)
        return None
    for w in cfg.warnings:
        print(f"tapio: {w}", file=sys.stderr)
    return cfg


#: exit status for an invalid configuration (the OpenTelemetry Collector's)
BAD_CONFIG = 1


def cmd_validate(args: argparse.Namespace, registry: Registry) -> int:
    cfg = _load(args, registry)
    if cfg is None:
        return BAD_CONFIG
    n = len(cfg.service.pipelines)
    print(f"{', '.join(cfg.files)}: valid ({n} pipeline{'s' if n != 1 else ''}: {', '.join(str(p) for p in cfg.service.pipelines)})")
    return 0


def cmd_components(args: argparse.Namespace, registry: Registry) -> int:
    rows = [(f.kind.value, f.type, describe_signals(f.signals) or "-", f.description) for f in registry.all()]
    widths = [max(len(r[i]) for r in rows + [("KIND", "TYPE", "SIGNALS", "")]) for i in range(3)]
    print(f"{'KIND':{widths[0]}}  {'TYPE':{widths[1]}}  {'SIGNALS':{widths[2]}}  DESCRIPTION")
    for r in rows:
        print(f"{r[0]:{widths[0]}}  {r[1]:{widths[1]}}  {r[2]:{widths[2]}}  {r[3]}")
    return 0


def cmd_graph(args: argparse.Namespace, registry: Registry) -> int:
    from tapio.graph import build_graph, to_dot, to_mermaid

    cfg = _load(args, registry)
    if cfg is None:
        return BAD_CONFIG
    g = build_graph(cfg.service.pipelines, cfg.connectors)
    sys.stdout.write(to_dot(g) if args.format == "dot" else to_mermaid(g))
    return 0


# ------------------------------------------------------------------ run


def cmd_run(args: argparse.Namespace, registry: Registry) -> int:
    from tapio.logs import setup_logging

    cfg = _load(args, registry)
    if cfg is None:
        return BAD_CONFIG
    tel = cfg.service.telemetry
    setup_logging(tel.logs.level, tel.logs.encoding)
    from tapio.config import load_config, source_file

    sources, overrides = _config_paths(args), args.overrides
    watched = ([f for f in map(source_file, sources) if f is not None], args.watch) if args.watch else None
    try:
        return trio.run(_run, cfg, registry, args.debug, lambda: load_config(sources, registry, overrides=overrides), watched)
    except KeyboardInterrupt:
        return 130


def banner_lines(cfg: Any, registry: Registry, metrics_port: int | None, running: Mapping[tuple[Kind, Any], Any] | None = None) -> list[str]:
    """The start summary: what runs where.

    ``running`` maps ``(kind, component id)`` to the started component; where
    one says which port it bound (see `with_bound_ports`), the line shows
    that port instead of the configured one (``127.0.0.1:0``).
    """
    running = running or {}
    lines = [f"tapio {__version__} starting with {', '.join(cfg.files)} (pid {os.getpid()})"]
    kinds = (
        (Kind.RECEIVER, cfg.receivers),
        (Kind.PROCESSOR, cfg.processors),
        (Kind.EXPORTER, cfg.exporters),
        (Kind.CONNECTOR, cfg.connectors),
        (Kind.EXTENSION, cfg.extensions),
    )
    used: set[tuple[Kind, Any]] = set()
    for p in cfg.service.pipelines.values():
        used.update((Kind.CONNECTOR if r in cfg.connectors else Kind.RECEIVER, r) for r in p.receivers)
        used.update((Kind.PROCESSOR, r) for r in p.processors)
        used.update((Kind.CONNECTOR if r in cfg.connectors else Kind.EXPORTER, r) for r in p.exporters)
    used.update((Kind.EXTENSION, e) for e in cfg.service.extensions)
    for kind, comps in kinds:
        for cid, ccfg in comps.items():
            if (kind, cid) not in used:
                continue
            f = registry.get(kind, cid.type)
            component = running.get((kind, cid))
            shown = with_bound_ports(ccfg, component)
            if isinstance(component, DescribesItself):
                detail = component.running_summary
            else:
                detail = f.summary(shown) if f is not None and f.summary is not None else ""
            lines.append(f"  {kind.value:9} {str(cid):24} {detail}".rstrip())
    for pid, p in cfg.service.pipelines.items():
        chain = " → ".join(
            part for part in (
                ", ".join(map(str, p.receivers)),
                " → ".join(map(str, p.processors)),
                ", ".join(map(str, p.exporters)),
            ) if part
        )
        lines.append(f"  pipeline  {str(pid):24} {chain}")
    if metrics_port is not None:
        host, _ = parse_listen_address(cfg.service.telemetry.metrics.address)
        lines.append(f"  self-telemetry http://{host}:{metrics_port}/metrics  /healthz  /readyz")
    else:
        lines.append("  self-telemetry off (service.telemetry.metrics.address is empty)")
    return lines


def with_bound_ports(config: Any, component: Any) -> Any:
    """``config`` with each listen endpoint replaced by what the running ``component`` bound (port 0 picks one).

    A component that listens says so with ``bound_endpoints``: a mapping of
    config key paths (``endpoint``, ``protocols.grpc.endpoint``) to the
    ``host:port`` it bound. The config is returned unchanged where there is none.
    """
    bound = component.bound_endpoints if isinstance(component, Listens) else None
    if not bound or not dataclasses.is_dataclass(config):
        return config
    for path, endpoint in bound.items():
        config = _replace_path(config, path.split("."), endpoint)
    return config


def _replace_path(obj: Any, keys: list[str], value: Any) -> Any:
    """A copy of the dataclass ``obj`` with the field at ``keys`` set to ``value`` (unchanged where the path is missing)."""
    head = keys[0]
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type) or not hasattr(obj, head):
        return obj
    inner = value if len(keys) == 1 else _replace_path(getattr(obj, head), keys[1:], value)
    return dataclasses.replace(obj, **{head: inner})


async def _run(cfg: Any, registry: Registry, debug: bool, reload: Callable[[], Any], watched: tuple[list[str], float] | None) -> int:
    from tapio.service import run_config

    try:
        async with trio.open_nursery() as nursery:
            started = await nursery.start(functools.partial(run_config, cfg, registry, reload=reload, watch=watched))
            # printed once everything listens, so the ports shown are the ones bound
            for line in banner_lines(cfg, registry, started.metrics_port, started.service.running()):
                print(line, file=sys.stderr, flush=True)
    except BaseExceptionGroup as group:
        return _report_failures(group, debug)
    except Exception as exc:  # a single leaf (non-strict paths)
        return _report_failures(BaseExceptionGroup("", [exc]), debug)
    return 0


def _leaves(exc: BaseException):
    if isinstance(exc, BaseExceptionGroup):
        for e in exc.exceptions:
            yield from _leaves(e)
    else:
        yield exc


def _hint(exc: BaseException) -> str:
    cause = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE or "address already in use" in str(exc).lower():
        return "another process listens on that address: stop it, or change the endpoint in the config"
    if isinstance(cause, PermissionError) or "permission denied" in str(exc).lower():
        return "check the file permissions, or run tapio as a user allowed to do this"
    return "see the message above; run `tapio validate` to check the config, or `tapio run --debug` for a traceback"


def _report_failures(group: BaseExceptionGroup, debug: bool) -> int:
    status = 0
    for leaf in _leaves(group):
        if isinstance(leaf, (KeyboardInterrupt, trio.Cancelled)):
            continue
        status = 1
        print(f"tapio: {leaf}", file=sys.stderr)
        print(textwrap.indent(f"what to do: {_hint(leaf)}", "  "), file=sys.stderr)
        if debug:
            import traceback

            traceback.print_exception(leaf, file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
