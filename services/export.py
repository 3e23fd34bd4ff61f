"""ranked.csv as Parquet: typed columns (rank an integer, scores floats with nulls for empty
cells, `suspected` a boolean) and a `tags` list column (["suspected"] for a flagged pair, else
[]), so pandas (`read_parquet`) and fiftyone (sample tags) read it without code. Converted in
streamed batches: memory stays bounded by a batch at any number of pairs."""
from __future__ import annotations

import contextlib
import csv
import os
from pathlib import Path
from typing import BinaryIO, Iterator

TEXT_COLUMNS = ("id", "image", "caption")
BLOCK_BYTES = 8 << 20


def ranked_csv_to_parquet(source: str | Path, out: str | Path | BinaryIO) -> None:
    """Write ranked.csv `source` as Parquet to `out` (a path or a binary file)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    with open(source, encoding="utf-8", newline="") as handle:
        header = next(csv.reader(handle), None)
    if not header:
        raise ValueError(f"{source} has no header row")
    types = {name: pa.int64() if name == "rank" else pa.string() if name in TEXT_COLUMNS
             else pa.bool_() if name == "suspected" else pa.float64() for name in header}
    reader = pacsv.open_csv(str(source), read_options=pacsv.ReadOptions(block_size=BLOCK_BYTES),
                            convert_options=pacsv.ConvertOptions(
                                column_types=types, strings_can_be_null=False, quoted_strings_can_be_null=False,
                                null_values=[""], true_values=["true"], false_values=["false"]))
    tags_type = pa.list_(pa.string())
    schema = pa.schema([*(pa.field(name, types[name]) for name in header), pa.field("tags", tags_type)])
    with pq.ParquetWriter(out, schema) as writer:
        for batch in reader:
            flags = batch.column(header.index("suspected")).to_pylist() if "suspected" in header else []
            tags = pa.array([["suspected"] if flag else [] for flag in flags] or [[]] * batch.num_rows, tags_type)
            writer.write_table(pa.Table.from_batches([batch]).append_column(schema.field("tags"), tags)
                               .cast(schema))


def local_results(ranked: Path, out: BinaryIO, limit: int | None, suspected_only: bool) -> None:
    """An audit folder's ranked.csv into `out`, filtered as the API's results.csv is."""
    import io

    text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
    with open(ranked, encoding="utf-8", newline="") as handle:
        rows, writer = csv.reader(handle), csv.writer(text)
        header = next(rows)
        writer.writerow(header)
        flag = header.index("suspected")
        written = 0
        for row in rows:
            if limit is not None and written >= limit:
                break
            if not suspected_only or row[flag] == "true":
                writer.writerow(row)
                written += 1
    text.flush()
    text.detach()  # `out` stays open: it may be stdout


def export_results(write_csv, output: str, fmt: str, stdout: BinaryIO) -> str:
    """Write the results to `output` ("-": `stdout`) as CSV or Parquet; `write_csv(file)` writes
    ranked.csv into an open binary file. Returns where they went, for the message."""
    import tempfile

    if fmt == "csv" and output == "-":
        write_csv(stdout)
        return output
    if fmt == "csv":
        with _replaced_when_done(output) as partial:
            with partial.open("wb") as handle:
                write_csv(handle)
        return output
    with tempfile.TemporaryDirectory(prefix="ecif-results-") as folder:
        ranked = Path(folder) / "ranked.csv"
        with ranked.open("wb") as handle:
            write_csv(handle)
        if output == "-":
            ranked_csv_to_parquet(ranked, stdout)
        else:
            with _replaced_when_done(output) as partial:
                ranked_csv_to_parquet(ranked, partial)
    return output


@contextlib.contextmanager
def _replaced_when_done(output: str) -> Iterator[Path]:
    """A file beside `output` that becomes it when the block succeeds: a refused download or a
    Ctrl-C never leaves a truncated file (nor replaces an older one)."""
    target = Path(output)
    partial = target.with_name(f".{target.name}.partial")
    try:
        yield partial
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
