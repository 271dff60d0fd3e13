import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, pair, write_jsonl
from pairs.config import ColumnMap, SplitConfig
from workflows.config import load_config
from pairs.errors import DataError
from pairs.scan import load_pairs
from pairs.splits import label_support, split_by_query

CODES = ["E", "S", "C", "I"]


def test_bundled_esci_sample_loads_with_defaults():
    table = load_pairs(ROOT / "data" / "esci_us_subset.jsonl", "auto", ColumnMap(), CODES)
    assert table.num_rows == 1034
    assert len(set(table.column("query_id").to_pylist())) == 403
    assert sorted(set(table.column("label").to_pylist())) == ["C", "E", "I", "S"]


def test_attributes_are_kept_when_present():
    table = load_pairs(ROOT / "data" / "esci_attributes_sample.jsonl", "auto", ColumnMap(), CODES)
    attrs = [json.loads(a) for a in table.column("attributes").to_pylist()]
    assert table.num_rows == 16
    assert any("brand" in a and "description" in a for a in attrs)


@pytest.mark.parametrize(
    "row,expected",
    [
        ({"label": "X"}, r"line 2: label 'X' is not one of E, S, C, I; fix the label or add it to `labels`"),
        ({"query": "  "}, r"line 2: empty query \(column 'query'\)"),
        ({"product_title": ""}, r"line 2: empty product title"),
        ({"pair_id": "p0"}, r"line 2: duplicate pair id 'p0' \(first at line 1\)"),
        ({"label": ""}, r"line 2: no label \(column 'label'\); give the pair one of E, S, C, I or remove the row$"),
    ],
)
def test_bad_row_is_named(tmp_path, row, expected):
    f = write_jsonl(tmp_path / "pairs.jsonl", [pair(0), pair(1, **row), pair(2)])
    with pytest.raises(DataError, match=expected) as err:
        load_pairs(f, "auto", ColumnMap(), CODES)
    assert str(f) in str(err.value)


def test_every_bad_row_is_reported_at_once(tmp_path):
    f = write_jsonl(tmp_path / "pairs.jsonl", [pair(0, label="X"), pair(1), pair(2, label="Y")])
    with pytest.raises(DataError) as err:
        load_pairs(f, "auto", ColumnMap(), CODES)
    assert "2 problem(s)" in str(err.value) and "line 1" in str(err.value) and "line 3" in str(err.value)


def test_invalid_json_line_is_named(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps(pair(0)) + "\n{broken\n")
    with pytest.raises(DataError, match=r"line 2: invalid JSON"):
        load_pairs(f, "auto", ColumnMap(), CODES)


def test_missing_column_lists_what_the_file_has(tmp_path):
    rows = [{k: v for k, v in pair(i).items() if k != "label"} for i in range(3)]
    f = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError, match=r"missing column\(s\) label \(column 'label'\).*data.columns"):
        load_pairs(f, "auto", ColumnMap(), CODES)


def test_unreadable_and_unknown_files(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_pairs(tmp_path / "nope.jsonl", "auto", ColumnMap(), CODES)
    odd = tmp_path / "pairs.xlsx"
    odd.write_text("x")
    with pytest.raises(DataError, match="set data.format"):
        load_pairs(odd, "auto", ColumnMap(), CODES)
    binary = tmp_path / "pairs.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="not UTF-8"):
        load_pairs(binary, "auto", ColumnMap(), CODES)


def test_csv_and_parquet_with_column_mapping_and_three_grades(tmp_path):
    rows = [{"q": f"query {i // 2}", "name": f"thing {i}", "grade": g, "id": f"x{i}"}
            for i, g in enumerate(["good", "ok", "bad", "good"])]
    columns = ColumnMap(query="q", title="name", label="grade", pair_id="id", query_id=None, product_id=None, attributes={})
    with open(tmp_path / "pairs.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    for name in ("pairs.csv", "pairs.parquet"):
        table = load_pairs(tmp_path / name, "auto", columns, ["good", "ok", "bad"])
        assert table.column("label").to_pylist() == ["good", "ok", "bad", "good"]
        # no query_id column: pairs with the same query text share a derived id
        qids = table.column("query_id").to_pylist()
        assert qids[0] == qids[1] != qids[2]
    bad = rows + [{"q": "x", "name": "y", "grade": "meh", "id": "x9"}]
    with open(tmp_path / "bad.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(bad)
    with pytest.raises(DataError, match=r"bad.csv line 6: label 'meh'"):
        load_pairs(tmp_path / "bad.csv", "auto", columns, ["good", "ok", "bad"])


def test_split_is_query_disjoint_seeded_and_complete():
    table = load_pairs(ROOT / "data" / "esci_us_subset.jsonl", "auto", ColumnMap(), CODES)
    a = split_by_query(table, SplitConfig(seed=3))
    b = split_by_query(table, SplitConfig(seed=3))
    c = split_by_query(table, SplitConfig(seed=4))
    queries = {k: set(v.column("query_id").to_pylist()) for k, v in a.items()}
    assert not (queries["train"] & queries["val"] or queries["train"] & queries["test"] or queries["val"] & queries["test"])
    assert sum(t.num_rows for t in a.values()) == table.num_rows
    assert all(a[k].equals(b[k]) for k in a)
    assert not a["test"].equals(c["test"])
    assert 0.7 < len(queries["train"]) / 403 < 0.9
    # stratified by label: every class (C is 20 of 1,034 pairs) reaches val and test, near its share
    support = label_support(a, CODES)
    for name, frac in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        assert all(support[name][c] >= 2 for c in CODES), support
        for c, total in (("E", 318), ("S", 306), ("I", 390)):
            assert abs(support[name][c] - frac * total) <= 0.03 * total, (name, c, support)


def test_three_grade_label_set_by_config_alone(tmp_path):
    cfg_file = tmp_path / "three.yaml"
    data = write_jsonl(tmp_path / "pairs.jsonl", [pair(i, label=["2", "1", "0"][i % 3]) for i in range(9)])
    cfg_file.write_text(
        f"name: three\ndata: {{path: {data}}}\nteacher: {{model: tiny-random-qwen2}}\n"
        "labels:\n  - {name: '2', title: Relevant}\n  - {name: '1', title: Partial}\n  - {name: '0', title: Irrelevant}\n"
    )
    cfg = load_config(cfg_file)
    table = load_pairs(data, "auto", cfg.data.columns, [lab.name for lab in cfg.labels])
    assert table.column("label").to_pylist()[:3] == ["2", "1", "0"]


def _problems(err) -> list[str]:
    """The per-problem lines of a DataError (after its 'N problem(s)' header)."""
    return str(err.value).splitlines()[1:]


def test_parquet_text_columns_must_be_strings(tmp_path):
    f = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({
        "pair_id": ["p0"], "query_id": ["q0"], "label": ["E"],
        "query": pa.array([b"110cfm bathroom exhaust fan"], pa.binary()),
        "product_title": [{"en": "Panasonic FV-0511VQ1 WhisperCeiling"}],
        "product_brand": [{"name": "Panasonic"}],
    }), f)
    with pytest.raises(DataError) as err:
        load_pairs(f, "auto", ColumnMap(), CODES)
    assert _problems(err) == [
        f"{f}: column 'query' (query) has type binary; query must be a string column. Write it as one (decode bytes "
        "as UTF-8, take the text out of a struct) or map another column under data.columns.query",
        f"{f}: column 'product_title' (title) has type struct<en: string>; title must be a string column. Write it as "
        "one (decode bytes as UTF-8, take the text out of a struct) or map another column under data.columns.title",
        f"{f}: column 'product_brand' (attributes.brand) has type struct<name: string>; attributes.brand must be a "
        "string, number or list (of those) column. Write it as one (decode bytes as UTF-8, take the text out of a "
        "struct) or map another column under data.columns.attributes.brand",
    ]
    # integer labels/ids and list-of-string attributes are read as text
    pq.write_table(pa.table({"pair_id": [7], "query": ["usb c cable"], "product_title": ["Anker cable"], "label": [2],
                             "product_bullet_point": [["2 m", "braided"]]}), f)
    table = load_pairs(f, "auto", ColumnMap(query_id=None), ["2", "1", "0"])
    assert table.to_pylist()[0] | {"query_id": None} == {
        "pair_id": "7", "query_id": None, "product_id": "", "query": "usb c cable", "title": "Anker cable",
        "attributes": '{"bullet_points": "2 m braided"}', "label": "2"}


def test_jsonl_objects_in_text_fields_are_named(tmp_path):
    f = write_jsonl(tmp_path / "pairs.jsonl", [pair(0), pair(1, product_title={"en": "Panasonic fan"}), pair(2, query=["a", "b"])])
    with pytest.raises(DataError) as err:
        load_pairs(f, "auto", ColumnMap(), CODES)
    assert _problems(err) == [f"{f} line 2: title (column 'product_title') is a JSON object; title must be text",
                              f"{f} line 3: query (column 'query') is a JSON array; query must be text"]


def _write_csv(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def test_csv_row_with_more_fields_than_the_header_is_named(tmp_path):
    # no label column and an unquoted comma in one title: once a TypeError traceback
    f = _write_csv(tmp_path / "pairs.csv", "pair_id,query_id,query,product_title\n"
                   "p0,q0,usb c cable,Anker cable\n"
                   "p1,q0,usb c cable,Cable, 2 m\n")
    with pytest.raises(DataError) as err:
        load_pairs(f, "auto", ColumnMap(), CODES)
    assert _problems(err) == [f"{f} line 3: 5 fields but the header has 4; quote fields that contain ',' or remove the extra ones"]
    _write_csv(f, "pair_id,query_id,query,product_title\np0,q0,usb c cable,Anker cable\np1,q0,usb c cable,\"Cable, 2 m\"\n")
    with pytest.raises(DataError, match=r"missing column\(s\) label \(column 'label'\); the file has \['pair_id', 'product_title', 'query', 'query_id'\]"):
        load_pairs(f, "auto", ColumnMap(), CODES)


def test_csv_quoted_line_breaks_are_kept_and_lines_match_an_editor(tmp_path):
    f = _write_csv(tmp_path / "pairs.csv", "pair_id,query_id,query,product_title,label,product_description\r\n"
                   'p0,q0,kettle,Acme kettle,E,"1.7 l\r\nstainless steel"\r\n'      # lines 2-3
                   'p1,q0,kettle,"Acme\r\nteapot",X,glass\r\n'                      # lines 4-5, bad label
                   "p2,q1,mug,Acme mug,Y,\r\n")                                    # line 6, bad label
    with pytest.raises(DataError) as err:
        load_pairs(f, "auto", ColumnMap(), CODES)
    assert [line.split(": label")[0] for line in _problems(err)] == [f"{f} line 4", f"{f} line 6"]
    f.write_bytes(f.read_bytes().replace(b",X,", b",E,").replace(b",Y,", b",I,"))
    table = load_pairs(f, "auto", ColumnMap(), CODES)
    assert json.loads(table.column("attributes")[0].as_py()) == {"description": "1.7 l\r\nstainless steel"}
    assert table.column("title").to_pylist() == ["Acme kettle", "Acme\r\nteapot", "Acme mug"]


def test_utf8_bom_is_read(tmp_path):
    # Excel's "CSV UTF-8" starts with a byte-order mark; so do some JSONL exports
    f = _write_csv(tmp_path / "pairs.csv", "pair_id,query_id,query,product_title,label\np0,q0,café,Café press,E\n", "utf-8-sig")
    assert load_pairs(f, "auto", ColumnMap(), CODES).column("pair_id").to_pylist() == ["p0"]
    g = tmp_path / "pairs.jsonl"
    # U+2028 is legal inside a JSON string: it must not split the line
    g.write_text("\ufeff" + json.dumps(pair(0, product_title="line\u2028separator"), ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_pairs(g, "auto", ColumnMap(), CODES).column("title").to_pylist() == ["line\u2028separator"]


def test_non_utf8_byte_is_named_by_its_line(tmp_path):
    rows = "".join(f"p{i},q{i},query {i},product {i},E\n" for i in range(31))
    f = tmp_path / "pairs.csv"
    f.write_bytes(("pair_id,query_id,query,product_title,label\n" + rows).encode() + b"p31,q31,caf\xe9,French press,E\n")
    with pytest.raises(DataError) as err:
        load_pairs(f, "auto", ColumnMap(), CODES)
    assert str(err.value) == (f"{f} line 33: not UTF-8 text (byte 0xe9: invalid continuation byte); re-encode the file "
                              "as UTF-8 (a spreadsheet's \"CSV UTF-8\" export, or `iconv -f cp1252 -t utf-8`)")
