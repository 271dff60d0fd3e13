"""Labelled (query, product) pairs: reading them from JSONL, CSV/TSV or Parquet (`source`, `textfiles`, `text`),
joining the products and queries files (`joins`), mapping and checking them into the canonical pair table
(`canonical`, `scan`, `runs`), splitting them by query (`splits`; into k folds by query for cross-validation:
`folds`) and writing the splits (`write`); the `data` section of the config (`config`); and the Parquet helpers
generation (mpcot), the stages and the student share (`parquet`: atomic writes, dataset folders, bounded reads).

Imports only pyarrow, numpy and pydantic: `workflows` imports this package, never the reverse.
"""
