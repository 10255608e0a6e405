"""Regenerate compare_golden.json: tests/test_core.py's comparison, with its folders made relative.

python tests/data/make_golden.py      # about a minute on 2 cores
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from launcher.launch import REPO  # noqa: E402
from tests.helpers import compare, write_compare_config  # noqa: E402
from tests.test_core import COMMON, MODES  # noqa: E402


def relative(value: object, prefixes: tuple[str, ...]) -> object:
    if isinstance(value, dict):
        return {k: relative(v, prefixes) for k, v in value.items()}
    if isinstance(value, list):
        return [relative(v, prefixes) for v in value]
    if isinstance(value, str):
        for prefix in prefixes:
            value = value.replace(prefix, "")
    return value


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        proc = compare(folder, write_compare_config(folder, MODES, COMMON))
        if proc.returncode not in (0, 1):
            raise SystemExit(proc.stderr[-3000:])
        result = json.loads((folder / "out" / "compare.json").read_text())
        result = relative(result, (f"{folder}/", f"{REPO}/"))
    (Path(__file__).parent / "compare_golden.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
