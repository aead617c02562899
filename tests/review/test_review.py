"""The review loop as a person drives it: run → export → fill in → import → run → train."""

import csv
import zipfile

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from openpyxl import load_workbook

from conftest import SAMPLE, product_photo
from pipeline.cli import cli


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    work = tmp_path_factory.mktemp("night")
    out = work / "run1.parquet"
    # --catalogue all: among all 29 categories the juice cartons look like lotion, so their folder decides
    # and a person is asked to confirm it (the loop this module follows; the shop's catalogue decides them)
    r = invoke("run", SAMPLE / "manifest.csv", "--out", out, "--corrections", work / "corrections", "--quiet",
               "--catalogue", "all")
    assert r.exit_code == 0, r.output
    return work, out


def _sheet_rows(path):
    ws = load_workbook(path)["review"]
    header = [c.value for c in ws[1]]
    return ws, header


@pytest.mark.slow
def test_the_whole_loop(night, tmp_path):
    work, run1 = night
    xlsx = tmp_path / "review.xlsx"
    r = invoke("review", "export", run1, "--out", xlsx)
    assert r.exit_code == 0 and "rows to review" in r.output
    wb = load_workbook(xlsx)
    ws = wb["review"]
    header = [c.value for c in ws[1]]
    col = {name: i + 1 for i, name in enumerate(header)}
    assert header[0] == "thumbnail" and header[-3:] == ["sha256", "corrected_label", "note"]
    assert ws.freeze_panes == "B2"
    assert len(ws._images) == ws.max_row - 1  # a thumbnail per row
    confidences = [ws.cell(i, col["confidence"]).value for i in range(2, ws.max_row + 1)]
    assert confidences == sorted(confidences)  # least confident first
    dv = ws.data_validations.dataValidation[0]
    assert dv.type == "list" and "labelcat" in dv.formula1
    labels_row = [c.value for c in wb["labelcat"][4]][1:]
    assert "food_drink" in labels_row and labels_row[-2:] == ["junk", "duplicate"]

    paths = {ws.cell(i, col["path"]).value: i for i in range(2, ws.max_row + 1)}
    juice = paths["images/juices/fd_juice_02.jpg"]  # the photo alone says beauty_health: a person confirms the folder
    astronaut = paths["images/t-shirts/astronaut.jpg"]
    ws.cell(juice, col["corrected_label"], "food_drink")
    ws.cell(juice, col["note"], "it is juice")
    ws.cell(astronaut, col["corrected_label"], "junk")
    wb.save(xlsx)

    store = work / "corrections"
    r = invoke("review", "import", xlsx, "--corrections", store, "--reviewer", "maria")
    assert r.exit_code == 0, r.output
    assert "2 corrections stored" in r.output

    run2 = tmp_path / "run2.parquet"
    r = invoke("run", SAMPLE / "manifest.csv", "--out", run2, "--corrections", store, "--catalogue", "all")
    assert r.exit_code == 0 and "labelled by people" in r.output
    t = pq.read_table(run2).to_pandas().set_index("path")
    j = t.loc["images/juices/fd_juice_02.jpg"]
    assert (j.label, j.label_source, j.status, j.confidence) == ("food_drink", "human", "labelled", 1.0)
    crop = t.loc["images/juices/fd_juice_02_crop.jpg"]  # its near duplicate inherits the human label
    assert (crop.status, crop.label, crop.label_source) == ("duplicate", "food_drink", "human")
    a = t.loc["images/t-shirts/astronaut.jpg"]
    assert a.status == "junk" and a.junk_reason.startswith("human: marked junk by maria")
    assert t.loc["images/juices/fd_juice_01.jpg"].label_source == "hint"  # no person decided: the folder did

    again = tmp_path / "again.xlsx"
    invoke("review", "export", run2, "--out", again)
    _, header = _sheet_rows(again)
    ws2 = load_workbook(again)["review"]
    exported = {ws2.cell(i, header.index("path") + 1).value for i in range(2, ws2.max_row + 1)}
    assert "images/juices/fd_juice_02.jpg" not in exported  # a person already decided


@pytest.mark.slow
def test_train_learns_from_corrections(tmp_path):
    """Corrections are training data: the loop closes with `labelcat train STORE`."""
    out = tmp_path / "run.parquet"
    assert invoke("run", SAMPLE / "images" / "juices", "--out", out, "--quiet", "--corrections", tmp_path / "none").exit_code == 0
    csv_path = tmp_path / "review.csv"
    assert invoke("review", "export", out, "--out", csv_path, "--threshold", "1").exit_code == 0
    lines = list(csv.reader(open(csv_path, encoding="utf-8-sig")))
    header, body = lines[0], lines[1:]  # a plain CSV: the header is the first line
    for cells in body:
        cells[header.index("corrected_label")] = "food_drink" if "fd_juice" in cells[header.index("path")] else "kitchen"
    with open(csv_path, "w", encoding="utf-8-sig", newline="") as fh:
        csv.writer(fh).writerows([header, *body])
    store = tmp_path / "store"
    r = invoke("review", "import", csv_path, "--run", out, "--corrections", store)
    assert r.exit_code == 0, r.output
    r = invoke("train", store, "--out", tmp_path / "model", "--epochs", "1", "--fine-tune-epochs", "0", "--quiet")
    assert r.exit_code == 0, r.output
    import json

    card = json.loads((tmp_path / "model" / "card.json").read_text())
    assert card["classes"] == ["food_drink", "kitchen"]


@pytest.mark.slow
def test_a_bad_sheet_is_refused_row_by_row_and_nothing_is_stored(night, tmp_path):
    _, run1 = night
    xlsx = tmp_path / "bad.xlsx"
    invoke("review", "export", run1, "--out", xlsx)
    wb = load_workbook(xlsx)
    ws = wb["review"]
    col = {c.value: c.column for c in ws[1]}
    ws.cell(2, col["corrected_label"], "shrts")  # not a label
    ws.cell(3, col["sku"], "EDITED-SKU")  # key column edited
    ws.cell(4, col["corrected_label"], "tops")  # a good row: must not be applied either
    ws.cell(5, col["row"], 999)  # not in the run
    wb.save(xlsx)
    store = tmp_path / "store"
    r = invoke("review", "import", xlsx, "--corrections", store)
    assert r.exit_code == 2
    assert "sheet 'review' row 2: corrected_label 'shrts' is not a valid label" in r.output
    assert "sheet 'review' row 3: sku was edited ('EDITED-SKU'" in r.output
    assert "sheet 'review' row 5: row 999 is not in run" in r.output
    assert not store.exists()


@pytest.fixture()
def hostile_run(tmp_path):
    """Cells that a spreadsheet would execute: in a SKU, a file name and a carried column."""
    (tmp_path / "img").mkdir()
    for name, color in (("=1+1.jpg", (200, 30, 30)), ("plain.jpg", (20, 150, 140))):
        product_photo(color).save(tmp_path / "img" / name)
    (tmp_path / "m.csv").write_text(
        'sku,path,comment\n"=HYPERLINK(""http://evil.example"",""click"")",img/=1+1.jpg,@SUM(1+1)\n'
        '"+cmd|\' /C calc\'!A0",img/plain.jpg,"-2+3"\n', encoding="utf-8")
    out = tmp_path / "run.parquet"
    r = invoke("run", tmp_path / "m.csv", "--out", out, "--model", "tiny_test", "--quiet", "--corrections", tmp_path / "c")
    assert r.exit_code == 0, r.output
    return tmp_path, out


def test_formula_injection_xlsx(hostile_run):
    tmp, out = hostile_run
    xlsx = tmp / "r.xlsx"
    assert invoke("review", "export", out, "--out", xlsx, "--threshold", "1").exit_code == 0
    with zipfile.ZipFile(xlsx) as z:
        sheet = z.read("xl/worksheets/sheet1.xml").decode()
    assert "<f>" not in sheet and "<f " not in sheet  # no formula anywhere
    ws = load_workbook(xlsx)["review"]
    values = {c.value: c.data_type for row in ws.iter_rows(min_row=2) for c in row if isinstance(c.value, str)}
    for text in ('=HYPERLINK("http://evil.example","click")', "img/=1+1.jpg", "@SUM(1+1)", "-2+3"):
        assert values[text] == "s", text
    # and it imports back (key columns compare equal)
    assert invoke("review", "import", xlsx, "--corrections", tmp / "store").exit_code == 0


def test_formula_injection_csv(hostile_run):
    tmp, out = hostile_run
    path = tmp / "r.csv"
    assert invoke("review", "export", out, "--out", path, "--threshold", "1").exit_code == 0
    cells = [c for row in list(csv.reader(open(path, encoding="utf-8-sig")))[1:] for c in row]
    for cell in cells:
        assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell
    assert "'=HYPERLINK(\"http://evil.example\",\"click\")" in cells and "'@SUM(1+1)" in cells
    lines = list(csv.reader(open(path, encoding="utf-8-sig")))
    header = lines[0]
    lines[1][header.index("corrected_label")] = "tops"
    with open(path, "w", encoding="utf-8-sig", newline="") as fh:
        csv.writer(fh).writerows(lines)
    r = invoke("review", "import", path, "--corrections", tmp / "store")  # the run_file column names the run
    assert r.exit_code == 0 and "1 corrections stored" in r.output
    corrections = pq.read_table(next((tmp / "store").glob("part-*.parquet"))).to_pylist()
    assert corrections[0]["sku"].startswith(("=HYPERLINK", "+cmd"))  # stored as the original text


def test_review_usage_errors(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"nope")
    r = invoke("review", "export", tmp_path / "x.parquet", "--out", tmp_path / "r.xlsx")
    assert r.exit_code == 2 and "not a readable labelcat Parquet" in r.output
    r = invoke("review", "export", tmp_path / "x.parquet", "--out", tmp_path / "r.txt")
    assert r.exit_code == 2 and ".xlsx or .csv" in r.output


def test_the_sheet_holds_exactly_the_rows_the_parquet_flags(hostile_run):
    """needs_review in the Parquet and the review export make one decision, so the inventory system and the
    reviewers see the same rows."""
    tmp, out = hostile_run
    path = tmp / "r.csv"
    assert invoke("review", "export", out, "--out", path).exit_code == 0
    flagged = {r["row"] for r in pq.read_table(out).to_pylist() if r["needs_review"]}
    lines = list(csv.reader(open(path, encoding="utf-8-sig")))
    exported = {int(cells[lines[0].index("row")]) for cells in lines[1:]}
    assert exported == flagged and flagged


def test_export_writes_flat_spreadsheets_that_read_back(hostile_run):
    import pandas as pd

    tmp, out = hostile_run
    for fmt in ("csv", "xlsx"):
        r = invoke("export", out, "--to", fmt, "--out", tmp / f"all.{fmt}")
        assert r.exit_code == 0 and "rows written" in r.output, r.output
    df = pd.read_csv(tmp / "all.csv", encoding="utf-8-sig")
    parquet = pq.read_table(out).to_pandas()
    assert len(df) == len(parquet) and list(df.columns) == list(parquet.columns)
    assert df["width"].tolist() == parquet["width"].tolist()  # 1600, not 1600.0
    assert " | " in df["topk_labels"].dropna().iloc[0] and "[" not in df["topk_labels"].dropna().iloc[0]
    assert all(not str(v).startswith(("=", "+", "@")) for v in df.astype(str).to_numpy().ravel())
    x = pd.read_excel(tmp / "all.xlsx")
    assert len(x) == len(parquet)
