#!/usr/bin/env python3
"""The walk of one request, printed and counted.

`src/lib.rs` lists, under "# Reading one request", the files a reader opens to follow one
phase-1 request from `accept` to the answer, and in each the functions to read. Each numbered
item names its file first (`server/mod.rs`, relative to `src/`) and then, all in backticks, its
functions (`serve_one`, or `Backend::connection` where a file has two of the name).

This script prints the walk as a reader meets it: for each file, its opening `//!` header and the
whole text of each named function (doc comments and attributes included), then the lines and
files of the whole. The walk must stay short enough to read in one sitting: more than
MAX_LINES lines or MAX_FILES files exits with 1; a file or function the list names that does not
exist exits with 2.

    python3 scripts/walk.py            # the walk, then the count
    python3 scripts/walk.py --summary  # the count only
"""

import argparse
import re
import sys
from pathlib import Path

MAX_LINES = 700
MAX_FILES = 8

LIST_HEADING = "//! # Reading one request"
ITEM_START = re.compile(r"^//! \d+\. ")
BACKTICKED = re.compile(r"`([^`]+)`")
FN_LINE = re.compile(r"^(\s*)(?:pub(?:\([^)]*\))? )?(?:const )?(?:unsafe )?fn ([A-Za-z_][A-Za-z0-9_]*)\b")
IMPL_LINE = re.compile(r"^impl\b(?:<[^>]*>)?\s+(?:[A-Za-z_:]+(?:<[^>]*>)?\s+for\s+)?([A-Za-z_][A-Za-z0-9_]*)")


def reading_order(lib_rs):
    """The numbered items under the list's heading: (path, [function names]) each."""
    lines = lib_rs.read_text(encoding="utf-8").splitlines()
    try:
        start = lines.index(LIST_HEADING)
    except ValueError:
        raise SystemExit(f"{lib_rs}: no '{LIST_HEADING}' section")
    items = []
    for line in lines[start + 1 :]:
        if not line.startswith("//!") or line.startswith("//! #"):
            break
        if ITEM_START.match(line):
            items.append(line[len("//! ") :])
        elif items and line.startswith("//!    "):
            items[-1] += " " + line[len("//!    ") :]
        elif items:
            break
    order = []
    for item in items:
        names = BACKTICKED.findall(item)
        if not names or not names[0].endswith(".rs"):
            raise SystemExit(f"{lib_rs}: an item does not name its file first: {item}")
        order.append((names[0], names[1:]))
    return order


def header(lines):
    """The module's opening `//!` lines."""
    count = 0
    while count < len(lines) and lines[count].startswith("//!"):
        count += 1
    return lines[:count]


def functions(lines):
    """Every function outside the tests: (impl type or None, name, first line, last line)."""
    found = []
    impl = None
    for number, line in enumerate(lines):
        if line.startswith("#[cfg(test)]") and number + 1 < len(lines) and lines[number + 1].startswith("mod "):
            break
        if line.startswith("impl"):
            match = IMPL_LINE.match(line)
            impl = match.group(1) if match else None
        elif line and not line[0].isspace() and not line.startswith(("//", "#", "}")):
            impl = None
        match = FN_LINE.match(line)
        if not match:
            continue
        indent, name = match.groups()
        first = number
        while first > 0 and lines[first - 1].startswith((indent + "///", indent + "#[")):
            first -= 1
        last = number
        if not line.rstrip().endswith("}"):
            while last + 1 < len(lines) and lines[last].rstrip() != indent + "}":
                last += 1
        found.append((impl if indent else None, name, first, last))
    return found


def find(path, all_functions, wanted):
    """The function `wanted` (`name` or `Type::name`) of a file, or why it cannot be found."""
    owner, _, name = wanted.rpartition("::")
    matches = [f for f in all_functions if f[1] == name and (not owner or f[0] == owner)]
    if not matches:
        return None, f"{path}: no function `{wanted}`"
    if len(matches) > 1:
        return None, f"{path}: `{wanted}` is ambiguous; name it as `Type::{name}`"
    return matches[0], None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--summary", action="store_true", help="print the count only")
    parser.add_argument("--root", default=Path(__file__).resolve().parent.parent, type=Path,
                        help="the package's directory (default: this script's package)")
    args = parser.parse_args()
    src = args.root / "src"

    problems = []
    rows = []
    for path, wanted in reading_order(src / "lib.rs"):
        file = src / path
        if not file.is_file():
            problems.append(f"{path}: no such file under src/")
            continue
        lines = file.read_text(encoding="utf-8").splitlines()
        top = header(lines)
        all_functions = functions(lines)
        parts = [("//!", top)]
        for name in wanted:
            function, problem = find(path, all_functions, name)
            if problem:
                problems.append(problem)
                continue
            _, _, first, last = function
            parts.append((name, lines[first : last + 1]))
        rows.append((path, parts))

    if not args.summary:
        for path, parts in rows:
            print(f"==== src/{path}")
            for name, text in parts:
                print(f"---- {name} ({len(text)} lines)")
                print("\n".join(text))
            print()

    total = 0
    for path, parts in rows:
        lines = sum(len(text) for _, text in parts)
        total += lines
        detail = ", ".join(f"{name} {len(text)}" for name, text in parts)
        print(f"{lines:5}  src/{path}  ({detail})")
    print(f"{total:5}  lines over {len(rows)} files (at most {MAX_LINES} over {MAX_FILES})")

    if problems:
        print("\n".join(["", "The reading order in src/lib.rs names what does not exist:"] + problems))
        return 2
    if total > MAX_LINES or len(rows) > MAX_FILES:
        print("The walk is too long: move what a first reading can skip into a side room.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
