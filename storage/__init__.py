"""Object storage: every path is a URI, and commits are generations named by a pointer written last.

    storage.uri     parse / join (confined names) / display (no credentials)
    storage.fs      resolve(uri) -> (pyarrow filesystem, path); fsspec for DCP; read/write/list/copy helpers
    storage.commit  CommitRoot: immutable generations + conditional pointer writes + collection
    storage.errors  StorageError `<uri>: <cause>` and bounded retries
    storage.dcp     DCP's fsspec writer / reader for a URI
This package imports nothing of model/, pipeline/ or jobs/: the data path, the trainer and serving all use it.
"""

from storage.commit import CURRENT, CommitRoot, Pointer
from storage.errors import CommitConflict, ConfinementError, StorageError
from storage.fs import (
    copy_file,
    copy_tree,
    delete,
    exists,
    is_file,
    listdir,
    open_input,
    open_output,
    read_bytes,
    resolve,
    walk,
    write_bytes,
)
from storage.uri import display, is_local, join, name_of, parent, parse

__all__ = [
    "CURRENT",
    "CommitConflict",
    "CommitRoot",
    "ConfinementError",
    "Pointer",
    "StorageError",
    "copy_file",
    "copy_tree",
    "delete",
    "display",
    "exists",
    "is_file",
    "is_local",
    "join",
    "listdir",
    "name_of",
    "open_input",
    "open_output",
    "parent",
    "parse",
    "read_bytes",
    "resolve",
    "walk",
    "write_bytes",
]
