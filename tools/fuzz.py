"""Fuzz every route of a running GenServe from its own OpenAPI schema (schemathesis), seeded and bounded.

For each operation in GET /openapi.json the tool draws up to --examples cases from a fixed --seed, mixing
schemathesis' positive (schema-valid) and negative (schema-breaking) generation, sends them, and records every
answer that is a server error (5xx: schemathesis' not_a_server_error check) and every request that got no answer
at all. Afterwards the server must still
answer /health, and /status must show no worker restart and no dead worker.

The same --seed and --examples against the same schema send the same cases. Every valid request the fuzzer
invents runs a real job: point it at a server with small limits (limits.max_size, limits.max_steps), never at a
production GPU pool.

Exit code 0 when nothing failed, 1 when a case got a 5xx or no answer, a worker restarted, or the server died.

Usage:
    python tools/fuzz.py                                              # localhost:12411, 50 cases per operation
    python tools/fuzz.py --url http://127.0.0.1:12488 --examples 200 --seed 7
    python tools/fuzz.py --operation 'GET /jobs' --operation 'POST /generate' --json fuzz-report.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import ToolError, add_connection_arguments, console, fail, make_session, request_json  # noqa: E402

# Hypothesis caches what it learns under ./.hypothesis unless told otherwise: keep the caller's folder clean.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(Path(tempfile.gettempdir()) / "genserve-fuzz-hypothesis"))

try:
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.errors import FailureGroup, SerializationError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise SystemExit(f"fuzz.py needs schemathesis ({exc}): pip install -e '.[test]'") from None


def _ignore_project_literals() -> None:
    """Hypothesis also draws literals it finds in the caller's own modules (here: this tool and _cli.py), so any edit
    to them would change the cases a seed sends. Mark every module loaded so far as already read, so that a seed
    stands for the same cases whatever the code around it. Private Hypothesis state: if it moves, only that
    guarantee is lost (a seed still repeats its cases as long as the tools are unchanged)."""
    try:
        from hypothesis.internal.conjecture import providers
    except ImportError:  # pragma: no cover - a Hypothesis without the feature
        return
    seen = getattr(providers, "_seen_modules", None)
    if isinstance(seen, set):
        seen.update(id(module) for module in list(sys.modules.values()))


DEFAULT_EXAMPLES = 50
DEFAULT_SEED = 20261121
KEPT_FAILURES = 100  # failures kept per operation in the report (all are counted)
SHOWN_FAILURES = 5  # distinct failures (status and body) printed per operation
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}

# --- the run ---------------------------------------------------------------------------------------------------


@dataclass
class Failure:
    operation: str
    status: int | None  # None: no answer (connection reset, timeout)
    reason: str  # schemathesis' check message, or the transport error
    curl: str  # the request, replayable
    response: str  # the start of the body


@dataclass
class OperationReport:
    operation: str
    cases: int = 0
    unsendable: int = 0  # cases schemathesis could not serialise for the media type (nothing was sent)
    statuses: dict[int, int] = field(default_factory=dict)  # status code → answers
    failed: int = 0
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Report:
    url: str
    seed: int
    examples: int
    schemathesis_version: str
    operations: list[OperationReport]
    restarts_before: int
    restarts_after: int | None  # None: /status did not answer after the run
    dead_after: int | None
    alive_after: bool

    @property
    def cases(self) -> int:
        return sum(op.cases for op in self.operations)

    @property
    def failed(self) -> int:
        return sum(op.failed for op in self.operations)

    @property
    def ok(self) -> bool:
        return (
            self.failed == 0
            and self.alive_after
            and self.restarts_after == self.restarts_before
            and not self.dead_after
        )

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["cases"] = self.cases
        data["failed"] = self.failed
        data["ok"] = self.ok
        for op in data["operations"]:
            op["statuses"] = {str(code): count for code, count in sorted(op["statuses"].items())}  # JSON keys
        return data


def load_schema(session: requests.Session, base: str, timeout: float) -> tuple[dict[str, Any], schemathesis.BaseSchema]:
    """The live schema, as JSON and as schemathesis reads it."""
    _, raw_schema = request_json(session, "GET", f"{base}/openapi.json", timeout=timeout)
    if not isinstance(raw_schema, dict) or not isinstance(raw_schema.get("paths"), dict):
        raise ToolError(f"{base}/openapi.json is not an OpenAPI schema")
    # An explicit config: a schemathesis.toml lying around must not change what is sent.
    schema = schemathesis.openapi.from_dict(copy.deepcopy(raw_schema), config=schemathesis.Config())
    return raw_schema, schema


def _short(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fuzz_operation(
    operation: schemathesis.APIOperation,
    base: str,
    session: requests.Session,
    *,
    examples: int,
    seed_value: int,
    timeout: float,
) -> OperationReport:
    """Send up to ``examples`` cases to one operation; collect, never raise, what went wrong."""
    report = OperationReport(operation.label)
    strategy = st.one_of(
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )

    def record(failure: Failure) -> None:
        report.failed += 1
        if len(report.failures) < KEPT_FAILURES:
            report.failures.append(failure)

    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        derandomize=False,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @seed(seed_value)
    @given(case=strategy)
    def one_case(case: schemathesis.Case) -> None:
        try:
            response = case.call(base_url=base, session=session, timeout=timeout)
        except SerializationError:
            report.unsendable += 1
            return
        except requests.RequestException as exc:
            report.cases += 1
            curl = case.as_curl_command(base_url=base)
            record(Failure(operation.label, None, f"no answer: {_short(str(exc), 300)}", curl, ""))
            return
        report.cases += 1
        report.statuses[response.status_code] = report.statuses.get(response.status_code, 0) + 1
        try:
            case.validate_response(response, checks=[not_a_server_error])
        except FailureGroup as group:
            reason = "; ".join(failure.title for failure in group.exceptions)
            body = response.content.decode("utf-8", errors="replace")
            curl = case.as_curl_command(base_url=base)
            record(Failure(operation.label, response.status_code, reason, curl, _short(body)))

    began = time.perf_counter()
    one_case()
    report.seconds = round(time.perf_counter() - began, 3)
    return report


def _worker_counts(session: requests.Session, base: str, timeout: float) -> tuple[int, int]:
    _, status = request_json(session, "GET", f"{base}/status", timeout=timeout)
    manager = status["concurrent_manager"]
    return int(manager["total_restarts"]), int(manager["dead_processes"])


def _alive(session: requests.Session, base: str) -> bool:
    try:
        return session.get(f"{base}/health", timeout=10).status_code == 200
    except requests.RequestException:
        return False


def run(
    base: str,
    session: requests.Session,
    *,
    examples: int,
    seed_value: int,
    timeout: float,
    only: list[str] | None = None,
) -> Report:
    raw_schema, schema = load_schema(session, base, timeout)
    available = [
        schema[path][method]
        for path, item in raw_schema["paths"].items()
        for method in item
        if method.lower() in HTTP_METHODS
    ]
    selected = available
    if only:
        wanted = {_normalised(label) for label in only}
        missing = wanted - {_normalised(operation.label) for operation in available}
        if missing:
            raise ToolError(f"no such operation in the schema: {', '.join(sorted(missing))}")
        selected = [operation for operation in available if _normalised(operation.label) in wanted]
    restarts_before, _ = _worker_counts(session, base, timeout)
    _ignore_project_literals()
    operations: list[OperationReport] = []
    for operation in selected:
        report = fuzz_operation(operation, base, session, examples=examples, seed_value=seed_value, timeout=timeout)
        operations.append(report)
        if not _alive(session, base):
            break  # the server is gone: the rest would only repeat that
    alive = _alive(session, base)
    restarts_after: int | None = None
    dead_after: int | None = None
    if alive:
        restarts_after, dead_after = _worker_counts(session, base, timeout)
    return Report(
        url=base,
        seed=seed_value,
        examples=examples,
        schemathesis_version=schemathesis.__version__,
        operations=operations,
        restarts_before=restarts_before,
        restarts_after=restarts_after,
        dead_after=dead_after,
        alive_after=alive,
    )


def _normalised(label: str) -> str:
    """'get /jobs' → 'GET /jobs': the method in capitals, the path as written."""
    method, _, path = label.strip().partition(" ")
    return f"{method.upper()} {path.strip()}"


def _statuses(statuses: dict[int, int]) -> str:
    return " ".join(f"{code}×{count}" for code, count in sorted(statuses.items()))


def print_report(report: Report) -> None:
    from rich.table import Table

    table = Table(title=f"fuzz of {report.url} (seed {report.seed}, up to {report.examples} cases per operation)")
    table.add_column("operation")
    table.add_column("cases", justify="right")
    table.add_column("answers")
    table.add_column("5xx / no answer", justify="right")
    table.add_column("s", justify="right")
    for op in report.operations:
        flag = f"[bold red]{op.failed}[/]" if op.failed else "0"
        table.add_row(op.operation, str(op.cases), _statuses(op.statuses), flag, f"{op.seconds:.1f}")
    console.print(table)
    for op in report.operations:
        shown: set[tuple[int | None, str]] = set()
        for failure in op.failures:
            key = (failure.status, failure.response[:200])
            if key in shown or len(shown) == SHOWN_FAILURES:
                continue
            shown.add(key)
            status = failure.status if failure.status is not None else "no answer"
            console.print(f"[bold red]FAIL[/] {failure.operation} → {status}: {failure.reason}", highlight=False)
            console.print(f"    {failure.curl}", highlight=False, soft_wrap=True)
            if failure.response:
                console.print(f"    {failure.response}", highlight=False, soft_wrap=True)
    if not report.alive_after:
        console.print("[bold red]FAIL[/] the server no longer answers /health")
    elif report.restarts_after != report.restarts_before or report.dead_after:
        console.print(
            f"[bold red]FAIL[/] workers restarted during the run: total_restarts {report.restarts_before} → "
            f"{report.restarts_after}, dead_processes {report.dead_after}"
        )
    unsendable = sum(op.unsendable for op in report.operations)
    console.print(
        f"fuzz cases: {report.cases} over {len(report.operations)} operations; "
        f"5xx or no answer: {report.failed}; "
        f"{f'not sendable as their media type: {unsendable}; ' if unsendable else ''}"
        f"schemathesis {report.schemathesis_version}; "
        f"{'OK' if report.ok else 'FAILED'}",
        highlight=False,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Fuzz every GenServe route from its OpenAPI schema (schemathesis): no 5xx, no crash.",
        epilog="examples:\n  python tools/fuzz.py --url http://127.0.0.1:12411 --examples 100 --seed 7\n"
        "  python tools/fuzz.py --operation 'GET /jobs' --json fuzz-report.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_connection_arguments(parser)
    parser.add_argument(
        "--examples", type=int, default=DEFAULT_EXAMPLES, help=f"cases per operation (default {DEFAULT_EXAMPLES})"
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"generation seed (default {DEFAULT_SEED})")
    parser.add_argument(
        "--operation",
        action="append",
        metavar="'METHOD /path'",
        help="fuzz only this operation, as the schema names it (repeatable; default: every operation)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the full report as JSON")
    args = parser.parse_args(argv)
    if args.examples < 1:
        parser.error("--examples must be at least 1")
    base = args.url.rstrip("/")
    session = make_session(args.api_key)
    try:
        report = run(
            base,
            session,
            examples=args.examples,
            seed_value=args.seed,
            timeout=args.timeout,
            only=args.operation,
        )
    except ToolError as exc:
        fail(str(exc))
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report.as_json(), indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
