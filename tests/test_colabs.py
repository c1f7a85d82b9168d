"""The notebooks in colabs/: valid, outputs stripped, and each says which device it runs on. CI executes them
top to bottom after the tests (`colabs/run_all.py`, from scripts/test.sh)."""

import importlib.util
from pathlib import Path

import nbformat
import pytest

COLABS = Path(__file__).resolve().parents[1] / "colabs"
NOTEBOOKS = ("quickstart", "scenic_vit", "training_code")


def _runner():
    spec = importlib.util.spec_from_file_location("run_all", COLABS / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_valid_stripped_and_detects_the_device(name):
    book = nbformat.read(COLABS / f"{name}.ipynb", as_version=4)
    nbformat.validate(book)
    assert _runner().stripped(book)
    code = "\n".join(c.source for c in book.cells if c.cell_type == "code")
    assert "jax.default_backend()" in code and "LAMPQ_COLAB_SMALL" in code
    assert '"--no-deps"' in code  # the install keeps the runtime's jax / jaxlib / flax


def test_runner_refuses_a_notebook_with_outputs(tmp_path):
    book = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1", execution_count=1)])
    path = tmp_path / "dirty.ipynb"
    nbformat.write(book, path)
    with pytest.raises(ValueError, match="dirty.ipynb has outputs in git"):
        _runner().run(path)
