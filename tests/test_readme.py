"""The README as a newcomer reads it: set-up commands first, then install lines, then the design
card's commands; and its Python example runs as written (from a copy of the repository's samples)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from tests.conftest import SAMPLES

README = Path(__file__).resolve().parent.parent / "README.md"


def blocks(text: str, lang: str) -> list[tuple[int, str]]:
    return [(m.start(), m.group(1)) for m in re.finditer(rf"```{lang}\n(.*?)```", text, re.S)]


def test_readme_starts_with_setup_then_install_then_the_design_card():
    text = README.read_text()
    shell = blocks(text, "bash")
    first, second, third = (b for _, b in shell[:3])
    assert [ln.split("#")[0].strip() for ln in first.strip().splitlines()] == ["make demo", "make test"]
    assert "pip install" in second and "--index-url https://download.pytorch.org/whl/cpu" in second
    assert "uv pip install" in second and "fp8conv[gpu]" in second
    cmds = [ln.split("#")[0].strip() for ln in third.strip().splitlines()]
    assert "fp8conv quantize ckpt/" in cmds and "fp8conv dequantize ckpt-fp8/" in cmds
    assert any(c.endswith("fp8conv verify --reference ../ckpt") for c in cmds)
    assert text.index("```") == shell[0][0]  # the set-up block is the first one


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    section = text[text.index("## From Python") :]
    (_, code), *_ = blocks(section, "python")
    shutil.copytree(SAMPLES / "llama-tiny-bf16", tmp_path / "samples" / "llama-tiny-bf16")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README) + ":From Python", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "14 tensors to quantize" in out and "14 tensors converted" in out
    assert (tmp_path / "llama-fp8" / "model.safetensors").is_file()
    assert (tmp_path / "llama-bf16" / "model.safetensors").is_file()
    assert "torch.Size([4, 512])" in out
