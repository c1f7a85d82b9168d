"""Executes every notebook in colabs/ top to bottom on this machine, with small settings (CI's notebook step).

    python colabs/run_all.py [names...]

Each notebook runs in a fresh kernel with LAMPQ_COLAB_SMALL=1, in a temporary folder (its files land
there, not in the repository; LAMPQ_SCENIC_PATH points at tests/third_party/scenic). The notebooks in git
must have their outputs stripped; the executed copies are not written back. Exits 1 if any fails.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

COLABS = Path(__file__).resolve().parent
ROOT = COLABS.parent


def stripped(book) -> bool:
    """Whether no code cell of `book` holds outputs or an execution count."""
    return all(not c.get("outputs") and c.get("execution_count") is None for c in book.cells if c.cell_type == "code")


def printed(book) -> str:
    """The text the executed `book`'s cells printed (stdout streams), in cell order."""
    return "".join(o.get("text", "") for c in book.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")


def run(path: Path, timeout: int = 900) -> tuple[float, str]:
    """(seconds, printed text) of executing `path` in a fresh kernel; raises on the first failing cell."""
    book = nbformat.read(path, as_version=4)
    if not stripped(book):
        raise ValueError(f"{path.name} has outputs in git; strip them (jupyter nbconvert --clear-output)")
    os.environ.update(LAMPQ_COLAB_SMALL="1", LAMPQ_SCENIC_PATH=str(ROOT / "tests" / "third_party" / "scenic"))
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        NotebookClient(book, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": folder}}).execute()
        return time.perf_counter() - start, printed(book)


def main(names: list[str]) -> int:
    paths = [COLABS / f"{n.removesuffix('.ipynb')}.ipynb" for n in names] or sorted(COLABS.glob("*.ipynb"))
    failed = []
    for path in paths:
        try:
            seconds, text = run(path)
            print(f"executed {path.name} on CPU in {seconds:.0f} s", flush=True)
            print("".join(f"    {line}\n" for line in text.splitlines()[-12:]), end="", flush=True)
        except (CellExecutionError, ValueError, TimeoutError) as error:
            failed.append(path.name)
            print(f"FAILED {path.name}: {str(error)[-3000:]}", flush=True)
    print(f"notebooks: {len(paths) - len(failed)} of {len(paths)} executed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
