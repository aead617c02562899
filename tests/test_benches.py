"""The synthetic scale benches still run against today's code, at toy sizes, and still agree with themselves.

Why: the README's scaling tables come from these scripts, and nothing else runs them; one of them
(``pair_search_scaling.py``) had fallen behind ``HashArrays`` and failed on its first line until session
16. Only their self-checks are asserted here (same decisions both ways, every planted copy found, no false
copy), never a timing: speed is measured by running them at full size.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _table_rows(out: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("|---")]


def test_dedupe_history_decides_as_the_one_query_walk():
    out = _bench("dedupe_history.py", "--history", "3000", "--tonight", "600")
    assert "same decisions on the first chunk: True" in out


def test_pair_search_scaling_searches_and_groups_as_the_walk():
    out = _bench("pair_search_scaling.py", "--sizes", "20000", "--sample", "300", "--compare", "1000")
    rows = _table_rows(out)
    assert any(row[0] == "20,000" for row in rows)
    verdicts = [row[-1] for row in rows if row[0].startswith("`PairSearch`")]
    assert verdicts and all(v == "True" for v in verdicts)


def test_copies_history_finds_every_planted_copy_and_no_other():
    out = _bench("copies_history.py", "--history", "3000", "--tonight", "300")
    header, *rows = [row for row in _table_rows(out) if len(row) == 6]
    found, false = rows[0][header.index("copies found")], rows[0][header.index("false copies")]
    got, planted = found.split("/")
    assert int(planted) > 0 and got == planted and false == "0"


def test_gpu_bench_cpu_half_runs_on_todays_scan(tmp_path):
    """``gpu_bench.py`` runs only on a lent GPU machine (JAX, no TensorFlow); its scan and decode lines use
    the project's own scan and decode, so they are run here at toy size to keep the script in step."""
    import json

    _bench("gpu_bench.py", "sample_catalog/images/t-shirts", "--n", "12", "--parts", "scan,decode", "--out", str(tmp_path))
    res = json.loads((tmp_path / "gpu_results.json").read_text())
    assert res["scan"] and all(rate > 0 for rate in res["scan"].values())
    assert all(rate > 0 for rate in res["pillow_decode"].values())
