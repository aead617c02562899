import os
import re

import pyarrow.parquet as pq
import pytest

from conftest import REPO
from pipeline.ops.fsutil import atomic_path
from pipeline.contract import COLUMNS, SCHEMA_VERSION
from pipeline.stages.output import to_table, write_parquet


def _rows(n):
    return [{"row": i, "path": f"p{i}.jpg", "status": "error", "error": "missing", "extra": "x"} for i in range(n)]


def test_schema_and_metadata_round_trip(tmp_path):
    out = write_parquet(to_table(_rows(3), ["extra"], {"run_id": "r1"}), tmp_path / "o.parquet")
    table = pq.read_table(out)
    names = table.schema.names
    assert names.index("extra") == names.index("model") - 1  # pass-through before model
    meta = table.schema.metadata
    assert meta[b"labelcat.schema_version"] == SCHEMA_VERSION.encode()
    assert b'"run_id": "r1"' in meta[b"labelcat.run"]
    assert table.column("row").to_pylist() == [0, 1, 2]


def test_atomic_write_keeps_the_previous_file_when_a_write_dies(tmp_path):
    out = tmp_path / "o.parquet"
    write_parquet(to_table(_rows(2), [], {}), out)
    with pytest.raises(RuntimeError):
        with atomic_path(out, suffix=".parquet") as tmp:
            tmp.write_bytes(b"PAR1 half a file")
            raise RuntimeError("killed mid-write")
    assert pq.read_table(out).num_rows == 2
    assert [p.name for p in tmp_path.iterdir()] == ["o.parquet"]  # no temporary left behind


def test_readme_documents_every_column():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Parquet schema", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `([a-z0-9_]+)` \|", section, flags=re.M)
    assert documented == [c.name for c in COLUMNS]


def test_outputs_are_readable_by_other_users_as_the_umask_allows(tmp_path):
    old = os.umask(0o022)
    try:
        out = write_parquet(to_table(_rows(1), ["extra"], {}), tmp_path / "o.parquet")
        assert oct(out.stat().st_mode & 0o777) == oct(0o644)
    finally:
        os.umask(old)
