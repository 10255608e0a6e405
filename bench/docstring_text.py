"""A CSV of real English sentences, offline: the docstrings of Python's standard library.

    python bench/docstring_text.py text.csv              # every sentence once (about 2,300 rows)
    python bench/docstring_text.py big.csv --rows 300000  # pairs of sentences, cycled, for a large set

Column ``text`` holds a sentence (or two), ``label`` which family of modules it documents: 0 for networking
and mail (email, http, urllib, smtplib, socket, ...), 1 for data and numbers (decimal, statistics, json,
csv, collections, datetime, ...). A classification task with real text, for the fine-tuning and data
benchmarks (docs/verdict.md, docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import inspect
import random
import re
from pathlib import Path

NETWORK = ["email", "email.message", "email.utils", "http.client", "http.server", "http.cookies", "urllib.request",
           "urllib.parse", "smtplib", "ftplib", "imaplib", "poplib", "socketserver", "xmlrpc.client", "ssl", "socket",
           "mailbox"]  # fmt: skip
DATA = ["decimal", "fractions", "statistics", "random", "json", "csv", "collections", "itertools", "datetime",
        "calendar", "heapq", "bisect", "array", "struct", "string", "textwrap", "difflib"]  # fmt: skip


def sentences(modules: list[str]) -> list[str]:
    found = set()
    for name in modules:
        module = importlib.import_module(name)
        docs = [inspect.getdoc(module) or ""]
        for _, obj in inspect.getmembers(module):
            if inspect.isfunction(obj) or inspect.isclass(obj):
                docs.append(inspect.getdoc(obj) or "")
                if inspect.isclass(obj):
                    docs += [inspect.getdoc(m) or "" for _, m in inspect.getmembers(obj, inspect.isfunction)]
        for doc in docs:
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if 5 <= len(sentence.split()) <= 40 and not any(c in sentence for c in "{}>|"):
                    found.add(sentence)
    return sorted(found)


def write_csv(out: str | Path, rows: int = 0) -> int:
    """The CSV at ``out``; ``rows`` = 0: every sentence once, more: pairs of sentences, cycled. Returns its rows."""
    table = [(s, 0) for s in sentences(NETWORK)] + [(s, 1) for s in sentences(DATA)]
    random.Random(0).shuffle(table)
    if rows:
        table = [
            (f"{table[i % len(table)][0]} {table[(7 * i + 3) % len(table)][0]}", table[i % len(table)][1])
            for i in range(rows)
        ]
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(table)
    return len(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--rows", type=int, default=0, help="0: every sentence once; more: pairs of sentences, cycled")
    args = parser.parse_args()
    print(f"{write_csv(args.out, args.rows)} rows -> {args.out}")


if __name__ == "__main__":
    main()
