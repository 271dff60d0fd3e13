"""Synthetic pairs in the official ESCI layout, for scale measurements (nothing downloaded, nothing real).

`write_esci_like(out_dir, n_pairs, seed)` writes `shopping_queries_dataset_examples.parquet` and
`shopping_queries_dataset_products.parquet` with the columns and types of the Amazon Shopping Queries Dataset
(configs/esci.yaml reads them as they are): distinct queries (`pairs_per_query` judgements each, as ESCI's about 20)
and a distinct product per pair, text of ESCI's lengths (title ~100 characters, description ~500, bullet points
~700 on lines of their own, brand, color; some quotes and HTML tags, as in the real descriptions), ESCI's label mix
(small version: E 43.8%, S 34.3%, C 5.2%, I 16.8%) and its query-level train/test split (~30% of queries test).
All rows are US and in the small version. Written in chunks: memory stays flat whatever `n_pairs` is.

    .venv/bin/python bench/synthetic.py OUT_DIR N_PAIRS [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

EXAMPLES = "shopping_queries_dataset_examples.parquet"
PRODUCTS = "shopping_queries_dataset_products.parquet"
LABELS, LABEL_SHARES = ["E", "S", "C", "I"], [0.4378, 0.3430, 0.0515, 0.1677]
CHUNK = 20_000
_SYLLABLES = ["ka", "lo", "mi", "ne", "ro", "ta", "vi", "zu", "pe", "sa", "do", "ri", "fu", "ge", "ha", "jo", "xe", "ly"]
_COLORS = ["Black", "White", "Silver", "Navy Blue", "Red", "Rose Gold", "Matte Grey", "Green", "Clear", "Brown"]


def _vocabulary(rng: np.random.Generator, size: int = 20_000) -> pa.Array:
    """Distinct made-up words of 2 to 5 syllables (about 6 characters), plus a few tokens real listings have."""
    words = set()
    while len(words) < size:
        k = int(rng.integers(2, 6))
        words.add("".join(rng.choice(_SYLLABLES, k)))
    extra = ['12"', "<br>", "<p>", "</p>", "&amp;", "(2-Pack)", "100%", "3.5mm", "x"]
    return pa.array(sorted(words) + extra, pa.string())


def _texts(rng: np.random.Generator, vocab: pa.Array, n: int, mean_words: float, sep: str = " ",
           line_every: int = 0) -> pa.Array:
    """n texts of about mean_words words each (Poisson lengths, at least 1); with line_every, a line break replaces
    a space every ~line_every words (bullet points)."""
    counts = np.maximum(rng.poisson(mean_words, n), 1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    words = vocab.take(pa.array(rng.integers(0, len(vocab), int(offsets[-1]))))
    text = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), words), sep)
    if line_every:
        text = pc.replace_substring_regex(text, r"((?:\S+ ){%d})" % line_every, "\\1\n")
        text = pc.replace_substring(text, " \n", "\n")
    return text


def write_esci_like(out_dir: str | Path, n_pairs: int, seed: int = 0, pairs_per_query: int = 20,
                    test_share: float = 0.3) -> dict[str, Path]:
    """Write the two ESCI files for `n_pairs` pairs under `out_dir`; returns {"examples": path, "products": path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vocab = _vocabulary(rng)
    brands = _texts(rng, vocab, 2000, 1.3)
    paths = {"examples": out / EXAMPLES, "products": out / PRODUCTS}
    examples_schema = pa.schema([("example_id", pa.int64()), ("query", pa.string()), ("query_id", pa.int64()),
                                 ("product_id", pa.string()), ("product_locale", pa.string()),
                                 ("esci_label", pa.string()), ("small_version", pa.int64()),
                                 ("large_version", pa.int64()), ("split", pa.string())])
    products_schema = pa.schema([(c, pa.string()) for c in ("product_id", "product_title", "product_description",
                                                            "product_bullet_point", "product_brand", "product_color",
                                                            "product_locale")])
    n_queries = -(-n_pairs // pairs_per_query)
    query_text = _texts(rng, vocab, n_queries, 2.5)
    query_test = rng.random(n_queries) < test_share
    with pq.ParquetWriter(paths["examples"], examples_schema) as ex, pq.ParquetWriter(paths["products"], products_schema) as pr:
        for start in range(0, n_pairs, CHUNK):
            n = min(CHUNK, n_pairs - start)
            idx = np.arange(start, start + n)
            qid = idx // pairs_per_query
            product_id = pc.binary_join_element_wise("B", pa.array([f"{i:09X}" for i in idx]), "")
            ex.write_table(pa.table({
                "example_id": pa.array(idx),
                "query": query_text.take(pa.array(qid)),
                "query_id": pa.array(qid),
                "product_id": product_id,
                "product_locale": pa.array(["us"] * n),
                "esci_label": pa.array(rng.choice(LABELS, n, p=LABEL_SHARES)),
                "small_version": pa.array(np.ones(n, np.int64)),
                "large_version": pa.array(np.ones(n, np.int64)),
                "split": pa.array(np.where(query_test[qid], "test", "train")),
            }, schema=examples_schema))
            pr.write_table(pa.table({
                "product_id": product_id,
                "product_title": _texts(rng, vocab, n, 11),
                "product_description": _texts(rng, vocab, n, 54),
                "product_bullet_point": _texts(rng, vocab, n, 76, line_every=15),
                "product_brand": brands.take(pa.array(rng.integers(0, len(brands), n))),
                "product_color": pa.array(rng.choice(_COLORS, n)),
                "product_locale": pa.array(["us"] * n),
            }, schema=products_schema))
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("n_pairs", type=int)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    paths = write_esci_like(args.out_dir, args.n_pairs, args.seed)
    print(" ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
