"""examples/partition_slerp.ipynb runs top to bottom in a kernel of this interpreter, offline."""

import json
import os
import sys

import ipykernel  # noqa: F401  (the kernel below runs it; all three are in the `test` extra)
import nbclient
import nbformat
import pytest

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "examples", "partition_slerp.ipynb")


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "strip the outputs before committing"


def _kernel_of_this_interpreter(root) -> str:
    """A kernelspec that runs sys.executable, so the notebook sees the installed package."""
    spec = root / "kernels" / "partition-slerp-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "partition-slerp test",
                "language": "python",
            }
        )
    )
    return "partition-slerp-test"


def _text(output) -> str:
    if output.output_type == "stream":
        return output.text
    return output.get("data", {}).get("text/plain", "")


@pytest.mark.slow  # a Jupyter kernel runs the whole notebook
def test_notebook_runs(tmp_path, monkeypatch):
    for var, sub in (
        ("JUPYTER_PATH", "."),
        ("JUPYTER_RUNTIME_DIR", "runtime"),
        ("IPYTHONDIR", "ipython"),
        ("MPLCONFIGDIR", "mpl"),
    ):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws the figures
    kernel = _kernel_of_this_interpreter(tmp_path)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name=kernel, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell errors

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(_text(o) for o in outputs)
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2, "the heatmaps of both seeds are drawn inline"
    assert text.count("partition_slerp plan: 12 layers of model.layers in 6 bins, seed 0") == 1
    assert "base (bit for bit): model.embed_tokens.weight, model.norm.weight, lm_head.weight" in text
    assert "layers changed donor" in text and "moved toward" in text
    assert "model.safetensors" in text and "partition.json" in text  # listing of the CLI's output
    assert "MistralForCausalLM" in text
    hashes = {line.split()[-1] for line in text.splitlines() if line.startswith(("run 1 ", "run 2 ", "in memory "))}
    assert len(hashes) == 1 and len(hashes.pop()) == 64
    assert "identical" in text
