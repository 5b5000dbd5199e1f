"""Pools and SFT files as TFDS datasets (ArrayRecord), read back through Grain.

``scas-jax dataset build`` (:func:`build_pool_dataset`, :func:`build_sft_dataset`) turns a
pool directory (one JSONL per teacher) or an SFT file into a versioned TFDS dataset:

* one record per row, in file order, teachers in the order :func:`discover_pool` gives
  (``disable_shuffling=True``: TFDS keeps that order); features ``teacher`` (the
  file-level teacher), ``file`` (the source file's name), ``line`` (its 1-based line
  number), ``id_key`` (:func:`scas_jax.data.rows.id_key` of the id, "" when none) and
  ``row`` (the whole row as JSON: every field, with its JSON type);
* the dataset's ``metadata.json`` lists, per teacher, its source file's name, kind
  (candidates or scores), sha256 and the slice ``[start, start + rows)`` of records;
* every row is read through :func:`scas_jax.data.jsonl.iter_jsonl` and validated as the
  stages validate it (malformed JSON, invalid correctness flags, duplicate ids in a
  candidate file), so an error names the source ``file:line``;
* the dataset is written into a temporary directory beside ``DATA_DIR/<name>`` and
  renamed at the end: an error leaves nothing behind.

Every stage that takes a pool directory accepts such a dataset directory too (the data
dir, ``DATA_DIR/<name>`` or ``DATA_DIR/<name>/<version>``): :mod:`scas_jax.data.files`
detects it (:func:`find_dataset_dir`) and yields per teacher exactly the rows of its
source file, in the same order (:func:`iter_teacher_rows`, a Grain ``MapDataset`` over
the TFDS data source), with the source's ``file:line`` and sha256, so outputs, manifests'
input checksums, ``--skip-existing`` and score journals are the same as for the JSONL pool.

The bundled GSM8K pool is the registered dataset ``scas_gsm8k_pool``:
``tfds.data_source("scas_gsm8k_pool", data_dir=D)`` works once this module is imported
(``tfds.builder(...).download_and_prepare()`` builds it; :func:`gsm8k_data_source`
builds it on first use).

tensorflow_datasets and grain are imported inside the functions that need them, never
when scas_jax or a command that does not read a dataset is imported.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from scas_jax.errors import ScasError

VERSION = _VERSION_STR = "1.0.0"
SPLIT = "train"
FORMAT = "scas_jax.pool/1"  # metadata["format"]: what the records mean
SFT_FORMAT = "scas_jax.sft/1"
GSM8K_NAME = "scas_gsm8k_pool"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
INSTALL_HINT = "pip install tensorflow-datasets==4.9.10 grain==0.2.18"


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - a runtime dependency
        raise ScasError(f"TFDS datasets need tensorflow-datasets and grain ({INSTALL_HINT})") from e
    return tfds


# ---------------------------------------------------------------- sources


@dataclass
class Source:
    """One input file of a dataset: its path, file-level teacher, kind and sha256 (hex)."""

    path: Path
    teacher: str
    kind: str
    sha256: str


def pool_sources(pool_dir: str | Path) -> list[Source]:
    """The files :func:`scas_jax.data.files.discover_pool` finds in ``pool_dir`` (a JSONL
    pool directory), each with its sha256."""
    from scas_jax.data.files import discover_pool, find_dataset_dir
    from scas_jax.scoring.identity import file_sha256

    if find_dataset_dir(pool_dir) is not None:
        raise ScasError(f"{pool_dir} is already a TFDS dataset; build from the JSONL pool directory")
    return [Source(pf.path, pf.teacher, pf.kind, file_sha256(pf.path)) for pf in discover_pool(pool_dir)]


def _validated_rows(src: Source, *, check_ids: bool) -> Iterator[tuple[int, dict]]:
    """``(line, row)`` of ``src`` through ``iter_jsonl``, with the stages' row checks:
    a correctness flag that is not a verdict, and (candidate files) a duplicated id, are
    errors naming ``file:line``."""
    from scas_jax.data.jsonl import iter_jsonl
    from scas_jax.data.rows import id_key
    from scas_jax.data.verdicts import correctness_at

    first_line: dict[str, int] = {}
    for line, row in iter_jsonl(src.path):
        correctness_at(row, f"{src.path}:{line}")
        if check_ids and row.get("id") is not None:
            key = id_key(row["id"])
            if key in first_line:
                raise ScasError(f"{src.path}:{line}: duplicate id {key} (first at line {first_line[key]})")
            first_line[key] = line
        yield line, row


# ---------------------------------------------------------------- the builder

_BUILDER: dict[str, type] = {}
# The module our builder classes claim: one segment, so that TFDS looks for no code
# files (checksums.tsv, ...) beside them (with a package path it would need the
# importlib_resources backport to inspect an editable install).
_CLASS_MODULE = "scas_jax_datasets"


def _features(tfds):
    import numpy as np

    return tfds.features.FeaturesDict({
        "teacher": tfds.features.Text(),
        "file": tfds.features.Text(),
        "line": tfds.features.Scalar(dtype=np.int64),
        "id_key": tfds.features.Text(),
        "row": tfds.features.Text(),
    })  # fmt: skip


def _base_builder():
    """The builder class (defined on first use, so that tfds loads only then)."""
    if "base" in _BUILDER:
        return _BUILDER["base"]
    tfds = _tfds()

    class LocalInfo(tfds.core.DatasetInfo):
        """A DatasetInfo that never looks for precomputed info on GCS: TFDS's
        ``initialize_from_bucket`` (run by every builder on a data dir without a dataset)
        makes a ``tempfile.mkdtemp("tfds")`` directory it never removes, then tries the
        network; our datasets are only ever local."""

        def initialize_from_bucket(self) -> None:
            pass

    class ScasPoolBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """One record per answer of a pool (or row of an SFT file); see the module docstring."""

        VERSION = tfds.core.Version(_VERSION_STR)
        RELEASE_NOTES = {_VERSION_STR: "one record per answer: teacher, file, line, id_key, row (JSON)"}

        def __init__(self, *, sources: list[Source] | None = None, fmt: str = FORMAT,
                     description: str = "", **kwargs):
            self._sources = list(sources or [])
            self._fmt = fmt
            self._description = description
            super().__init__(file_format="array_record", **kwargs)

        def _log_download_done(self):  # it would name the temporary build dir
            pass

        def _log_download_bytes(self):
            pass

        def _info(self):
            metadata = tfds.core.MetadataDict(format=self._fmt, teachers=[])
            return LocalInfo(
                builder=self, description=self._description or "scas_jax answer pool",
                features=_features(tfds), metadata=metadata, disable_shuffling=True)

        def _split_generators(self, dl_manager):
            if not self._sources:
                raise ScasError(f"dataset {self.name}: no source files to build from")
            return {SPLIT: self._generate_examples()}

        def _generate_examples(self):
            from scas_jax.data.files import CANDIDATES
            from scas_jax.data.rows import id_key

            teachers = self.info.metadata["teachers"]
            teachers.clear()
            k = 0
            for src in self._sources:
                entry = {"teacher": src.teacher, "file": src.path.name, "kind": src.kind,
                         "sha256": src.sha256, "start": k, "rows": 0}
                for line, row in _validated_rows(src, check_ids=src.kind == CANDIDATES
                                                 and self._fmt == FORMAT):
                    yield k, {"teacher": src.teacher, "file": src.path.name, "line": line,
                              "id_key": "" if row.get("id") is None else id_key(row["id"]),
                              "row": json.dumps(row, ensure_ascii=False)}
                    k += 1
                entry["rows"] = k - entry["start"]
                teachers.append(entry)

    _BUILDER["base"] = ScasPoolBuilder
    return ScasPoolBuilder


def _builder_class(name: str):
    """A builder class named ``name`` (not registered: ``builder_from_directory`` reads it)."""
    if not _NAME_RE.match(name):
        raise ScasError(f"dataset name {name!r}: use lowercase letters, digits and _ (a TFDS name)")
    if name not in _BUILDER:
        base = _base_builder()
        _BUILDER[name] = types.new_class(
            f"ScasPool_{name}", (base,), {"skip_registration": True},
            lambda ns: ns.update(name=name, __module__=_CLASS_MODULE))
    return _BUILDER[name]


def _build(sources: list[Source], data_dir: str | Path, name: str, fmt: str, description: str,
           overwrite: bool) -> Path:
    """Build into a temp dir beside ``DATA_DIR/<name>``, then rename; return the version dir."""
    from scas_jax.io_utils import cleanup_created

    cls = _builder_class(name)
    data_dir = Path(data_dir)
    final = data_dir / name / VERSION
    if final.exists() and not overwrite:
        raise ScasError(f"{final} already exists: pass --overwrite to rebuild it, or choose another --name")
    with cleanup_created(data_dir):
        data_dir.mkdir(parents=True, exist_ok=True)
        return _build_in(cls, sources, data_dir, name, fmt, description, final)


def _build_in(cls, sources, data_dir: Path, name: str, fmt: str, description: str, final: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=data_dir))
    try:
        builder = cls(sources=sources, fmt=fmt, description=description, data_dir=str(tmp))
        _tfds().disable_progress_bar()
        try:
            builder.download_and_prepare(download_config=_tfds().download.DownloadConfig(
                try_download_gcs=False))
        except ScasError:
            raise
        except Exception as e:  # TFDS wraps generator errors; find ours
            cause = _scas_cause(e)
            if cause is not None:
                raise cause from None
            raise ScasError(f"building dataset {name} in {data_dir}: {type(e).__name__}: {e}") from e
        built = tmp / name / VERSION
        (final.parent).mkdir(parents=True, exist_ok=True)
        if final.exists():
            shutil.rmtree(final)
        os.replace(built, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        parent = data_dir / name
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
    return final


def _scas_cause(e: BaseException) -> ScasError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, ScasError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def build_pool_dataset(pool_dir: str | Path, data_dir: str | Path, name: str = "scas_pool",
                       *, overwrite: bool = False) -> Path:
    """Build the TFDS dataset ``name`` of the JSONL pool ``pool_dir`` into ``data_dir``;
    return its version directory. ScasError (naming ``file:line``) on an invalid row,
    with nothing left in ``data_dir``."""
    sources = pool_sources(pool_dir)
    return _build(sources, data_dir, name, FORMAT, f"scas_jax pool built from {Path(pool_dir).name}",
                  overwrite)


def build_sft_dataset(data_file: str | Path, data_dir: str | Path, name: str | None = None,
                      *, overwrite: bool = False) -> Path:
    """Build the TFDS dataset of one SFT JSONL file (one record per row, teacher from the
    row or "") into ``data_dir``; return its version directory."""
    from scas_jax.scoring.identity import file_sha256

    path = Path(data_file)
    if not path.is_file():
        raise ScasError(f"SFT file not found: {path}")
    name = name or re.sub(r"[^a-z0-9_]", "_", path.stem.lower()).lstrip("_0123456789") or "scas_sft"
    src = Source(path, "", "sft", file_sha256(path))
    return _build([src], data_dir, name, SFT_FORMAT, f"scas_jax SFT rows from {path.name}", overwrite)


# ---------------------------------------------------------------- finding and reading


@dataclass
class TeacherSlice:
    """The records of one teacher in a built dataset (what a PoolFile reads from)."""

    version_dir: Path
    teacher: str
    file: str
    kind: str
    sha256: str
    start: int
    rows: int

    def iter_rows(self, limit: int | None = None) -> Iterator[tuple[int, dict]]:
        yield from iter_teacher_rows(self, limit)


_SOURCES: dict[tuple, Any] = {}  # opened data sources, by directory and build


def read_metadata(version_dir: str | Path) -> dict:
    """``metadata.json`` of a built dataset (format, teachers); ScasError when it is not a
    scas_jax dataset."""
    from scas_jax.data.jsonl import read_json

    path = Path(version_dir) / "metadata.json"
    if not path.is_file():
        raise ScasError(f"{version_dir}: a TFDS dataset without scas_jax metadata (metadata.json); "
                        "build it with scas-jax dataset build")
    meta = read_json(path, "dataset metadata")
    if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, SFT_FORMAT):
        raise ScasError(f"{path}: not a scas_jax pool dataset (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    return meta


def teacher_slices(version_dir: str | Path) -> list[TeacherSlice]:
    """Per teacher, where its rows are, in the order the dataset holds them."""
    version_dir = Path(version_dir)
    meta = read_metadata(version_dir)
    return [TeacherSlice(version_dir, t["teacher"], t["file"], t["kind"], t["sha256"], int(t["start"]),
                         int(t["rows"])) for t in meta["teachers"]]


def _array_record_files(version_dir: Path) -> list[Path]:
    return sorted(p for p in version_dir.iterdir() if ".array_record" in p.name)


def _corrupt_file(version_dir: Path) -> Path | None:
    """The first array_record file of ``version_dir`` that cannot be read through."""
    from array_record.python.array_record_module import ArrayRecordReader

    for path in _array_record_files(version_dir):
        try:
            reader = ArrayRecordReader(str(path), "readahead_buffer_size:0")
            try:
                n = reader.num_records()
                if n:
                    reader.read(list(range(n)))
            finally:
                reader.close()
        except Exception:
            return path
    return None


def _read_error(version_dir: Path, e: Exception) -> ScasError:
    bad = _corrupt_file(version_dir)
    if bad is not None:
        return ScasError(f"{bad}: corrupt or truncated array_record file ({type(e).__name__}: {e})")
    return ScasError(f"{version_dir}: cannot read the dataset: {type(e).__name__}: {e}")


def data_source(version_dir: str | Path):
    """The TFDS data source (random access) of a built dataset's ``train`` split."""
    version_dir = Path(version_dir)
    info = version_dir / "dataset_info.json"
    stamp = info.stat() if info.exists() else None  # a rebuilt dataset is opened afresh
    key = (str(version_dir.resolve()), stamp and (stamp.st_mtime_ns, stamp.st_ino))
    if key not in _SOURCES:
        tfds = _tfds()
        try:
            builder = tfds.builder_from_directory(str(version_dir))
            src = builder.as_data_source(SPLIT)
            expected = builder.info.splits[SPLIT].num_examples
            if len(src) != expected:
                raise ValueError(f"{len(src)} records, dataset_info says {expected}")
        except Exception as e:
            raise _read_error(version_dir, e) from None
        _SOURCES[key] = src
    return _SOURCES[key]


def _decode(record: dict) -> tuple[int, dict]:
    row = record["row"]
    return int(record["line"]), json.loads(row.decode("utf-8") if isinstance(row, bytes) else row)


def map_dataset(version_dir: str | Path, start: int = 0, stop: int | None = None):
    """A Grain ``MapDataset`` of ``(line, row)`` over records ``[start, stop)``."""
    import grain

    ds = grain.MapDataset.source(data_source(version_dir))
    if start or stop is not None:
        ds = ds.slice(slice(start, stop))
    return ds.map(_decode)


READ_WINDOW = 1024  # records fetched at once by a sequential read (6x one at a time here)


def _windows(version_dir: Path, start: int, stop: int, size: int = READ_WINDOW):
    """A Grain ``MapDataset`` over records ``[start, stop)`` whose elements are lists of
    up to ``size`` decoded ``(line, row)``: one batched fetch from the data source a
    window (``__getitems__``), not one per record."""
    import grain

    ds = grain.MapDataset.source(data_source(version_dir)).slice(slice(start, stop))
    return ds.batch(size, batch_fn=list).map(lambda records: [_decode(r) for r in records])


def iter_teacher_rows(sl: TeacherSlice, limit: int | None = None) -> Iterator[tuple[int, dict]]:
    """``(source line, row)`` of one teacher, in source order (at most ``limit``), read
    :data:`READ_WINDOW` records at a time."""
    n = sl.rows if limit is None else min(sl.rows, max(int(limit), 0))
    if n == 0:
        return
    it = iter(_windows(sl.version_dir, sl.start, sl.start + n))
    while True:
        try:
            window = next(it)
        except StopIteration:
            return
        except Exception as e:
            raise _read_error(sl.version_dir, e) from None
        yield from window


# ---------------------------------------------------------------- sharding (multi-host)


def process_shard_options(shard_index: int | None = None, shard_count: int | None = None,
                          drop_remainder: bool = False):
    """Grain ``ShardOptions`` of this process: ``jax.process_index()`` of
    ``jax.process_count()`` unless given."""
    import grain

    if shard_index is None or shard_count is None:
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    return grain.sharding.ShardOptions(shard_index=shard_index, shard_count=shard_count,
                                       drop_remainder=drop_remainder)


def shard(ds, options=None):
    """This process's part of a Grain ``MapDataset``: every ``shard_count``-th element from
    ``shard_index`` (options: :func:`process_shard_options` by default). The shards of all
    processes cover every element exactly once."""
    options = options or process_shard_options()
    return ds.slice(slice(options.shard_index, None, options.shard_count))


# ---------------------------------------------------------------- the bundled GSM8K pool


def _register_gsm8k():
    """Register ``scas_gsm8k_pool`` with TFDS (once); return its builder class."""
    if GSM8K_NAME in _BUILDER:
        return _BUILDER[GSM8K_NAME]
    tfds = _tfds()
    from tensorflow_datasets.core import registered

    if GSM8K_NAME in registered._DATASET_REGISTRY:  # pylint: disable=protected-access
        _BUILDER[GSM8K_NAME] = registered._DATASET_REGISTRY[GSM8K_NAME]
        return _BUILDER[GSM8K_NAME]
    base = _base_builder()

    def __init__(self, **kwargs):
        from scas_jax.assets import GSM8K_POOL

        base.__init__(self, sources=pool_sources(GSM8K_POOL), fmt=FORMAT,
                      description="GSM8K answers of six teachers, bundled with scas_jax (MIT)", **kwargs)

    cls = types.new_class("ScasGsm8kPool", (base,), {},
                          lambda ns: ns.update(name=GSM8K_NAME, __init__=__init__, __module__=_CLASS_MODULE))
    _BUILDER[GSM8K_NAME] = cls
    del tfds
    return cls


def gsm8k_data_source(data_dir: str | Path):
    """``tfds.data_source("scas_gsm8k_pool", data_dir=data_dir)``, built there on first use."""
    _register_gsm8k()
    tfds = _tfds()
    builder = tfds.builder(GSM8K_NAME, data_dir=str(data_dir))
    if not Path(builder.data_dir).joinpath("dataset_info.json").is_file():
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return tfds.data_source(GSM8K_NAME, data_dir=str(data_dir), split=SPLIT)


# importing this module registers the bundled dataset, as TFDS dataset modules do
try:
    _register_gsm8k()
except ScasError:  # pragma: no cover - tensorflow_datasets missing: said when used
    pass
