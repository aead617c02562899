"""One output contract: the Parquet schema, reserved names, label fields and the store index all come from it."""

import pandas as pd
import pyarrow as pa
from click.testing import CliRunner

from conftest import product_photo
from pipeline.cli import cli
from pipeline.contract import (BY_NAME, COLUMNS, INDEXED_FIELDS, LABEL_FIELDS, RESERVED_COLUMNS, STATUSES, Status,
                               output_schema, pass_through_names)
from pipeline.ops.store import INDEX_SCHEMA, STORE_ONLY
from pipeline.stages.ingest import ingest


def test_schema_reserved_names_and_index_agree_with_the_columns():
    names = [c.name for c in COLUMNS]
    assert output_schema([]).names == names
    assert RESERVED_COLUMNS == set(names)
    assert set(LABEL_FIELDS) <= set(names) and "label" in LABEL_FIELDS
    for f in INDEX_SCHEMA:
        if f.name in STORE_ONLY:
            continue
        assert f.name in BY_NAME, f"index field {f.name} is no output column"
        assert f.type == BY_NAME[f.name].type, f.name
    assert set(INDEXED_FIELDS) <= set(INDEX_SCHEMA.names)
    assert set(STATUSES) == {s.value for s in Status} and Status.SEEN == "seen"


def test_pass_through_names_never_collide():
    assert pass_through_names(["label", "input_label", "price"]) == ["input_label_2", "input_label", "price"]
    assert pass_through_names(["Status", "status"]) == ["input_Status", "input_status_2"]
    out = pass_through_names([c.name for c in COLUMNS] + ["input_row"])
    assert len({n.lower() for n in out}) == len(out) and not set(out) & RESERVED_COLUMNS


def test_ingest_remembers_where_the_manifest_label_went(tmp_path):
    (tmp_path / "m.csv").write_text("path,label,input_label\na.jpg,tops,x\n")
    batch = ingest(tmp_path / "m.csv")
    assert batch.column("label") == "input_label_2" and batch.column("LABEL") == "input_label_2"
    assert batch.extra_columns == ["input_label_2", "input_label"]


def test_a_manifest_with_every_output_column_name_round_trips(tmp_path):
    """Every output column name (and input_<name>) as a manifest column: nothing of the shop's is lost."""
    product_photo(seed=1).save(tmp_path / "a.jpg")
    product_photo((30, 30, 200), shape="bag", seed=2).save(tmp_path / "b.jpg")
    shop_cols = [c.name for c in COLUMNS if c.name not in ("path", "sku", "category_hint")] + ["input_label", "input_status"]
    header = ["path", "sku", "category_hint"] + shop_cols
    lines = [",".join(header)]
    for i, f in enumerate(("a.jpg", "b.jpg")):
        lines.append(",".join([f, f"S{i}", "tops"] + [f"shop-{c}-{i}" for c in shop_cols]))
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.parquet"
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "m.csv"), "-o", str(out), "--model", "tiny_test", "-q"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    df = pd.read_parquet(out)  # refuses duplicate field names
    assert len(df.columns) == len(set(df.columns))
    shop_values = {v for v in df.astype(str).to_numpy().ravel() if str(v).startswith("shop-")}
    assert shop_values == {f"shop-{c}-{i}" for c in shop_cols for i in (0, 1)}
    assert list(df["status"]) and set(df["status"]) <= set(STATUSES)


def test_pass_through_columns_are_strings_before_model():
    sch = output_schema(["price"])
    assert sch.field("price").type == pa.string() and sch.names.index("price") == sch.names.index("model") - 1
