#!/usr/bin/env python3
"""Print the package dependency graph: for each package, the packages its modules import.

    .venv/bin/python scripts/import_graph.py [--root DIR] [PACKAGE ...]

Defaults to the packages of the import contract in pyproject.toml ([tool.importlinter]), so the
graph shown is the one `make test` checks. Cycles between packages, if any, are listed after it.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def package_graph(packages: list[str]) -> dict[str, set[str]]:
    graph = grimp.build_graph(*packages, cache_dir=None)
    edges: dict[str, set[str]] = {p: set() for p in packages}
    for module in graph.modules:
        src = module.split(".")[0]
        for imported in graph.find_modules_directly_imported_by(module):
            dst = imported.split(".")[0]
            if dst != src:
                edges[src].add(dst)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Pairs of packages that reach each other."""

    def reach(a: str) -> set[str]:
        seen, todo = set(), [a]
        while todo:
            for b in edges.get(todo.pop(), ()):
                if b not in seen:
                    seen.add(b)
                    todo.append(b)
        return seen

    closure = {p: reach(p) for p in edges}
    return sorted((a, b) for a in edges for b in edges if a < b and b in closure[a] and a in closure[b])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("packages", nargs="*", help="top-level packages (default: those of the import contract)")
    p.add_argument("--root", type=Path, default=ROOT, help="the checkout to read (default: this one)")
    args = p.parse_args(argv)
    if not (args.root / "pyproject.toml").is_file():
        p.error(f"--root {args.root}: no pyproject.toml there")
    packages = (
        args.packages
        or tomllib.loads((args.root / "pyproject.toml").read_text())["tool"]["importlinter"]["root_packages"]
    )
    sys.path.insert(0, str(args.root.resolve()))
    try:
        edges = package_graph(packages)
    except (grimp.exceptions.SourceSyntaxError, ValueError) as e:
        print(f"import_graph: {e}", file=sys.stderr)
        return 2
    for src in packages:
        print(f"{src:<11} -> {', '.join(sorted(edges[src])) or '(nothing)'}")
    found = cycles(edges)
    print(f"\npackage cycles: {len(found)}" + "".join(f"\n  {a} <-> {b}" for a, b in found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
