"""The install contract: a clean import, and CI running exactly README's commands."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_is_warning_free():
    r = subprocess.run([sys.executable, "-W", "error", "-c", "import audit, chainer; print(chainer.__version__)"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "7.8.1" and r.stderr == ""


def _fenced_commands(section: str) -> list[str]:
    readme = (ROOT / "README.md").read_text()
    body = readme.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", body, re.S).group(1)
    return [ln for ln in block.splitlines() if ln.strip()]


def test_ci_runs_readmes_install_and_test_commands():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    (install,) = _fenced_commands("Install")
    (test,) = _fenced_commands("Test")
    assert install in ci
    # CI sets AUDIT_DATA_DIR itself (from ../shared), then runs the same test command
    assert test.split("python -m", 1)[1] in " ".join(ln for ln in ci if ln.startswith("python -m"))
