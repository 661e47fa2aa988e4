"""Every example in bindings/python/examples runs standalone with this venv's Python, exits 0,
prints what it should, and leaves no temporary data dir behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

EXPECTED = {
    "quickstart.py": [
        "telemetry: 60 rows",
        "│ north  ┆ 2      ┆ 59.5           ┆ 0.64        │",
        "│ south  ┆ 1      ┆ 74.5           ┆ 0.46        │",
        "2024-05-01 08:05:00+00:00   59.0",
    ],
    "commands_and_twins.py": [
        "set_rpm -> {'ok': True, 'rpm': 1200}",
        "set_rpm failed: state=failed error='ValueError: rpm 9000 is out of range 1..3000'",
        "self_destruct: state=rejected",
        "the device applied: {'mode': 'eco'}",
        "twin now: {'reported': {'fw': '1.4.2', 'mode': 'eco'}, 'desired': {'mode': 'eco'}, 'delta': {}}",
        "stale version refused:",
    ],
}


def test_every_example_has_expectations() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_example_runs(name: str, tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONWARNINGS": "error"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True, text=True, encoding="utf-8", timeout=30, env=env, cwd=tmp_path,
    )
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.stdout.strip(), "the example printed nothing"
    for line in EXPECTED.get(name, []):
        assert line in done.stdout, f"{line!r} not in the output:\n{done.stdout}"
    assert "Traceback" not in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == [], "the example left files behind"  # its server's temp dir is gone
