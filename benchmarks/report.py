"""``python -m benchmarks.report``: regenerate ``docs/performance.md`` from ``benchmarks/results/*.json``.

Every benchmark writes ``benchmarks/results/<name>.json`` (numbers, the machine, the servers)
and ``<name>.md`` beside it (its tables). This page puts them together: the machine, a summary
of every comparison with its ratio and goal, each benchmark's own tables, and the profiles
(``--profile`` runs) when their summaries are present. Nothing here measures anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import sizing
from .output import RESULTS_DIR, markdown_table

DOCS = Path(__file__).resolve().parent.parent / "docs" / "performance.md"

#: Benchmarks in the order of the flow; others found in the results follow, alphabetically.
ORDER = ("bench_wrap", "bench_publish", "bench_bridge", "bench_worker", "bench_replay_step", "bench_drain")

HOW_TO_RUN = """\
```sh
make bench                                              # every benchmark, then this page
.venv/bin/python -m benchmarks --only bench_bridge      # one of them (options after it go to it)
.venv/bin/python -m benchmarks.bench_wrap --calls 5000 --rounds 5   # wrap() vs plain redis-py, per write
.venv/bin/python -m benchmarks.bench_bridge --ops 20000 --rounds 3 --brokers redis,amqp
.venv/bin/python -m benchmarks.bench_worker --ops 10000 --rounds 3 --workloads set,incrby
.venv/bin/python -m benchmarks.bench_drain --ops 100000 --kafka tansu --batch-size 1,default
.venv/bin/python -m benchmarks.bench_drain --ops 100000 --mix set   # the SET-only backlog (default: 5 commands)
.venv/bin/python -m benchmarks.bench_drain --kafka apache --curve size        # 10k, 100k, 1M ops
.venv/bin/python -m benchmarks.bench_drain --kafka apache --curve batch       # batch size 1, 100, 1000, 5000
.venv/bin/python -m benchmarks.bench_drain --kafka apache --curve targets     # 1, 2, 4 target redis-servers
.venv/bin/python -m benchmarks.bench_drain --kafka apache --curve non-idempotent   # 0-100% INCRBY/RPUSH
.venv/bin/python -m benchmarks.bench_drain --kafka apache --curve safety --repeat 3  # each feature ON vs OFF
.venv/bin/python -m benchmarks.bench_bridge --profile --ops 6000   # py-spy on the bridge + per-piece costs
.venv/bin/python -m benchmarks.bench_worker --profile --ops 4000   # py-spy on the worker's processes
.venv/bin/python -m benchmarks.report                   # regenerate this page from the results
```

`python -m benchmarks` hands every option other than `--only` to each benchmark it runs, so
options one benchmark does not know (`--batch-size`, `--curve`) need `--only`, e.g.
`make bench BENCH_ARGS="--only bench_drain --kafka apache --curve size"`. A curve writes
`benchmarks/results/bench_drain-<curve>.json` (and `.md`); its table has one row per point, each a full drain
of its own backlog in the same run, and every row names the Kafka broker (`--kafka embedded|tansu|apache`;
`apache` is a 3-broker cluster, replication factor 3, min.insync.replicas 2). `--points` replaces a curve's
values (`--curve size --points 5000,10000`); the embedded broker refuses backlogs over ~5 MiB per partition.
Profiling needs py-spy (`.venv/bin/pip install py-spy`). RabbitMQ rows need a RabbitMQ on 127.0.0.1:5672 (guest/guest,
or `CRR_BENCH_RABBITMQ_URL`); without one they are skipped and the results say so."""


def load_results(folder: Path = RESULTS_DIR) -> dict[str, dict[str, Any]]:
    """Every ``<name>.json`` result document in ``folder`` (profile summaries excluded)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.json")):
        if ".profile" in path.name:
            continue
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(document, dict) and "machine" in document:
            found[document.get("benchmark", path.stem)] = document
    return found


def summary_rows(results: dict[str, dict[str, Any]]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for name in _ordered(results):
        document = results[name]
        for entry in document.get("summary") or []:
            met = entry.get("met")
            rows.append([
                name, entry["what"], _number(entry.get("project")), _number(entry.get("raw")),
                entry.get("raw_what") or "-", entry.get("unit", ""),
                f"{entry['ratio']:.3g}x" if entry.get("ratio") is not None else "-", entry.get("goal") or "-",
                "-" if met is None else ("met" if met else "**MISSED**"), document.get("at", "?"),
            ])
    return rows


def _number(value: Any) -> Any:
    if value is None:
        return "-"
    if isinstance(value, float):
        return round(value) if value >= 100 else round(value, 2)
    return value


def _ordered(results: dict[str, Any]) -> list[str]:
    # "bench_bridge-batch100" sorts right after "bench_bridge".
    def key(name: str) -> tuple[int, str]:
        base = name.split("-", 1)[0]
        return (ORDER.index(base) if base in ORDER else len(ORDER), name)

    return sorted(results, key=key)


def _demoted(markdown: str, levels: int = 2) -> str:
    """A benchmark's own markdown under this page's headings (``#`` becomes ``###``)."""
    return "\n".join(("#" * levels + line) if line.startswith("#") else line for line in markdown.splitlines())


def _servers(results: dict[str, dict[str, Any]]) -> list[str]:
    seen: dict[str, str] = {}
    for document in results.values():
        for name, version in (document.get("servers") or {}).items():
            if version:
                seen[name] = version
    kafka = sorted({d["kafka_description"] for d in results.values() if d.get("kafka_description")})
    lines = [f"- {name}: {version}" for name, version in sorted(seen.items())]
    lines += [f"- Kafka: {k}" for k in kafka]
    if "bench_publish" in results:
        lines.append("- Kafka for bench_publish: embedded Kafka (librdkafka mock cluster) in its own process")
    return lines


def _profiles(folder: Path) -> list[str]:
    lines: list[str] = []
    def key(path: Path) -> tuple[str, int]:
        stem, _, batch = path.stem.partition("-batch")
        return (stem, int(batch) if batch.isdigit() else 1)

    for path in sorted(folder.glob("*.profile-*.json"), key=key):
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        lines += [f"### {path.stem}", ""]
        run = document.get("run", {})
        if "ops_s" in run:
            batch = document.get("batch_size", 1)
            lines += [f"Batch size {batch}; run under py-spy at {run['ops_s']:,.0f} ops/s (sampling slows it). "
                      f"Collapsed stacks in `benchmarks/results/{path.stem}.txt` after a `--profile` run "
                      "(not kept in git; speedscope.app reads them).", ""]
        if document.get("stages_us_per_op"):
            lines += ["Pieces of a one-task-per-op hand-over, timed in one process (best of 3):", "",
                      markdown_table(["stage", "us/op", "ops/s"], document["stages_us_per_op"]), ""]
        for key, title in (("self", "bridge loop"), ("children", "pool children"), ("all", "all worker processes")):
            part = document.get(key)
            if isinstance(part, dict):
                part_self = part.get("self", [])
            elif key == "self" and isinstance(part, list):
                part_self = part
            else:
                continue
            if part_self:
                lines += [f"Top self time, {title}:", "",
                          markdown_table(["frame", "% of samples"], part_self[:15]), ""]
                if key == "self":
                    lines += ["Wall-clock samples, waits included: `Bridge.run`'s own time is spent inside "
                              "confluent-kafka's native `consume()`, and socket frames (`redis/`, "
                              "`amqp/transport`) include waiting for the Celery broker's reply.", ""]
                elif key == "children":
                    lines += ["CPU samples only (py-spy without `--idle`).", ""]
    return lines


def render(results: dict[str, dict[str, Any]], folder: Path = RESULTS_DIR) -> str:
    """The whole page."""
    if not results:
        return "# Performance\n\nNo results yet: run `make bench`.\n"
    latest = max(results.values(), key=lambda d: d.get("at", ""))
    info = latest["machine"]
    machines = {d["machine"]["cpu"] for d in results.values()}
    loads = [f"{name} {' '.join(f'{x:.2f}' for x in d['machine'].get('load_average') or [])}"
             for name, d in ((n, results[n]) for n in _ordered(results))]
    lines = [
        "# Performance",
        "",
        "Generated by `python -m benchmarks.report` from `benchmarks/results/*.json`; do not edit by hand.",
        "Every benchmark runs this project and the raw library doing the same work in the same run, on "
        "loopback, and reports the ratio.",
        "",
        "## Machine",
        "",
        f"- CPU: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable); {info['python']}; {info['os']}",
        "- library versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v),
        *_servers(results),
        f"- load average (1, 5, 15 min) when each benchmark ended: {'; '.join(loads)}",
    ]
    if len(machines) > 1:
        lines.append(f"- **results come from different machines: {', '.join(sorted(machines))}**")
    lines += [
        "",
        "On 2 cores the benchmark, the brokers, the bridge and the worker all share the CPU: absolute rates "
        "are low and noisy, and a load average above ~1 before a run means another job was competing.",
        "",
        "## Summary",
        "",
        markdown_table(["benchmark", "what", "this project", "raw", "raw is", "unit", "project / raw", "goal",
                        "goal met", "measured at (UTC)"], summary_rows(results)),
        "",
    ]
    for name in _ordered(results):
        markdown_path = folder / f"{name}.md"
        lines += [f"## {name}", ""]
        if markdown_path.exists():
            body = markdown_path.read_text().strip().splitlines()
            # Its own title becomes the section's first line; its machine line is above.
            body = [line for line in body if not line.startswith("Machine: ")]
            lines += [_demoted("\n".join(body)), ""]
        else:
            lines += ["(no markdown beside the JSON)", ""]
    lines += sizing.section(results)
    profiles = _profiles(folder)
    if profiles:
        lines += ["## Profiles", "", *profiles]
    lines += ["## How to run", "", HOW_TO_RUN, ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    parser.add_argument("--results", default=str(RESULTS_DIR), help="folder of results JSON")
    parser.add_argument("--output", default=str(DOCS), help="page to write (default docs/performance.md)")
    args = parser.parse_args(list(argv))
    folder = Path(args.results)
    page = render(load_results(folder), folder)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(page)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
