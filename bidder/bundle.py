"""The model bundle format: one folder, the names of its files, its ``meta.json`` and the checks it passes.

A bundle holds ``model.onnx`` (the CTR model), ``spec.json`` (its features) and, listed under ``meta.json``'s
``graphs``, the graphs built for it: ``factorized`` (``candidate.onnx`` + ``factorized.onnx``, DeepFM's imp and
candidate parts: ``bidder.factorized``), ``market`` (``market.onnx`` and its terms ``market-terms.npz``, the
win-price model for first-price shading: ``bidder.shading``) and ``twotower`` (``imp_tower.onnx`` +
``ad_tower.onnx``, retrieval for large catalogs: ``bidder.retrieval``). A ``campaigns.json`` beside them is a
catalog, not part of the bundle.

``meta.json`` format 2 (``FORMAT_VERSION``) records ``format_version``, ``files`` (the sha256 of every file of
the bundle but ``meta.json``) and ``graphs`` (``{}`` when there are none). Format 1, what bundles were before
the key existed, is read and checked as far as it allows: the digests it recorded (``onnx_sha256``, the market
graph's and its terms' ``sha256``) and the graphs it lists (none when ``graphs`` is absent: the load then says,
in a warning, that first-price shading is off). ``upgrade`` rewrites a format-1 ``meta.json`` as format 2.

``Bundle.open`` is the one reader: a version it does not know, a file whose digest differs, a graph whose files
are not those of its kind, a graph claimed but missing, or a file no entry claims is refused with a
``BundleError`` naming the file and what disagrees. The writers (``write_bundle`` for a new bundle,
``add_graph`` for a graph added to one, ``update_meta`` for a top-level entry) stage every file beside its
final name, check the result as ``Bundle.open`` would, and move the files into place ``meta.json`` last,
putting back what they replaced if a move fails: a reader (the bidder reloading its model) never sees a
half-written bundle, and a failed write leaves the previous one as it was.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Union

import onnxruntime as ort

from bidder.spec import FeatureSpec, SpecError, load_spec

__all__ = ["AD_TOWER_FILE", "BundleError", "Bundle", "CAMPAIGNS_FILE", "CANDIDATE_FILE", "FACTORIZED_FILE",
           "FACTORIZED_GRAPH", "FORMAT_VERSION", "GRAPH_FILES", "IMP_TOWER_FILE", "MARKET_FILE", "MARKET_GRAPH",
           "META_FILE", "MODEL_FILE", "READABLE_VERSIONS", "SPEC_FILE", "TERMS_FILE", "TWOTOWER_GRAPH", "add_graph",
           "file_sha256", "load_graph", "read_meta", "session_options", "update_meta", "upgrade", "write_bundle"]

MODEL_FILE, SPEC_FILE, META_FILE = "model.onnx", "spec.json", "meta.json"
CAMPAIGNS_FILE = "campaigns.json"  # a catalog kept beside a bundle (the shipped one's); not part of it
CANDIDATE_FILE, FACTORIZED_FILE = "candidate.onnx", "factorized.onnx"
#: the factorized graph's inputs beside the model's: the candidates' parts and each row's imp and candidate
CAND_PART, ROW_IMP, ROW_CAND = "cand_part", "row_imp", "row_cand"
MARKET_FILE, TERMS_FILE = "market.onnx", "market-terms.npz"
IMP_TOWER_FILE, AD_TOWER_FILE = "imp_tower.onnx", "ad_tower.onnx"
FACTORIZED_GRAPH, MARKET_GRAPH, TWOTOWER_GRAPH = "factorized", "market", "twotower"  # keys under "graphs"

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
FORMAT_KEY, FILES_KEY, GRAPHS_KEY = "format_version", "files", "graphs"
#: each graph's files, in the order its entry's ``files`` lists them
GRAPH_FILES: dict[str, tuple[str, ...]] = {FACTORIZED_GRAPH: (CANDIDATE_FILE, FACTORIZED_FILE),
                                           MARKET_GRAPH: (MARKET_FILE,),
                                           TWOTOWER_GRAPH: (IMP_TOWER_FILE, AD_TOWER_FILE)}
#: data files an entry names under a key ({"file": ...}): the market model's terms, which the native bid search
#: reads; format 2 requires them, format 1 bundles may predate them
GRAPH_DATA: dict[str, dict[str, str]] = {MARKET_GRAPH: {"terms": TERMS_FILE}}
#: every file name a bundle may hold for a graph: removed when a new meta.json no longer lists it
GRAPH_FILE_NAMES = tuple(name for files in GRAPH_FILES.values() for name in files) + tuple(
    name for data in GRAPH_DATA.values() for name in data.values())

Source = Union[str, os.PathLike, bytes]  # what a writer is given for a file: a path to copy, or its bytes


class BundleError(ValueError):
    """A model bundle that cannot be served; the message says which file and what disagrees."""


# -- sessions ---------------------------------------------------------------------------------------------------
def session_options() -> ort.SessionOptions:
    """One thread, sequential, no spinning: a worker owns one core and must not burn it while idle."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def load_graph(path: Path) -> ort.InferenceSession:
    """A serving session (``session_options``) of a bundle's graph; BundleError if it cannot be made (an OSError
    other than a missing file is the caller's to report: "cannot read")."""
    try:
        graph = Path(path).read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{path}: listed in meta.json but missing") from None
    try:
        return ort.InferenceSession(graph, session_options(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for unreadable graphs
        raise BundleError(f"{path}: ONNX Runtime cannot load it: {exc}") from None


# -- reading ----------------------------------------------------------------------------------------------------
def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_meta(bundle: str | os.PathLike) -> dict[str, Any]:
    """``bundle``'s meta.json as it is ({} without one); BundleError if it is not a JSON object."""
    path = Path(bundle) / META_FILE
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: cannot read: {exc}") from None
    if not isinstance(meta, dict):
        raise BundleError(f"{path}: expected a JSON object")
    return meta


def format_version(meta: Mapping[str, Any], where: Path) -> int:
    """The format ``meta`` (read from ``where``) is written in: 1 without the key; BundleError for one not known."""
    version = meta.get(FORMAT_KEY, 1)
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise BundleError(f"{where}: {FORMAT_KEY} {version!r} is not a bundle format this bidder reads "
                          f"({', '.join(map(str, READABLE_VERSIONS))}); it was written by another version of it")
    return int(version)


def claimed_files(meta: Mapping[str, Any], version: int, where: Path) -> dict[str, str]:
    """Every file ``meta`` (format ``version``, read from ``where``) says the bundle holds, each with the key that
    claims it (``graphs.market.terms``...); BundleError for an entry that is not what its kind needs."""
    claimed = {MODEL_FILE: MODEL_FILE, SPEC_FILE: SPEC_FILE}
    graphs = meta.get(GRAPHS_KEY)
    if graphs is None and version == 1:
        return claimed
    if graphs is None:
        raise BundleError(f"{where}: no \"{GRAPHS_KEY}\": format {version} lists every graph the bundle holds "
                          f"({{}} for none)")
    if not isinstance(graphs, dict):
        raise BundleError(f"{where}: \"{GRAPHS_KEY}\" must be an object of graph entries, got {graphs!r}")
    for name, entry in graphs.items():
        if name not in GRAPH_FILES:
            raise BundleError(f"{where}: {GRAPHS_KEY}.{name}: not a graph this bidder knows "
                              f"({', '.join(GRAPH_FILES)})")
        if not isinstance(entry, dict):
            raise BundleError(f"{where}: {GRAPHS_KEY}.{name} must be an object, got {entry!r}")
        expected = list(GRAPH_FILES[name])
        if entry.get("files") != expected:
            raise BundleError(f"{where}: {GRAPHS_KEY}.{name}.files is {entry.get('files')!r}, expected {expected}")
        claimed.update({file: f"{GRAPHS_KEY}.{name}" for file in expected})
        for key, file in GRAPH_DATA.get(name, {}).items():
            data = entry.get(key)
            if data is None and version == 1:
                continue
            if not (isinstance(data, dict) and data.get("file") == file):
                raise BundleError(f"{where}: {GRAPHS_KEY}.{name}.{key} must be {{\"file\": \"{file}\", ...}}, "
                                  f"got {data!r}")
            claimed[file] = f"{GRAPHS_KEY}.{name}.{key}"
    return claimed


def recorded_digests(meta: Mapping[str, Any], version: int, claimed: Mapping[str, str],
                     where: Path) -> dict[str, str | None]:
    """sha256 per claimed file as ``meta`` records it (None where format 1 recorded none); BundleError where
    format 2's ``files`` and the claims disagree."""
    if version == 1:
        graphs = meta.get(GRAPHS_KEY) or {}
        market = graphs.get(MARKET_GRAPH) or {}
        recorded = {MODEL_FILE: meta.get("onnx_sha256"), MARKET_FILE: market.get("sha256"),
                    TERMS_FILE: (market.get("terms") or {}).get("sha256")}
        return {name: recorded.get(name) for name in claimed}
    files = meta.get(FILES_KEY)
    if not (isinstance(files, dict) and all(isinstance(v, str) for v in files.values())):
        raise BundleError(f"{where}: \"{FILES_KEY}\" must map each file of the bundle to its sha256, got {files!r}")
    for name, key in claimed.items():
        if name not in files:
            raise BundleError(f"{where}: {key} needs {name}, and \"{FILES_KEY}\" has no digest for it")
    for name in files:
        if name not in claimed:
            raise BundleError(f"{where}: \"{FILES_KEY}\" lists {name}, which nothing in {META_FILE} claims")
    return {name: files[name] for name in claimed}


class Bundle:
    """A bundle folder, opened and checked once: its format, spec, graphs and a verified digest per file.

    ``open`` refuses a bundle that is not self-consistent; ``session`` makes the ONNX Runtime sessions of its
    graphs. Every file is hashed once, when the bundle is opened.
    """

    def __init__(self, path: Path, meta: dict[str, Any], version: int, spec: FeatureSpec, digests: dict[str, str]):
        self.path, self.meta, self.version, self.spec, self.digests = path, meta, version, spec, digests

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Bundle":
        """The bundle in ``path``, checked: its format version, spec against ``spec_digest``, graph entries against
        their kinds and every file against its recorded digest; BundleError naming the first that disagrees."""
        path = Path(path)
        if not (path / MODEL_FILE).is_file():
            raise BundleError(f"{path}: no {MODEL_FILE}")
        meta = read_meta(path)
        where = path / META_FILE
        version = format_version(meta, where)
        try:
            spec = load_spec(path)
        except SpecError as exc:
            raise BundleError(str(exc)) from None
        digest = meta.get("spec_digest")
        if digest is None and version >= 2:
            raise BundleError(f"{where}: no spec_digest (the digest of the spec the model was trained with)")
        if digest is not None and digest != spec.digest:
            raise BundleError(f"{path}: spec.json does not match the spec the model was trained with "
                              f"(meta.json spec_digest {str(digest)[:12]}…, spec.json {spec.digest[:12]}…)")
        claimed = claimed_files(meta, version, where)
        digests = {}
        for name, recorded in recorded_digests(meta, version, claimed, where).items():
            file = path / name
            if not file.is_file():
                raise BundleError(f"{path}: meta.json {claimed[name]} lists {name} but the bundle has no such file")
            digests[name] = file_sha256(file)
            if recorded is not None and recorded != digests[name]:
                raise BundleError(f"{file}: its sha256 {digests[name][:12]}… is not the {recorded[:12]}… meta.json "
                                  "records: the file changed after the bundle was written")
        return cls(path, meta, version, spec, digests)

    @property
    def warnings(self) -> list[str]:
        """What serving this bundle leaves out without refusing it: the bidder logs each line at load."""
        if self.version == 1 and GRAPHS_KEY not in self.meta:
            return [f"{self.path}: meta.json (bundle format 1) lists no graphs: served without factorized scoring, "
                    "retrieval or a win-price model, so first-price shading is off (first-price imps are bid at "
                    f"their value); python -m train bundle-upgrade {self.path} records that none is meant"]
        return []

    @property
    def graphs(self) -> dict[str, dict[str, Any]]:
        """The graph entries of meta.json ({} for none)."""
        return self.meta.get(GRAPHS_KEY) or {}

    def graph(self, name: str) -> dict[str, Any] | None:
        return self.graphs.get(name)

    def graph_files(self, name: str) -> list[str]:
        """The files of graph ``name`` the bundle holds: its graphs, then its data files."""
        entry = self.graph(name)
        if entry is None:
            return []
        data = [file for key, file in GRAPH_DATA.get(name, {}).items() if entry.get(key) is not None]
        return [*GRAPH_FILES[name], *data]

    def file(self, name: str) -> Path:
        """The path of a file the bundle holds and meta.json claims (its digest checked at open)."""
        if name not in self.digests:
            raise BundleError(f"{self.path}: meta.json lists no {name}")
        return self.path / name

    def session(self, name: str) -> ort.InferenceSession:
        """A serving session of graph file ``name`` (``session_options``)."""
        return load_graph(self.file(name))


# -- writing ----------------------------------------------------------------------------------------------------
def write_bundle(out_dir: str | os.PathLike, files: Mapping[str, Source], meta: dict[str, Any]) -> Path:
    """A new bundle in ``out_dir`` (created if needed): ``files`` (name -> path or bytes: ``model.onnx``,
    ``spec.json`` and the graphs ``meta['graphs']`` lists) and ``meta``, stamped with the format and the files'
    digests. Files of a previous bundle's graphs that the new one does not list are removed; other files
    (a catalog beside it) stay. Returns ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**meta, GRAPHS_KEY: meta.get(GRAPHS_KEY) or {}}
    _commit(out, meta, files, kept={})
    return out


def add_graph(bundle_dir: str | os.PathLike, name: str, files: Mapping[str, Source],
              entry: dict[str, Any]) -> dict[str, Any]:
    """Add graph ``name`` (its ``files``, name -> path or bytes, and its meta.json ``entry``) to the bundle in
    ``bundle_dir``, replacing one of that name; nothing else of the bundle changes (a format-1 bundle is
    written as format 2). Returns the new meta.json."""
    bundle = Bundle.open(bundle_dir)
    meta = dict(bundle.meta)
    meta[GRAPHS_KEY] = {**bundle.graphs, name: entry}
    kept = {file: digest for file, digest in bundle.digests.items() if file not in files}
    return _commit(bundle.path, meta, files, kept)


def update_meta(bundle_dir: str | os.PathLike, entries: Mapping[str, Any]) -> dict[str, Any]:
    """Set top-level meta.json ``entries`` (a compressed bundle's ``compression``, its ``data``) of the bundle in
    ``bundle_dir``; its files, graphs and format are not entries a caller sets. Returns the new meta.json."""
    reserved = sorted(set(entries) & {FORMAT_KEY, FILES_KEY, GRAPHS_KEY})
    if reserved:
        raise BundleError(f"{bundle_dir}: meta.json {', '.join(reserved)} are written by add_graph / write_bundle")
    bundle = Bundle.open(bundle_dir)
    return _commit(bundle.path, {**bundle.meta, **entries}, {}, dict(bundle.digests))


def upgrade(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """Rewrite the format-1 ``meta.json`` of ``bundle_dir`` as format 2: checked as format 1 allows first, then
    the digest of every file recorded, ``graphs`` ({} when absent) kept; no other file changes. A bundle
    already in format 2 is left as it is. Returns {"bundle", "from", "to", "files"}."""
    bundle = Bundle.open(bundle_dir)
    if bundle.version == FORMAT_VERSION:
        return {"bundle": str(bundle.path), "from": bundle.version, "to": bundle.version, "files": bundle.digests}
    written = _commit(bundle.path, {**bundle.meta, GRAPHS_KEY: bundle.graphs}, {}, dict(bundle.digests))
    return {"bundle": str(bundle.path), "from": bundle.version, "to": FORMAT_VERSION, "files": written[FILES_KEY]}


def install(staged: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Copy the bundle in ``staged`` over ``out_dir`` (created if needed), as ``write_bundle`` writes one."""
    source = Bundle.open(staged)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _commit(out, dict(source.meta), {name: source.path / name for name in source.digests}, kept={})
    return out


def _without_format1_digests(entry: dict[str, Any]) -> dict[str, Any]:
    """``entry`` less the ``sha256`` format 1 kept in graph entries: format 2 records digests in ``files``."""
    out = {key: value for key, value in entry.items() if key != "sha256"}
    for key, value in out.items():
        if isinstance(value, dict) and "file" in value and "sha256" in value:
            out[key] = {k: v for k, v in value.items() if k != "sha256"}
    return out


def _commit(out: Path, meta: dict[str, Any], files: Mapping[str, Source], kept: Mapping[str, str]) -> dict[str, Any]:
    """Stage ``files`` in ``out``, stamp ``meta`` (format, every file's digest: staged ones hashed, ``kept`` ones
    as given), check it as ``Bundle.open`` does and move the staged files into place, meta.json last. Files of
    graphs the new meta.json does not claim are then removed. Returns the meta.json written."""
    with tempfile.TemporaryDirectory(prefix=".bundle-", dir=out) as tmp:
        staged: dict[str, Path] = {}
        digests = dict(kept)
        for name, source in files.items():
            staged[name] = Path(tmp) / name
            if isinstance(source, bytes):
                staged[name].write_bytes(source)
            else:
                shutil.copyfile(source, staged[name])
            digests[name] = file_sha256(staged[name])
        body = {key: value for key, value in meta.items() if key not in (FORMAT_KEY, FILES_KEY)}
        if isinstance(body.get(GRAPHS_KEY), dict):
            body[GRAPHS_KEY] = {name: _without_format1_digests(entry) if isinstance(entry, dict) else entry
                                for name, entry in body[GRAPHS_KEY].items()}
        written = {FORMAT_KEY: FORMAT_VERSION, **body}
        claimed = claimed_files(written, FORMAT_VERSION, out / META_FILE)
        missing = [name for name in claimed if name not in digests]
        if missing:
            raise BundleError(f"{out}: meta.json would claim {', '.join(missing)}, which nothing writes")
        written[FILES_KEY] = {name: digests[name] for name in sorted(claimed)}
        staged[META_FILE] = Path(tmp) / META_FILE
        staged[META_FILE].write_text(json.dumps(written, indent=2) + "\n", encoding="utf-8")
        replace_files(out, staged)
    for name in GRAPH_FILE_NAMES:  # a previous bundle's graphs, built for the model this one replaces
        if name not in claimed:
            (out / name).unlink(missing_ok=True)
    return written


def replace_files(out: Path, staged: Mapping[str, Path]) -> None:
    """Move each staged file onto ``out / name`` in order (meta.json last, so the files it lists exist before
    a reader can see it list them). If a move fails, the files already moved are put back as they were."""
    backups = Path(tempfile.mkdtemp(prefix=".replaced-", dir=out))
    done: list[tuple[str, Path | None]] = []
    try:
        for name, path in staged.items():
            target = out / name
            backup = None
            if target.exists():
                backup = backups / name
                try:
                    os.link(target, backup)  # the old file stays reachable under a second name: no copy
                except OSError:  # a file system without hard links
                    shutil.copy2(target, backup)
            os.replace(path, target)
            done.append((name, backup))
    except BaseException:
        for name, backup in reversed(done):
            if backup is None:
                (out / name).unlink(missing_ok=True)
            else:
                os.replace(backup, out / name)
        raise
    finally:
        shutil.rmtree(backups, ignore_errors=True)
