"""Safe file handling shared by every module that reads or writes files.

- `atomic_writer` / `atomic_write_bytes`: a final name is either the old file or the complete
  new one; `write_file` does that or raises the one-line user error naming the path;
  `remove_stale_temp_files` cleans up after a process killed while writing.
- `require_file`: one clear error for a missing, empty or directory path.
- `load_pth`: `torch.load(weights_only=True)` of an archive whose declared sizes are bounded,
  with the objects other toolboxes pickle beside their weights read as inert placeholders; any
  other global refuses the file, running nothing.
- `load_array_pickle`: the python pickles datasets ship (CIFAR), numpy arrays and containers only.
- `parse_json`: JSON from a file or metadata others may have written, bounded (nesting depth,
  integer size) so that odd input is one line, not a RecursionError;
- `first_line`: the useful first line (or sentence) of a library's long error message;
  `readable`: a file-system name as text any output can hold.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import secrets
import socket
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from convnext_cifar.errors import UserError

_HOST = socket.gethostname().replace(".", "_")
MAX_SAFETENSORS_HEADER = 100_000_000  # bytes: the safetensors library's own limit
RESUME_ADVICE = "earlier files are intact; free space or fix permissions and resume"


def temp_path(path: Path) -> Path:
    """A temporary name beside `path` that says which host and process write it."""
    return path.parent / f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(3)}.tmp"


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write `path` through: on success it is fsynced and renamed over `path`
    (which is either the old file or the complete new one); on any error it is removed."""
    path = Path(path)
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode as open() gives
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either the old file or the complete new one."""
    with atomic_writer(path) as f:
        f.write(data)


def file_hash(path: Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes, read a megabyte at a time."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_file(path: Path, data: bytes, what: str = "",
               advice: str = "earlier files are intact; free space or fix permissions") -> None:
    """`atomic_write_bytes`, or one UserError: could not write [what] PATH: reason; advice."""
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        name = f"{what} {path}" if what else str(path)
        raise UserError(f"could not write {name}: {e.strerror or e}; {advice}") from None


def remove_stale_temp_files(folder: Path, shared: bool = False) -> None:
    """Temporary files left by a process killed while writing (never under a final name).

    In a folder only this process writes to (a locked work dir) every one is stale; in a
    `shared` one (a decode cache two runs may fill at once) only those of dead processes of
    this host, and unnamed ones a day old.
    """
    for path in Path(folder).glob(".*.tmp"):
        if shared:
            parts = path.name.split(".")
            try:
                pid = int(parts[-3])
            except (IndexError, ValueError):
                pid = None
            if pid is None:
                if time.time() - _mtime(path) < 86400:
                    continue
            elif parts[-4] != _HOST or _alive(pid):
                continue
        path.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def require_file(path: Path, what: str) -> Path:
    """`path` as a Path if it is a non-empty file; otherwise one clear UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {path} does not exist")
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory; give a file in it")
    if path.stat().st_size == 0:
        raise UserError(f"{what} {path} is empty")
    return path


def readable(text: str) -> str:
    """`text` as every output can hold it: a name the file system gave as bytes that are not
    UTF-8 (a folder from a Windows zip, `caf\\xe9`) shows those bytes as \\xNN."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def one_line(text: str) -> str:
    """`text` as one field of a line-per-record file (val_files.txt, tab-separated output):
    backslash, tab, newline and carriage return written as \\\\, \\t, \\n, \\r, so any name reads
    back unambiguously."""
    return (text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
            .replace("\r", "\\r"))


def user_cache_dir() -> Path:
    """This tool's folder in the user's cache: $XDG_CACHE_HOME/convnext-cifar, else
    ~/.cache/convnext-cifar (decode caches, which warnings were given)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "convnext-cifar"


def first_time(key: str) -> bool:
    """Whether `key` (a warning's text, say) comes up for the first time on this machine; it is
    remembered as an empty file in the user's cache. True too when that cannot be written."""
    mark = user_cache_dir() / "said" / hashlib.sha256(key.encode("utf-8", "surrogateescape")
                                                     ).hexdigest()[:32]
    if mark.exists():
        return False
    with contextlib.suppress(OSError):
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.touch()
    return True


def spreadsheet_cell(text: str) -> str:
    """A CSV cell a spreadsheet shows as text: one starting with = + - @ (a formula to it), or a
    tab or carriage return, gets a leading apostrophe."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def first_line(e: BaseException, sentence: bool = True) -> str:
    """The first line of an exception's message, cut at its first sentence unless `sentence` is
    False (torch's messages go on for a paragraph); at most 200 characters."""
    text = str(e).strip()
    if not text:
        return type(e).__name__[:200]
    line = text.splitlines()[0]
    return (line.split(". ")[0] if sentence else line)[:200]


# ---- .pth files: torch.load(weights_only=True) with inert toolbox objects ----------------------

# Globals that checkpoint writers pickle beside the weights; read as inert placeholders.
INERT_PREFIXES = ("mmengine.", "mmcv.", "mmpretrain.", "mmcls.", "mmdet.", "mmseg.", "numpy.")
INERT_NAMES = ("builtins.getattr",)  # numpy and MMEngine pickles use it; a placeholder never calls


class _Inert:
    """Stands in for a class the checkpoint names: takes any arguments and state, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def _placeholders(names: list[str]) -> list[tuple[type, str]]:
    out = []
    for name in names:
        module, _, qualname = name.rpartition(".")
        out.append((type(qualname, (_Inert,), {"__module__": module}), name))
    return out


def _is_inert(name: str) -> bool:
    return name.startswith(INERT_PREFIXES) or name in INERT_NAMES


UNPACKED_RATIO = 2  # torch.save stores its archive's members uncompressed: unpacked ~ on disk
UNPACKED_SLACK = 16 * 2**20  # bytes: small archives' headers and padding


def check_unpacked_size(path: Path) -> None:
    """Refuse a zip archive (torch's .pth format) whose members declare more bytes unpacked than
    UNPACKED_RATIO x its size on disk: a compressed archive (torch.save writes none) that would
    take far more memory than its size says, checked from the directory before reading."""
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # not a zip (torch's legacy format) or damaged: torch.load says which
    on_disk = path.stat().st_size
    if declared > UNPACKED_RATIO * on_disk + UNPACKED_SLACK:
        raise UserError(f"{path} declares {declared / 2**20:,.0f} MB unpacked from "
                        f"{on_disk / 2**20:,.1f} MB on disk (a compressed archive, which "
                        "torch.save never writes); refused before reading it. If you trust "
                        "it, load and torch.save it again where memory allows")


def load_pth(path: Path) -> object:
    """`torch.load(weights_only=True)` of an archive whose declared sizes fit its size on disk,
    with toolbox objects read as inert placeholders."""
    import torch

    check_unpacked_size(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # not a zip checkpoint: nothing to inspect, refuse below
            unsafe = []
        refused = [n for n in unsafe if not _is_inert(n)]
        if refused or not unsafe:
            detail = ", ".join(refused) or _pickle_detail(e)
            raise UserError(f"{path} needs arbitrary code to unpickle ({detail}); refused, "
                            "nothing in it was run. Convert it where you trust it") from None
        first_error = e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({first_line(e)}); it may "
                        "be truncated or of another kind") from None
    try:
        with torch.serialization.safe_globals(_placeholders(unsafe)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise UserError(f"{path} could not be read safely ({first_line(first_error)}); refused, "
                        "nothing in it was run") from None


def _pickle_detail(e: BaseException) -> str:
    """The useful part of torch's weights_only refusal: the global or opcode it stopped at."""
    text = str(e)
    if names := re.findall(r"GLOBAL ([\w.]+)", text):
        return ", ".join(dict.fromkeys(names))
    after = text.split("WeightsUnpickler error:", 1)
    if len(after) == 2 and after[1].strip():
        return after[1].strip().splitlines()[0][:200]
    return first_line(e)


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file, read from its header alone (no torch, no tensors);
    {} when the file is missing, damaged or has none."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= MAX_SAFETENSORS_HEADER:
                return {}
            header = parse_json(f.read(size), "header")
    except (OSError, UserError):
        return {}
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return {k: v for k, v in metadata.items() if isinstance(v, str)} if isinstance(
        metadata, dict) else {}


# ---- JSON from others ---------------------------------------------------------------------------

MAX_JSON_DEPTH = 64  # a config nests 2 levels, metadata 3: deeper is no file of this project
MAX_JSON_INT = 2**63  # every count, size, seed or step this project writes fits in 64 bits


def shown(value: object) -> str:
    """`value`'s repr for a message, cut short: a few levels, items and digits."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother, short.maxlong = 3, 60, 60, 40
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 6
    return short.repr(value)


def parse_json(text: str | bytes, what: str) -> object:
    """`text` as JSON, or one UserError starting with `what` (not valid JSON, nested deeper
    than MAX_JSON_DEPTH, an integer of 64 bits or more: the field named by its path)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise UserError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:
        if "integer string conversion" in str(e):
            raise UserError(f"{what} holds an integer of thousands of digits; at most 64-bit "
                            "integers are read") from None
        raise UserError(f"{what} is not valid JSON ({first_line(e)})") from None
    pending: list[tuple[object, str, int]] = [(value, "", 1)]  # (value, path, its level)
    while pending:  # iterative: a deep value cannot overflow the stack here
        node, where, depth = pending.pop()
        if depth > MAX_JSON_DEPTH and isinstance(node, (dict, list)):
            raise UserError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels (at "
                            f"{where[:80]}...)")
        if isinstance(node, int) and not isinstance(node, bool) and abs(node) >= MAX_JSON_INT:
            raise UserError(f"{what}: {where.lstrip('.') or 'the value'} is an integer of "
                            f"{len(str(abs(node)))} digits; at most 64-bit integers are read")
        if isinstance(node, dict):
            pending += [(v, f"{where}.{k}", depth + 1) for k, v in node.items()]
        elif isinstance(node, list):
            pending += [(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(node)]
    return value


# ---- dataset pickles: numpy arrays and plain containers only ------------------------------------

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only: a data file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"): ("numpy", "ndarray"),
        ("numpy", "dtype"): ("numpy", "dtype"),
        ("_codecs", "encode"): ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2
    }

    def find_class(self, module: str, name: str):  # noqa: D102
        target = self._ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        if target[0] == "numpy._core.multiarray":
            try:
                from numpy._core import multiarray  # numpy >= 2
            except ImportError:  # numpy 1.x
                from numpy.core import multiarray
            return getattr(multiarray, target[1])
        return super().find_class(*target)


def load_array_pickle(path: Path, fix: str) -> dict:
    """A dict pickled by a dataset's authors (Python 2's cPickle for CIFAR), keys as str.

    `fix` is what the user should do when the file is missing or unreadable.
    """
    # Python 2's str objects are bytes here; numpy's own advice for such arrays is latin1.
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise UserError(f"missing {path}; {fix}") from None
    except Exception as e:  # truncated or foreign file: pickle raises many kinds of error
        raise UserError(f"cannot read {path} as a dataset file ({type(e).__name__}: {e}); "
                        f"{fix}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a dataset batch file (holds a {type(obj).__name__})")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
