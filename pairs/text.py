"""Every value as text, the one way the data layer reads it (`text_of`): strings stripped of leading and trailing
whitespace, numbers as written (label `2` -> "2"), lists joined with spaces, null/NaN/missing -> "". Which column
types and JSON values may be read as text at all."""
from __future__ import annotations

import sys

import pyarrow as pa
import pyarrow.compute as pc

TEXT_FIELDS = ("query", "title")  # the text every model reads: strings only, never a repr of bytes or objects
# what str.strip() strips, so that Arrow trims strings exactly as Python does
PY_WHITESPACE = "".join(chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace())


def text_of(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN from CSV/pandas-written Parquet
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(text_of(v) for v in value)
    return str(value).strip()


def arrow_text(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """`text_of` of every value, vectorised where Arrow formats values as Python does (strings, integers, lists of
    those); other types (floats, booleans, decimals) go through Python."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    t = arr.type
    if pa.types.is_dictionary(t):
        arr, t = arr.dictionary_decode(), t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pc.utf8_trim(arr.cast(pa.string()), characters=PY_WHITESPACE).fill_null("")
    if pa.types.is_null(t):
        return pa.array([""] * len(arr), pa.string())
    if pa.types.is_integer(t):
        return arr.cast(pa.string()).fill_null("")
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        values = arrow_text(arr.values)  # the whole child array: the offsets index into it
        joined = pc.binary_join(type(arr).from_arrays(arr.offsets, values), " ")
        return joined.cast(pa.string()).fill_null("")
    return pa.array([text_of(v) for v in arr.to_pylist()], pa.string())


def json_reads_as_text(field: str, value) -> bool:
    """A JSONL value fit for `field`: no objects anywhere, arrays only outside query and title."""
    if isinstance(value, list):
        return field not in TEXT_FIELDS and all(json_reads_as_text(field, v) for v in value)
    return not isinstance(value, dict)


def arrow_reads_as_text(field: str, t: pa.DataType) -> bool:
    """Query and title must be string columns; labels, ids and attributes may also be numbers or lists (of strings
    or numbers). Anything else (bytes, structs, maps) would reach prompts as a Python repr."""
    if pa.types.is_dictionary(t):  # pandas categoricals
        t = t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t) or pa.types.is_null(t):
        return True
    if field in TEXT_FIELDS:
        return False
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return arrow_reads_as_text(field, t.value_type)
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_boolean(t)


