#!/usr/bin/env python3
"""Fails on an import circle or an import against the layers (part of the test command).

Reads every Rust file of the extension (src/) and of the rules crate (rules/src/), finds
which of the crate's modules each one names (`crate::a::b`, `super::x`, `self::x`), and
checks two things:
- the graph of modules is acyclic (a circle is printed, module by module);
- each module imports only from its own layer or the ones before it:
  rules < pg < engine < planning < run < surface (the rules crate may not import the
  extension at all: it does not depend on it).
A folder's mod.rs is the folder's module: what it re-exports from its files are its imports
(so a file that imports through its folder's re-export, not from its sibling, makes a
circle); lib.rs is the root.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["pg", "engine", "planning", "run", "surface"]
PATH = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
RAW = re.compile(r'b?r(#*)"')
CHAR = re.compile(r"'(?:\\.[^']*|[^'\\])'")


def modules(src: Path) -> dict[str, Path]:
    """Module path ("engine::write") -> file, for every file but lib.rs; a folder's mod.rs
    is the folder's module."""
    out = {}
    for f in sorted(src.rglob("*.rs")):
        rel = f.relative_to(src).with_suffix("")
        if rel.name == "lib":
            continue
        parts = rel.parts[:-1] if rel.name == "mod" else rel.parts
        out["::".join(parts)] = f
    return out


def code(text: str) -> str:
    """The text without comments, string and char literals (SQL in a string names no
    module), scanned as Rust's lexer does: raw strings end at their own count of #."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            i = text.find("\n", i)
            i = n if i < 0 else i
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif (m := RAW.match(text, i)) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            end = text.find('"' + m.group(1), m.end())
            i = n if end < 0 else end + 1 + len(m.group(1))
            out.append('""')
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
            out.append('""')
        elif c == "'" and (m := CHAR.match(text, i)):
            i = m.end()
            out.append("' '")
        else:
            out.append(c)
            i += 1
    return "".join(out)


def imports(module: str, text: str, known: dict[str, Path]) -> set[str]:
    """The known modules `module` names, through the longest prefix of each path."""
    found = set()
    path = module.split("::")
    # A file's `super` is its folder's module and its `self` the file's; a mod.rs's
    # `super` is the folder above, and its `self` (or a bare child name in a `use`) the
    # folder itself.
    folder = known[module].name == "mod.rs"
    own = path if folder else path[:-1]  # the folder a bare `super` of a file names
    if folder:
        for child in re.findall(r"^\s*(?:pub(?:\([a-z]+\))? )?use ([a-z_][a-z0-9_]*)::", code(text), re.M):
            if f"{module}::{child}" in known:
                found.add(f"{module}::{child}")
    for kind, rest in PATH.findall(code(text)):
        parts = rest.strip(":").split("::")
        base = [] if kind == "crate" else path if kind == "self" else own[:-1] if folder else own
        full = base + parts
        for k in range(len(full), 0, -1):
            candidate = "::".join(full[:k])
            if candidate in known:
                if candidate != module:
                    found.add(candidate)
                break
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]; counter[0] += 1
        stack.append(start); on.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]; counter[0] += 1
                    stack.append(nxt); on.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop(); on.discard(member); component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
    return out


def check(crates) -> tuple[list[str], list[str]]:
    """(problems, one summary line per crate) for [(crate name, its src folder)]."""
    problems, summaries = [], []
    for crate, src in crates:
        known = modules(src)
        graph = {m: imports(m, f.read_text(), known) for m, f in known.items()}
        for component in circles(graph):
            problems.append(f"{crate}: an import circle: {' -> '.join(component)}")
        if crate == "chat_backfill":
            for m, deps in sorted(graph.items()):
                layer = m.split("::")[0]
                if layer not in LAYERS:
                    problems.append(f"{m}: not in a layer folder ({', '.join(LAYERS)})")
                    continue
                for d in sorted(deps):
                    if LAYERS.index(d.split("::")[0]) > LAYERS.index(layer):
                        problems.append(f"{m} imports {d}: {layer} may import only from {LAYERS[:LAYERS.index(layer) + 1]}")
        else:
            for f in src.rglob("*.rs"):
                if re.search(r"\b(pgrx|chat_backfill)::", code(f.read_text())):
                    problems.append(f"{f.relative_to(ROOT)}: the rules import PostgreSQL or the extension")
        edges = sum(len(d) for d in graph.values())
        summaries.append(f"{crate}: {len(known)} modules, {edges} imports between them")
    return problems, summaries


def self_test() -> None:
    """The check must catch what it is for: a circle through a folder's re-export, a circle
    of two files in a string-free and a string-laden file, and an import against the
    layers. Built in a temporary tree, so a check that found nothing fails here first."""
    import tempfile
    files = {
        "src/pg/mod.rs": "pub mod a;\npub mod b;\n",
        "src/pg/a.rs": 'const Q: &str = r#"SELECT "x" crate::pg::zz"#;\nuse crate::pg::b::B;\n',
        "src/pg/b.rs": "// crate::pg::a is only a comment\nuse crate::pg::a::A;\nuse crate::engine::w::W;\n",
        "src/engine/mod.rs": "pub mod w;\npub mod v;\npub use v::V;\n",
        "src/engine/w.rs": "pub struct W;\n",
        "src/engine/v.rs": "use super::V;\n",
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / name).write_text(text)
        problems, _ = check([("chat_backfill", Path(tmp) / "src")])
    expected = ["an import circle: pg::a -> pg::b", "an import circle: engine -> engine::v",
                "pg::b imports engine::w: pg may import only"]
    missed = [e for e in expected if not any(e in p for p in problems)]
    if missed or len(problems) != len(expected):
        sys.exit(f"import graph check: its self-test failed: missed {missed}, found {problems}")


def main() -> int:
    self_test()
    problems, summaries = check([("chat_backfill_rules", ROOT / "rules" / "src"), ("chat_backfill", ROOT / "src")])
    for line in summaries:
        print(line)
    for p in problems:
        print("  " + p)
    print("import graph: " + ("FAILED" if problems else "acyclic, layers respected: passed"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
