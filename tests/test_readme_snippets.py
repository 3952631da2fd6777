"""The ```python blocks of README.md run.

Each block runs in its own CPU python process (XLA's fast-compile flags: the snippets are about
behaviour, not speed) from a scratch directory that links the repo's `configs/` and `experiments/` (so
relative paths in the snippets work and their outputs land in the scratch dir).  A block whose first
line is `# gpu-only: <why>` is skipped with that reason.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "README.md"]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```", re.S | re.M)
GPU_ONLY = re.compile(r"#\s*gpu-only\s*:?\s*(.*)", re.I)
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def python_blocks(path: Path):
    """[(label "file:line", source)] of the ```python blocks of a markdown file."""
    text = path.read_text()
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    return [(f"{name}:{text.count(chr(10), 0, m.start()) + 2}", m.group(1)) for m in FENCE.finditer(text)]


def _collect():
    seen, out = set(), []
    for path in SOURCES:
        if not path.exists():
            continue
        for label, src in python_blocks(path):
            if src.strip() in seen:
                continue
            seen.add(src.strip())
            out.append(pytest.param(src, id=label))
    return out


BLOCKS = _collect()


def test_extraction_finds_blocks_and_markers(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("intro\n```python\nprint(1)\n```\n```bash\nls\n```\n```python\n# gpu-only: needs sm90\nx\n```\n")
    blocks = python_blocks(md)
    assert [b[0] for b in blocks] == ["x.md:3", "x.md:9"]
    assert [b[1] for b in blocks] == ["print(1)\n", "# gpu-only: needs sm90\nx\n"]
    assert GPU_ONLY.match(blocks[1][1].splitlines()[0]).group(1) == "needs sm90"
    assert len(BLOCKS) >= 9  # the API block + one per capability section


@pytest.mark.parametrize("src", BLOCKS)
def test_snippet_runs(src, tmp_path):
    first = src.strip().splitlines()[0] if src.strip() else ""
    m = GPU_ONLY.match(first)
    if m:
        pytest.skip(f"marked gpu-only: {m.group(1) or 'no reason given'}")
    for d in ("configs", "experiments"):
        (tmp_path / d).symlink_to(ROOT / d, target_is_directory=True)
    (tmp_path / "snippet.py").write_text(src)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_XLA, TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, f"snippet failed:\n{src}\n--- stderr ---\n{out.stderr[-3000:]}"
