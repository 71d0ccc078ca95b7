"""The datasets a node registers, and their schemas (never their rows).

A node's datasets are declared in a JSON file, ``<state_dir>/datasets.json``
by default (``edge-runtime run --datasets FILE`` names another)::

    {"datasets": [
        {"name": "sensor_readings", "kind": "parquet", "path": "data/readings.parquet",
         "time_column": "ts"},
        {"name": "defects", "kind": "csv", "path": "/srv/qa/defects.csv", "time_column": "found_at",
         "columns": {"line": "string", "severity": "int"}},
        {"name": "production", "kind": "sqlite", "path": "mes.sqlite3", "table": "counts"}
    ]}

Relative paths are relative to the file's folder. ``columns`` declares the
logical type of a column where inference would guess wrong (a CSV column of
numeric codes that are really strings, a SQLite column of epoch seconds that
is a time).

What leaves the node is :class:`DatasetSchema`: the columns with their
logical types and the row count. Columns whose names are not plain
identifiers (``^[A-Za-z][A-Za-z0-9_]{0,63}$``) cannot be named in a query,
so they are listed as ``ignored_columns`` rather than offered.

Logical types: ``int``, ``float``, ``bool``, ``string``, ``timestamp``
(naive UTC: zoned times are converted to UTC, unzoned times are taken as
UTC; SQLite numbers declared as timestamps are epoch seconds) and ``other``
(anything else: reported, never usable in a query).

CSV types are inferred from the first block (1 MiB) of the file; a column
whose later values do not fit the inferred type makes the schema read fail
with a message that says to declare the column's type.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge_runtime.names import first_repeat

DATASETS_FILE = "datasets.json"
IDENTIFIER_PATTERN = r"^[A-Za-z][A-Za-z0-9_]{0,63}$"
IDENTIFIER = re.compile(IDENTIFIER_PATTERN)

ColumnType = Literal["int", "float", "bool", "string", "timestamp", "other"]
# The types a query may use; "other" is only reported.
QUERYABLE_TYPES: frozenset[str] = frozenset({"int", "float", "bool", "string", "timestamp"})
NUMERIC_TYPES: frozenset[str] = frozenset({"int", "float", "bool"})
DeclaredType = Literal["int", "float", "bool", "string", "timestamp"]
DatasetKind = Literal["csv", "parquet", "sqlite"]

CSV_BLOCK_BYTES = 1 << 20


class CatalogError(Exception):
    """A dataset cannot be registered or read; the message names the entry and what is wrong."""

    def __init__(self, message: str, *, dataset: str | None = None) -> None:
        super().__init__(message)
        self.dataset = dataset


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetConfig(_Strict):
    """One entry of the node's datasets file."""

    name: str = Field(pattern=IDENTIFIER_PATTERN)
    kind: DatasetKind
    path: str = Field(min_length=1, max_length=4096)
    table: str | None = Field(default=None, pattern=IDENTIFIER_PATTERN)
    time_column: str | None = Field(default=None, pattern=IDENTIFIER_PATTERN)
    columns: dict[str, DeclaredType] = Field(default_factory=dict)
    description: str = Field(default="", max_length=500)

    @field_validator("columns")
    @classmethod
    def _column_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not IDENTIFIER.match(name):
                raise ValueError(f"column name {name!r} is not an identifier ({IDENTIFIER_PATTERN})")
        return value

    @model_validator(mode="after")
    def _table_for_sqlite(self) -> DatasetConfig:
        if self.kind == "sqlite" and self.table is None:
            raise ValueError("a sqlite dataset needs 'table'")
        if self.kind != "sqlite" and self.table is not None:
            raise ValueError(f"'table' is only for sqlite datasets, not {self.kind}")
        if self.time_column is not None and self.columns.get(self.time_column, "timestamp") != "timestamp":
            raise ValueError(f"time_column {self.time_column!r} is declared as {self.columns[self.time_column]}")
        return self


class DatasetsFile(_Strict):
    datasets: list[DatasetConfig] = Field(default_factory=list, max_length=1000)

    @model_validator(mode="after")
    def _unique_names(self) -> DatasetsFile:
        repeat = first_repeat(entry.name for entry in self.datasets)
        if repeat is not None:
            raise ValueError(f"dataset {repeat[1]!r} is registered twice")
        return self


class ColumnSchema(_Strict):
    name: str
    type: ColumnType


class DatasetSchema(_Strict):
    """What the control plane's catalog learns about a dataset: its shape, never its rows."""

    name: str
    kind: DatasetKind
    columns: list[ColumnSchema]
    row_count: int = Field(ge=0)
    time_column: str | None = None
    description: str = ""
    # Columns present in the source whose names cannot be used in a query.
    ignored_columns: list[str] = Field(default_factory=list)

    def column_type(self, name: str) -> ColumnType | None:
        for column in self.columns:
            if column.name == name:
                return column.type
        return None

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]


def _arrow_logical(type_: pa.DataType) -> ColumnType:
    if pa.types.is_boolean(type_):
        return "bool"
    if pa.types.is_integer(type_):
        return "int"
    if pa.types.is_floating(type_) or pa.types.is_decimal(type_):
        return "float"
    if pa.types.is_string(type_) or pa.types.is_large_string(type_) or pa.types.is_string_view(type_):
        return "string"
    if pa.types.is_timestamp(type_) or pa.types.is_date(type_):
        return "timestamp"
    if pa.types.is_dictionary(type_):
        return _arrow_logical(type_.value_type)
    return "other"


def _sqlite_logical(declared: str) -> ColumnType:
    """SQLite's affinity rules (section 3.1 of its datatype page), plus names that say bool or time."""
    decl = declared.upper()
    if "BOOL" in decl:
        return "bool"
    if "DATE" in decl or "TIME" in decl:
        return "timestamp"
    if "INT" in decl:
        return "int"
    if "CHAR" in decl or "CLOB" in decl or "TEXT" in decl:
        return "string"
    if "REAL" in decl or "FLOA" in decl or "DOUB" in decl or "NUMERIC" in decl or "DECIMAL" in decl:
        return "float"
    return "other"


def sqlite_connect(path: Path) -> sqlite3.Connection:
    """A read-only connection: the data engine never writes a dataset."""
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)


def quote_identifier(name: str) -> str:
    """Quote a name for SQLite; only ever called on names that matched :data:`IDENTIFIER_PATTERN`."""
    if not IDENTIFIER.match(name):
        raise ValueError(f"{name!r} is not an identifier")
    return f'"{name}"'


@dataclass
class Dataset:
    """A registered dataset; its schema is read lazily and re-read when the file changes."""

    config: DatasetConfig
    path: Path
    _schema: DatasetSchema | None = field(default=None, repr=False)
    _stamp: tuple[int, int] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def kind(self) -> DatasetKind:
        return self.config.kind

    def _file_stamp(self) -> tuple[int, int]:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            raise CatalogError(f"dataset {self.name!r}: file {str(self.path)!r} does not exist",
                               dataset=self.name) from None
        except OSError as exc:
            raise CatalogError(f"dataset {self.name!r}: cannot read {str(self.path)!r}: {exc.strerror}",
                               dataset=self.name) from None
        return (stat.st_mtime_ns, stat.st_size)

    def schema(self) -> DatasetSchema:
        """The dataset's schema; :class:`CatalogError` naming the dataset if it cannot be read."""
        stamp = self._file_stamp()
        if self._schema is None or stamp != self._stamp:
            self._schema = self._read_schema()
            self._stamp = stamp
        return self._schema

    def _read_schema(self) -> DatasetSchema:
        try:
            if self.kind == "parquet":
                raw, rows = self._parquet_schema()
            elif self.kind == "csv":
                raw, rows = self._csv_schema()
            else:
                raw, rows = self._sqlite_schema()
        except CatalogError:
            raise
        except (pa.ArrowException, sqlite3.Error, OSError, ValueError) as exc:
            raise CatalogError(f"dataset {self.name!r}: cannot read {self.kind} file {str(self.path)!r}: "
                               f"{_one_line(exc)}", dataset=self.name) from None
        columns: list[ColumnSchema] = []
        ignored: list[str] = []
        for name, inferred in raw:
            if not IDENTIFIER.match(name):
                ignored.append(name)
                continue
            declared = self.config.columns.get(name)
            if name == self.config.time_column:
                declared = "timestamp"
            columns.append(ColumnSchema(name=name, type=declared or inferred))
        present = {c.name for c in columns}
        for name in [*self.config.columns, *([self.config.time_column] if self.config.time_column else [])]:
            if name not in present:
                raise CatalogError(f"dataset {self.name!r}: column {name!r} named in its config is not in the "
                                   f"{self.kind} source (columns: {', '.join(sorted(present)) or 'none'})",
                                   dataset=self.name)
        return DatasetSchema(name=self.name, kind=self.kind, columns=columns, row_count=rows,
                             time_column=self.config.time_column, description=self.config.description,
                             ignored_columns=ignored)

    def _parquet_schema(self) -> tuple[list[tuple[str, ColumnType]], int]:
        file = pq.ParquetFile(self.path)
        schema = file.schema_arrow
        return [(f.name, _arrow_logical(f.type)) for f in schema], int(file.metadata.num_rows)

    def csv_read_options(self) -> pacsv.ReadOptions:
        return pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES)

    def _csv_schema(self) -> tuple[list[tuple[str, ColumnType]], int]:
        reader = pacsv.open_csv(self.path, read_options=self.csv_read_options(),
                                convert_options=pacsv.ConvertOptions(column_types=self.csv_column_types()))
        raw = [(f.name, _arrow_logical(f.type)) for f in reader.schema]
        rows = 0
        try:
            for batch in reader:
                rows += batch.num_rows
        except pa.ArrowInvalid as exc:
            raise CatalogError(f"dataset {self.name!r}: a value in {str(self.path)!r} does not fit the type inferred "
                               f"from the start of the file ({_one_line(exc)}); declare the column's type in "
                               f"'columns'", dataset=self.name) from None
        return raw, rows

    def csv_column_types(self) -> dict[str, pa.DataType]:
        """Arrow types for the CSV columns whose type is declared (timestamps are normalised after reading)."""
        arrow = {"int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(), "string": pa.string()}
        return {name: arrow[t] for name, t in self.config.columns.items() if t in arrow}

    def _sqlite_schema(self) -> tuple[list[tuple[str, ColumnType]], int]:
        table = self.config.table
        assert table is not None  # checked by DatasetConfig
        with contextlib.closing(sqlite_connect(self.path)) as conn:
            exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type IN ('table', 'view') AND name = ?",
                                  (table,)).fetchone()
            if exists is None:
                names = [r[0] for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') ORDER BY name")]
                raise CatalogError(f"dataset {self.name!r}: table {table!r} is not in {str(self.path)!r} "
                                   f"(tables: {', '.join(names) or 'none'})", dataset=self.name)
            info = conn.execute(f"PRAGMA table_info({quote_identifier(table)})").fetchall()
            # The table name was checked against sqlite_master and the identifier pattern.
            rows = int(conn.execute(f"SELECT count(*) FROM {quote_identifier(table)}").fetchone()[0])  # noqa: S608
        return [(str(r[1]), _sqlite_logical(str(r[2] or ""))) for r in info], rows


class Catalog:
    """The node's registered datasets, by name."""

    def __init__(self, datasets: Iterable[Dataset] = ()) -> None:
        self._datasets: dict[str, Dataset] = {}
        for dataset in datasets:
            if dataset.name in self._datasets:
                raise CatalogError(f"dataset {dataset.name!r} is registered twice", dataset=dataset.name)
            self._datasets[dataset.name] = dataset

    @classmethod
    def from_config(cls, document: Any, *, base_dir: Path) -> Catalog:
        """Build from a parsed datasets document; :class:`CatalogError` naming the entry if it is malformed."""
        try:
            parsed = DatasetsFile.model_validate(document)
        except ValidationError as exc:
            raise CatalogError(f"datasets config: {_describe_config_error(exc, document)}") from None
        datasets = []
        for entry in parsed.datasets:
            path = Path(entry.path)
            datasets.append(Dataset(config=entry, path=path if path.is_absolute() else base_dir / path))
        return cls(datasets)

    @classmethod
    def from_file(cls, path: Path) -> Catalog:
        """Read a datasets file. A missing file is an empty catalog only if ``path`` is the default one."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CatalogError(f"datasets config {str(path)!r} does not exist") from None
        except OSError as exc:
            raise CatalogError(f"datasets config {str(path)!r} cannot be read: {exc.strerror}") from None
        try:
            document = json.loads(text)
        except ValueError as exc:
            raise CatalogError(f"datasets config {str(path)!r} is not valid JSON: {exc}") from None
        return cls.from_config(document, base_dir=path.parent)

    @classmethod
    def from_state_dir(cls, state_dir: Path) -> Catalog:
        """The default config of a node: ``<state_dir>/datasets.json``, or no datasets if there is none."""
        path = state_dir / DATASETS_FILE
        return cls.from_file(path) if path.exists() else cls()

    def names(self) -> list[str]:
        return sorted(self._datasets)

    def get(self, name: str) -> Dataset | None:
        return self._datasets.get(name)

    def check(self) -> list[DatasetSchema]:
        """Every schema, raising :class:`CatalogError` for the first dataset that cannot be read."""
        return [self._datasets[name].schema() for name in self.names()]

    def report(self) -> dict[str, Any]:
        """What the node reports to the control plane's catalog: schemas, and errors by dataset.

        One unreadable dataset does not hide the others: its entry carries the error instead.
        """
        schemas: list[dict[str, Any]] = []
        errors: dict[str, str] = {}
        for name in self.names():
            try:
                schemas.append(self._datasets[name].schema().model_dump(mode="json"))
            except CatalogError as exc:
                errors[name] = str(exc)
        return {"datasets": schemas, "errors": errors}


def _describe_config_error(exc: ValidationError, document: Any) -> str:
    """The first problem, naming the dataset entry by its name where it has one."""
    first = exc.errors()[0]
    loc: Sequence[Any] = first["loc"]
    where = ".".join(str(p) for p in loc) or "document"
    if len(loc) >= 2 and loc[0] == "datasets" and isinstance(loc[1], int):
        try:
            entry_name = document["datasets"][loc[1]].get("name")
        except (KeyError, IndexError, TypeError, AttributeError):
            entry_name = None
        if isinstance(entry_name, str):
            rest = ".".join(str(p) for p in loc[2:])
            where = f"dataset {entry_name!r}" + (f" field {rest!r}" if rest else "")
        else:
            where = f"datasets entry {loc[1]}" + (f" field {'.'.join(str(p) for p in loc[2:])!r}"
                                                    if len(loc) > 2 else "")
    return f"{where}: {first['msg']}"


def _one_line(value: object) -> str:
    return " ".join(str(value).split())[:300]
