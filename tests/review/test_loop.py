"""One vocabulary, one loop (#14): three nights through the CLI; corrections, training and the next night agree."""

import csv
import json
import shutil

import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from conftest import SAMPLE
from pipeline.cli import cli
from pipeline.models.card import read_card


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.slow
def test_corrections_training_and_the_next_night_share_one_vocabulary(tmp_path):
    shop = tmp_path / "shop"
    for cls, stems in (("hoodies", ["cl_bogo01_1", "cl_bogo02_1", "cl_bogo03_1"]),
                       ("sneakers", ["sneakers_01_1", "sneakers_02_2", "sneakers_02_3"]),
                       ("t-shirts", ["cl_boot01_1", "cl_boot03_1", "cl_boot06_1"])):
        (shop / cls).mkdir(parents=True)
        for stem in stems:
            shutil.copy(SAMPLE / "images" / cls / f"{stem}.jpg", shop / cls)
    shutil.copy(SAMPLE / "images" / "cushions" / "cat.jpg", shop / "sneakers")  # junk in a folder
    store = tmp_path / "corrections"
    night1 = tmp_path / "n1.parquet"
    assert invoke("run", shop, "-o", night1, "--corrections", store, "-q").exit_code == 0

    # Review: the cat is junk; a hoodie is relabelled in another spelling of the run's vocabulary.
    sheet = tmp_path / "review.csv"
    assert invoke("review", "export", night1, "-o", sheet, "--threshold", "1").exit_code == 0
    lines = list(csv.reader(open(sheet, encoding="utf-8-sig")))
    head = lines[0]
    for cells in lines[1:]:
        if cells[head.index("path")].endswith("cat.jpg"):
            cells[head.index("corrected_label")] = "junk"
        elif cells[head.index("path")].endswith("cl_bogo01_1.jpg"):
            cells[head.index("corrected_label")] = "TOPS"  # any case in, the canonical name stored
    with open(sheet, "w", encoding="utf-8-sig", newline="") as fh:
        csv.writer(fh).writerows(lines)
    r = invoke("review", "import", sheet, "--corrections", store)
    assert r.exit_code == 0 and "2 corrections stored" in r.output, r.output
    stored = {c["corrected_label"] for part in store.glob("part-*.parquet") for c in pq.read_table(part).to_pylist()}
    assert stored == {"junk", "tops"}

    # Night 2 (zero-shot model, --store): two new uploads; only they are classified; the old rows are seen, the
    # people's verdicts apply to them (the cat junk by a person, no label), and --skip-seen keeps only tonight's.
    history = tmp_path / "store"
    log1 = tmp_path / "log1.jsonl"
    assert invoke("run", shop, "-o", tmp_path / "n1s.parquet", "--corrections", store, "--store", history, "-q").exit_code == 0
    shutil.copy(SAMPLE / "images" / "t-shirts" / "cl_boot07_1.jpg", shop / "t-shirts")
    shutil.copy(SAMPLE / "images" / "sneakers" / "sneakers_01_3.jpg", shop / "sneakers")
    night2 = tmp_path / "n2.parquet"
    r = invoke("run", shop, "-o", night2, "--corrections", store, "--store", history, "-q", "--skip-seen", "--log-file", log1)
    assert r.exit_code == 0, r.output
    t2 = pq.read_table(night2).to_pandas()
    assert sorted(p.rsplit("/", 1)[1] for p in t2.path) == ["cl_boot07_1.jpg", "sneakers_01_3.jpg"]
    classified = [json.loads(line)["rows"] for line in log1.read_text().splitlines() if '"stage": "classify"' in line]
    assert sum(classified) == 2
    vocabulary = json.loads(pq.read_schema(night2).metadata[b"labelcat.run"])["labels"]  # the zero-shot model's
    assert set(t2.label.dropna()) <= set(vocabulary)

    # Train on the folders and the corrections together: the junk verdict removes the cat; "tops" is no folder
    # label, so that correction is refused with a line and the hoodie keeps its folder label.
    model = tmp_path / "model"
    r = invoke("train", shop, store, "--out", model)
    assert r.exit_code == 0, r.output
    assert "cat.jpg: a reviewer marked it junk" in r.output
    assert "correction 'tops' is not one of the folders' labels" in r.output
    card = read_card(model)
    assert card.classes == ["hoodies", "sneakers", "t-shirts"] and card.training_data["per_class"]["sneakers"] == 4  # not the cat

    # Night 3 with the new model (--relabel: what the old model labelled is classified again): one label set,
    # the junk verdict kept, not re-exported.
    night3 = tmp_path / "n3.parquet"
    log = tmp_path / "log.jsonl"
    r = invoke("run", shop, "--model", model, "-o", night3, "--corrections", store, "--store", history, "--relabel", "-q",
               "--log-file", log)
    assert r.exit_code == 0, r.output
    t = pq.read_table(night3).to_pandas().set_index("path")
    labels = set(t.label.dropna())
    assert labels <= set(card.classes), labels
    cat = t.loc[next(p for p in t.index if p.endswith("cat.jpg"))]
    assert cat.status == "junk" and cat.junk_reason.startswith("human") and pd.isna(cat.label)
    assert not cat.needs_review
    assert "'tops' is not a label of the active model" in log.read_text()
    sheet2 = tmp_path / "review2.csv"
    assert invoke("review", "export", night3, "-o", sheet2).exit_code == 0
    assert "cat.jpg" not in sheet2.read_text()
    flat = tmp_path / "n3.csv"  # the spreadsheet export reads back with pandas to the same values
    assert invoke("export", night3, "--to", "csv", "-o", flat).exit_code == 0
    back = pd.read_csv(flat, encoding="utf-8-sig").set_index("path")
    assert back.label.fillna("").to_dict() == t.label.fillna("").to_dict()
    assert back.width.fillna(-1).astype(int).to_dict() == t.width.fillna(-1).astype(int).to_dict()
