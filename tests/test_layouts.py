"""The official dataset layouts (ESCI, WANDS) through configs/esci.yaml and configs/wands.yaml, on small files built
here in each dataset's schema (nothing is downloaded)."""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT
from pairs import runs as runs_module, scan as scan_module, source as source_module
from workflows.config import load_config
from pairs.errors import DataError
from pairs.scan import load_pairs
from workflows.stages.prepare import prepare

ESCI_EXAMPLES = pa.schema([("example_id", pa.int64()), ("query", pa.string()), ("query_id", pa.int64()),
                           ("product_id", pa.string()), ("product_locale", pa.string()), ("esci_label", pa.string()),
                           ("small_version", pa.int64()), ("large_version", pa.int64()), ("split", pa.string())])
ESCI_PRODUCTS = pa.schema([(c, pa.string()) for c in ("product_id", "product_title", "product_description",
                                                      "product_bullet_point", "product_brand", "product_color",
                                                      "product_locale")])


def esci_files(tmp_path: Path, n_queries: int = 24, test_queries=(1, 5, 9, 13, 17, 21)) -> tuple[Path, Path, list[dict]]:
    """US queries (some in the large version only), a Spanish query whose products share ids with US ones, and the
    product rows of both locales: the same product id has a different title per locale."""
    examples, products = [], []
    for q in range(n_queries):
        for k in range(4):
            pid = f"B{q:03d}{k}"
            examples.append({"example_id": 100 * q + k, "query": f"usb cable {q}", "query_id": q, "product_id": pid,
                             "product_locale": "us", "esci_label": "ESCI"[(q + k) % 4],
                             "small_version": 0 if k == 3 and q % 2 else 1, "large_version": 1,
                             "split": "test" if q in test_queries else "train"})
            products.append({"product_id": pid, "product_title": f"Anker cable {pid}",
                             "product_description": f"<p>Braided \"{pid}\"</p>", "product_bullet_point": "2 m\nUSB-C",
                             "product_brand": "Anker", "product_color": None if k else "Black", "product_locale": "us"})
            products.append({"product_id": pid, "product_title": f"Cable Anker {pid} (es)", "product_description": "",
                             "product_bullet_point": "", "product_brand": "Anker", "product_color": "Negro",
                             "product_locale": "es"})
    examples.append({"example_id": 99999, "query": "cable usb", "query_id": 999, "product_id": "B0000",
                     "product_locale": "es", "esci_label": "E", "small_version": 1, "large_version": 1, "split": "train"})
    ex, pr = tmp_path / "shopping_queries_dataset_examples.parquet", tmp_path / "shopping_queries_dataset_products.parquet"
    pq.write_table(pa.Table.from_pylist(examples, schema=ESCI_EXAMPLES), ex)
    pq.write_table(pa.Table.from_pylist(products, schema=ESCI_PRODUCTS), pr)
    return ex, pr, examples


def esci_config(ex: Path, pr: Path, *more: str):
    return load_config(ROOT / "configs" / "esci.yaml", [f"data.path={ex}", f"data.products.path={pr}", *more])


def read_splits(run_dir: Path) -> dict[str, pa.Table]:
    return {s: pq.read_table(run_dir / "data" / f"{s}.parquet") for s in ("train", "val", "test")}


def test_esci_layout_joins_on_id_and_locale_filters_and_keeps_its_own_test_split(tmp_path):
    ex, pr, examples = esci_files(tmp_path)
    run_dir = tmp_path / "run"
    prepare(esci_config(ex, pr), run_dir)
    splits = read_splits(run_dir)
    kept = [e for e in examples if e["product_locale"] == "us" and e["small_version"] == 1]
    assert sum(t.num_rows for t in splits.values()) == len(kept) == 84  # 96 US pairs, 12 only in the large version
    # the dataset's test rows are the test split, in the file's order
    assert splits["test"].column("pair_id").to_pylist() == [str(e["example_id"]) for e in kept if e["split"] == "test"]
    queries = {s: set(t.column("query_id").to_pylist()) for s, t in splits.items()}
    assert not (queries["train"] & queries["val"] or (queries["train"] | queries["val"]) & queries["test"])
    assert queries["val"] and queries["train"] | queries["val"] == {str(q) for q in range(24)} - {"1", "5", "9", "13", "17", "21"}
    rows = {r["pair_id"]: r for t in splits.values() for r in t.to_pylist()}
    first = rows["0"]  # query 0, product B0000: the US product row, not the Spanish one with the same id
    assert (first["query"], first["title"], first["product_id"], first["label"]) == ("usb cable 0", "Anker cable B0000", "B0000", "E")
    assert json.loads(first["attributes"]) == {"brand": "Anker", "color": "Black", "description": "<p>Braided \"B0000\"</p>",
                                               "bullet_points": "2 m\nUSB-C"}
    assert json.loads(rows["1"]["attributes"]).keys() == {"brand", "description", "bullet_points"}  # null color left out
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert manifest["input_rows"] == {"rows_read": 97, "filtered_out": 13, "missing_dropped": {},
                                      "joined_duplicate_keys": {}, "test_split": "split == 'test'"}
    assert set(manifest["inputs"]) == {str(ex), str(pr)}


def test_esci_filter_and_split_are_config(tmp_path):
    ex, pr, examples = esci_files(tmp_path)
    run_dir = tmp_path / "run"
    prepare(esci_config(ex, pr, "data.filter={product_locale: [us, es], large_version: 1}"), run_dir)
    splits = read_splits(run_dir)
    assert sum(t.num_rows for t in splits.values()) == len(examples) == 97
    es = [r for t in splits.values() for r in t.to_pylist() if r["pair_id"] == "99999"][0]
    assert es["title"] == "Cable Anker B0000 (es)" and json.loads(es["attributes"]) == {"brand": "Anker", "color": "Negro"}
    with pytest.raises(DataError, match=r"data.filter \(product_locale: jp\) keeps none of its 97 rows"):
        prepare(esci_config(ex, pr, "data.filter={product_locale: jp}"), tmp_path / "run2")


def test_products_path_can_be_set_on_the_command_line(tmp_path):
    ex, pr, _ = esci_files(tmp_path)
    other = tmp_path / "other_products.parquet"
    table = pq.read_table(pr)
    pq.write_table(table.set_column(1, "product_title", pa.array([f"Other {t}" for t in table.column(1).to_pylist()])), other)
    from workflows.cli import main

    assert main(["prepare", "--config", str(ROOT / "configs" / "esci.yaml"), "--run-dir", str(tmp_path / "run"),
                 "--set", f"data.path={ex}", "--set", f"data.products.path={other}",
                 "--set", "tracking.backend=none"]) == 0  # MLflow's first store costs seconds: tests/test_tracking.py
    titles = {r["pair_id"]: r["title"] for t in read_splits(tmp_path / "run").values() for r in t.to_pylist()}
    assert titles["0"] == "Other Anker cable B0000"


def test_missing_product_is_an_error_with_count_examples_and_file_or_dropped_and_counted(tmp_path):
    ex, pr, _ = esci_files(tmp_path)
    table = pq.read_table(pr)
    keep = [not (pid in ("B0011", "B0072") and loc == "us")
            for pid, loc in zip(table.column("product_id").to_pylist(), table.column("product_locale").to_pylist())]
    pq.write_table(table.filter(pa.array(keep)), pr)
    run_dir = tmp_path / "run"
    with pytest.raises(DataError) as err:
        prepare(esci_config(ex, pr), run_dir)
    assert str(err.value) == (
        f"{ex}: 2 pair(s) name a product that {pr} lacks (no row with the same product_id, product_locale), e.g. row 6 "
        "(product_id 'B0011', product_locale 'us'); row 31 (product_id 'B0072', product_locale 'us'); point "
        "data.products.path at the product file of these pairs (and data.products.on at its key columns), or set "
        "data.missing: drop to leave such pairs out (counted in the prepare manifest)")
    assert not run_dir.exists()
    prepare(esci_config(ex, pr, "data.missing=drop"), run_dir)
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert manifest["input_rows"]["missing_dropped"] == {"products": 2}
    assert sum(manifest["rows"].values()) == 82
    ids = {r for t in read_splits(run_dir).values() for r in t.column("pair_id").to_pylist()}
    assert "11" not in ids and "72" not in ids


def test_join_configuration_errors_are_named(tmp_path):
    ex, pr, _ = esci_files(tmp_path)
    with pytest.raises(DataError, match=rf"{pr}: no column 'locale' \(data.products.on\); the file has \["):
        prepare(esci_config(ex, pr, "data.products.on=[product_id, locale]"), tmp_path / "run")
    with pytest.raises(DataError, match=rf"{ex}: no column 'small' \(data.filter.small\)"):
        prepare(esci_config(ex, pr, "data.filter={small: 1}"), tmp_path / "run")
    with pytest.raises(DataError, match=rf"{tmp_path / 'nope.parquet'}: file not found; set data.products.path in the config"):
        prepare(esci_config(ex, tmp_path / "nope.parquet"), tmp_path / "run")
    with pytest.raises(DataError, match=r"missing column\(s\) title \(column 'product_name'\); the files have: .*product_title"):
        prepare(esci_config(ex, pr, "data.columns.title=product_name"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_query_on_both_sides_of_the_split_column_is_an_error(tmp_path):
    ex, pr, examples = esci_files(tmp_path)
    examples[1]["split"] = "test"  # query 0 now has a test row and train rows
    pq.write_table(pa.Table.from_pylist(examples, schema=ESCI_EXAMPLES), ex)
    with pytest.raises(DataError, match=r"1 quer\(ies\) have pairs both in the test split \(split == 'test'\) and outside "
                                        r"it, e.g. query_id '0'; a query must be in one split"):
        prepare(esci_config(ex, pr), tmp_path / "run")


def test_bad_rows_of_a_joined_file_name_the_pair_row_and_the_file(tmp_path):
    ex, pr, _ = esci_files(tmp_path)
    table = pq.read_table(pr)
    titles = table.column("product_title").to_pylist()
    titles[2] = "  "  # B0001, us: used by example 1 (row 2)
    pq.write_table(table.set_column(1, "product_title", pa.array(titles)), pr)
    examples = pq.read_table(ex)
    labels = examples.column("esci_label").to_pylist()
    labels[4] = "X"
    pq.write_table(examples.set_column(5, "esci_label", pa.array(labels)), ex)
    with pytest.raises(DataError) as err:
        prepare(esci_config(ex, pr), tmp_path / "run")
    assert str(err.value).splitlines() == [
        "2 problem(s) in the input data:",
        f"{ex} row 2: empty product title (column 'product_title' of {pr}); fill it in or remove the row",
        f"{ex} row 5: label 'X' is not one of E, S, C, I; fix the label or add it to `labels` in the config"]


def test_many_runs_are_merged_back_into_the_pairs_order(tmp_path, monkeypatch):
    """Products streamed in their own order, canonical rows sorted into many small runs on disk, merged back: the
    split files list pairs in the order of the examples file, each with its own product."""
    from bench.synthetic import write_esci_like

    paths = write_esci_like(tmp_path / "esci", 3000, seed=1, pairs_per_query=10)
    products = pq.read_table(paths["products"])
    pq.write_table(products.take(pa.array(list(range(products.num_rows))[::-1])), paths["products"])  # another order
    monkeypatch.setattr(source_module, "BATCH_ROWS", 250)
    monkeypatch.setattr(runs_module, "RUN_BYTES", 200_000)
    monkeypatch.setattr(runs_module, "RUN_ROW_GROUP", 64)
    merge, merged = scan_module.merge_runs, []
    monkeypatch.setattr(scan_module, "merge_runs", lambda runs, *a: merged.append(len(runs)) or merge(runs, *a))
    run_dir = tmp_path / "run"
    prepare(esci_config(paths["examples"], paths["products"]), run_dir)
    assert merged[0] > 10
    examples = pq.read_table(paths["examples"]).to_pylist()
    titles = dict(zip(products.column("product_id").to_pylist(), products.column("product_title").to_pylist()))
    for name, table in read_splits(run_dir).items():
        rows = table.to_pylist()
        ids = [int(r["pair_id"]) for r in rows]
        assert ids == sorted(ids) and rows, name
        assert all(r["title"] == titles[examples[int(r["pair_id"])]["product_id"]] for r in rows)
    assert sum(t.num_rows for t in read_splits(run_dir).values()) == 3000


WANDS_PRODUCT_HEADER = ["product_id", "product_name", "product_class", "category hierarchy", "product_description",
                        "product_features", "rating_count", "average_rating", "review_count"]


def wands_files(tmp_path: Path, n_queries: int = 30) -> tuple[Path, Path, Path]:
    """label.csv, query.csv and product.csv as WANDS ships them: tab-separated, pandas quoting."""
    d = tmp_path / "dataset"
    d.mkdir()
    queries = ["query_id\tquery\tquery_class"] + [f"{q}\tsalon chair {q}\tMassage Chairs" for q in range(n_queries)]
    queries[1] = '0\t"fawkes 36"" blue vanity"\tVanities'
    products = ["\t".join(WANDS_PRODUCT_HEADER)] + [
        f"{p}\tsolid wood platform bed {p}\tBeds\tFurniture / Bedroom Furniture / Beds\tgood , deep sleep\t"
        f"overallwidth-sidetoside:64.7|dsprimaryproductstyle : modern\t15.0\t4.5\t15.0" for p in range(3 * n_queries)]
    products[2] = "1\tall-clad 7 qt . slow cooker\tSlow Cookers\t\t\tcapacityquarts:7\t\t\t"  # empty fields, as NaN in pandas
    labels = ["id\tquery_id\tproduct_id\tlabel"] + [
        f"{3 * q + k}\t{q}\t{3 * q + k}\t{['Exact', 'Partial', 'Irrelevant'][(q + k) % 3]}" for q in range(n_queries) for k in range(3)]
    for name, lines in (("query.csv", queries), ("product.csv", products), ("label.csv", labels)):
        (d / name).write_text("\n".join(lines) + "\n")
    return d / "label.csv", d / "query.csv", d / "product.csv"


def wands_config(label: Path, query: Path, product: Path, *more: str):
    return load_config(ROOT / "configs" / "wands.yaml", [f"data.path={label}", f"data.queries.path={query}",
                                                         f"data.products.path={product}", *more])


def test_wands_layout_takes_the_query_from_query_csv_and_features_as_attributes(tmp_path):
    label, query, product = wands_files(tmp_path)
    run_dir = tmp_path / "run"
    prepare(wands_config(label, query, product), run_dir)
    splits = read_splits(run_dir)
    rows = {r["pair_id"]: r for t in splits.values() for r in t.to_pylist()}
    assert len(rows) == 90
    assert rows["0"]["query"] == 'fawkes 36" blue vanity' and rows["0"]["query_id"] == "0" and rows["0"]["label"] == "Exact"
    assert rows["4"]["query"] == "salon chair 1" and rows["4"]["title"] == "solid wood platform bed 4"
    assert json.loads(rows["4"]["attributes"]) == {
        "class": "Beds", "category": "Furniture / Bedroom Furniture / Beds", "description": "good , deep sleep",
        "features": "overallwidth-sidetoside:64.7|dsprimaryproductstyle : modern"}
    assert rows["1"]["title"] == "all-clad 7 qt . slow cooker"
    assert json.loads(rows["1"]["attributes"]) == {"class": "Slow Cookers", "features": "capacityquarts:7"}
    assert {r["label"] for r in rows.values()} == {"Exact", "Partial", "Irrelevant"}
    queries = {s: set(t.column("query_id").to_pylist()) for s, t in splits.items()}
    assert all(queries.values()) and not (queries["train"] & queries["val"] or queries["train"] & queries["test"]
                                          or queries["val"] & queries["test"])


def test_wands_missing_query_names_query_csv_and_its_key(tmp_path):
    label, query, product = wands_files(tmp_path)
    lines = query.read_text().splitlines()
    query.write_text("\n".join(line for line in lines if not line.startswith("7\t")) + "\n")
    with pytest.raises(DataError) as err:
        prepare(wands_config(label, query, product), tmp_path / "run")
    assert str(err.value).startswith(
        f"{label}: 3 pair(s) name a query that {query} lacks (no row with the same query_id), e.g. line 23 (query_id '7'); "
        "line 24 (query_id '7'); line 25 (query_id '7'); point data.queries.path at the query file")
    prepare(wands_config(label, query, product, "data.missing=drop"), tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())
    assert manifest["input_rows"]["missing_dropped"] == {"queries": 3} and sum(manifest["rows"].values()) == 87


def test_tsv_format_reads_a_csv_named_file(tmp_path):
    f = tmp_path / "pairs.csv"
    f.write_text("pair_id\tquery_id\tquery\tproduct_title\tlabel\np0\tq0\tusb c cable\tAnker, 2 m\tE\n")
    table = load_pairs(f, "tsv", load_config(ROOT / "configs" / "local.yaml").data.columns, ["E", "S", "C", "I"])
    assert table.column("title").to_pylist() == ["Anker, 2 m"]


def test_pairs_without_labels_are_read_for_scoring(tmp_path):
    ex, pr, _ = esci_files(tmp_path)
    pq.write_table(pq.read_table(ex).drop_columns(["esci_label"]), ex)
    cfg = esci_config(ex, pr)
    with pytest.raises(DataError, match=r"missing column\(s\) label \(column 'esci_label'\)"):
        prepare(cfg, tmp_path / "run")
    from pairs.scan import scan_pairs

    scan = scan_pairs(cfg.data, ["E", "S", "C", "I"], tmp_path, require_labels=False)
    rows = pa.concat_tables(scan.batches()).to_pylist()
    assert len(rows) == 84 and {r["label"] for r in rows} == {""} and rows[0]["title"] == "Anker cable B0000"


def test_an_unclosed_quote_is_named_by_the_line_it_opens(tmp_path):
    f = tmp_path / "pairs.csv"
    f.write_text("pair_id,query_id,query,product_title,label\np0,q0,a,t,E\np1,q0,b,\"unclosed title,E\np2,q0,c,t,E\n"
                 + "x" * (17 << 20) + "\n")
    with pytest.raises(DataError, match=rf"^{f} line 3: field larger than field limit \(16777216\) in the record starting "
                                        r"here; look for a quote"):
        load_pairs(f, "auto", load_config(ROOT / "configs" / "local.yaml").data.columns, ["E"])
