"""A folder of traced LayerGraphs, so that a model spec is traced (torch imported, the model
built on meta tensors) once per torch, autoplan and tracing code, not once per command.

Where: $AUTOPLAN_CACHE_DIR if set, else $XDG_CACHE_HOME/autoplan/graphs, else
~/.cache/autoplan/graphs (the XDG convention; the environment is read here, not in the CLI,
so that `autoplan.auto` and library callers share the cache the CLI fills). One JSON file
per entry, named by the digest of its key; deleting the folder is always safe.

An entry is keyed by everything that decides the graph:

- the model spec as typed, with --seq beside it (applying --seq needs autoplan.models,
  which imports torch; the cache is consulted before that);
- dtype and attention;
- the installed torch version (read from package metadata: torch is not imported) and
  autoplan's version;
- a digest of the source files that turn a spec into a graph (_SOURCES), so that editing
  the tracer or a model family invalidates every entry;
- for `hf:path/config.json`: a digest of that file's content and the transformers version.

`module:pkg.mod:factory` specs are never cached: the factory is user code that may change
at any time, and nothing here could tell. Saved graph.json files are not specs and are not
cached either (reading one is already cheap).

An entry that cannot be read, is not JSON, has another key or fails LayerGraph's checks is
never trusted: it is traced again and overwritten, with a warning. A cache that cannot be
written (read-only, full) costs only the next trace, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from autoplan import __version__
from autoplan.graph import LayerGraph
from autoplan.io import atomic_write_text

__all__ = ["CACHE_DIR_ENV", "get_cache_dir", "graph_cache_key", "cached_graph"]

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "AUTOPLAN_CACHE_DIR"
"""Environment variable naming the cache folder itself (no `graphs` appended)."""

_ENTRY_FORMAT_VERSION = 1
"""1: {"version", "key", "graph"}; an entry of another version is traced again."""

_PACKAGE = Path(__file__).resolve().parent
_SOURCES = ("tracing.py", "tp_plan.py", "graph.py", "replay.py", "units.py", "meta_state.py",
            "inspection.py", "models/*.py")
"""The files, relative to autoplan/, whose code decides a traced graph."""


def get_cache_dir() -> Path:
    """The folder of cached graphs: $AUTOPLAN_CACHE_DIR, else $XDG_CACHE_HOME/autoplan/graphs,
    else ~/.cache/autoplan/graphs (it need not exist yet)."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "autoplan" / "graphs"


def graph_cache_key(spec: str, dtype: str, attention: str,
                    seq: int | None = None) -> dict[str, str | int | None] | None:
    """What decides the graph of `spec` traced in `dtype` with `attention` (see the module
    docstring), or None when it is not to be cached (a module: spec, a missing hf: file).

    Example:
        >>> graph_cache_key("llama3-8b", "bf16", "flash")["spec"]
        'llama3-8b'
    """
    spec = spec.strip()
    if spec.startswith("module:"):
        return None
    key: dict[str, str | int | None] = {
        "spec": spec, "seq": seq, "dtype": dtype, "attention": attention,
        "torch": _package_version("torch"), "autoplan": __version__,
        "sources": _sources_digest()}
    if spec.startswith("hf:"):
        path = Path(spec.removeprefix("hf:").partition(",")[0])
        try:
            key["hf_config"] = hashlib.sha256(path.read_bytes()).hexdigest()
        except (OSError, ValueError):  # ValueError: a NUL in the path
            return None  # tracing says what is wrong with the path
        key["transformers"] = _package_version("transformers")
    return key


def cached_graph(spec: str, dtype: str, attention: str, seq: int | None,
                 trace: Callable[[], LayerGraph]) -> LayerGraph:
    """The graph of `spec` from the cache, else `trace()`'s, stored for the next call.

    Args:
        spec, dtype, attention, seq: what `trace` traces (the cache key's inputs).
        trace: traces the model; called on a miss, and always for an uncached spec.

    Returns:
        A graph equal to what `trace()` returns.

    Raises:
        AutoplanError: whatever `trace` raises (a bad spec is never stored).
    """
    key = graph_cache_key(spec, dtype, attention, seq)
    if key is None:
        return trace()
    path = get_cache_dir() / f"{_digest(key)}.json"
    graph = _read_entry(path, key)
    if graph is not None:
        logger.debug("graph cache hit: %s (%s)", spec, path)
        return graph
    graph = trace()
    _write_entry(path, key, graph)
    return graph


def _read_entry(path: Path, key: dict) -> LayerGraph | None:
    """The entry's graph; None when there is none, or, with a warning, when it is not
    to be trusted (it is then overwritten)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        return _distrust(path, f"cannot be read: {err}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        return _distrust(path, f"is not JSON: {err}")
    if not isinstance(data, dict) or data.get("version") != _ENTRY_FORMAT_VERSION:
        return _distrust(path, f"is not a version {_ENTRY_FORMAT_VERSION} cache entry")
    if data.get("key") != key:
        return _distrust(path, "holds another key")
    try:
        return LayerGraph.from_dict(data.get("graph"), f"graph cache entry '{path}'")
    except (ValueError, TypeError, KeyError) as err:  # AutoplanError is a ValueError
        return _distrust(path, f"is not a layer graph: {err}")


def _distrust(path: Path, why: str) -> None:
    logger.warning("graph cache entry %s %s; tracing the model again", path, why)
    return None


def _write_entry(path: Path, key: dict, graph: LayerGraph) -> None:
    entry = {"version": _ENTRY_FORMAT_VERSION, "key": key, "graph": graph.to_dict()}
    try:
        atomic_write_text(path, json.dumps(entry))
    except OSError as err:
        logger.warning("graph cache: cannot write %s (%s); the next run traces again",
                       path, err.strerror or err)


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _sources_digest() -> str:
    """sha256 of the tracing code (_SOURCES): ~140 kB read, under a millisecond."""
    digest = hashlib.sha256()
    for pattern in _SOURCES:
        for path in sorted(_PACKAGE.glob(pattern)):
            digest.update(path.relative_to(_PACKAGE).as_posix().encode() + b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _package_version(name: str) -> str | None:
    """An installed distribution's version, without importing it; None if not installed."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None
