"""The nftables backend: our table of an instance, added and deleted in one transaction each.

What the table holds and how it is rendered from a plan is pure and lives in
:mod:`.nftrules` (the plan renders it; this module only applies, deletes and
lists it). :class:`NftBackend` handles one item kind, :class:`NftTable`: the
whole table, applied atomically by libnftables (either the new table is
there, or nothing changed); installed tables of ours are found by their
name (``tproxy_`` + instance) and read back with :func:`.nftrules.read_table`.

:class:`Nft` talks to the kernel through a small ctypes binding to
``libnftables.so.1`` (the ``nft`` command if the library is missing): scripts in
nft's text syntax (:mod:`.nftrules` says why not JSON), listings as JSON.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
from typing import Any

from .backend import StepError
from .items import Found, Item, NftTable
from .nftrules import FAMILY, NFT_TABLE_PREFIX, batch, delete_script, read_table

# ---------------------------------------------------------------- libnftables

_NFT_CTX_OUTPUT_JSON = 1 << 4


class Nft:
    """libnftables through ctypes (``nft`` the command if the library cannot load).

    ``use_library=False`` runs the command even where the library loads (tests).

    One context per call: a context's netlink socket stays in the namespace
    it was opened in.
    """

    def __init__(self, use_library: bool = True) -> None:
        self._lib: Any = None
        lib = None
        if use_library:
            try:
                lib = ctypes.CDLL("libnftables.so.1")
            except OSError:
                pass
        if lib is None:
            if shutil.which("nft") is None:
                raise StepError(
                    "load libnftables",
                    "neither libnftables.so.1 nor nft found (apt install nftables)",
                )
            return
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        self._lib = lib

    def run(self, command: str) -> tuple[int, str, str]:
        """Run an ``nft -f`` script (one transaction), output as JSON: (rc, output, errors)."""
        if self._lib is None:
            # nft -j -f - would read a text script as JSON, fail, find stdin used
            # up and apply nothing, yet exit 0: only listings get -j.
            listing = command.startswith("list ")
            proc = subprocess.run(
                ["nft", "-j", *command.split()] if listing else ["nft", "-f", "-"],
                input=None if listing else command,
                text=True,
                capture_output=True,
                timeout=60,
                check=False,
            )
            return proc.returncode, proc.stdout, proc.stderr
        lib = self._lib
        ctx = lib.nft_ctx_new(0)
        if not ctx:
            raise StepError("libnftables", "nft_ctx_new failed")
        try:
            lib.nft_ctx_output_set_flags(ctx, _NFT_CTX_OUTPUT_JSON)
            lib.nft_ctx_buffer_output(ctx)
            lib.nft_ctx_buffer_error(ctx)
            rc = lib.nft_run_cmd_from_buffer(ctx, command.encode())
            out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
            err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
            return rc, out, err
        finally:
            lib.nft_ctx_free(ctx)

    def list_json(self, what: str) -> list[dict[str, Any]]:
        """``nft -j list WHAT`` as its list of objects (empty if the object is missing)."""
        rc, out, _ = self.run(f"list {what}")
        if rc != 0 or not out.strip():
            return []
        return list(json.loads(out).get("nftables", []))


def _error_lines(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line] or lines
    return " / ".join(errors)[:400] or "nft refused the batch"


def available() -> str | None:
    """None if the nft backend can work here, else why not."""
    try:
        nft = Nft()
        rc, _, err = nft.run("list tables")
    except StepError as exc:
        return exc.cause
    if rc != 0:
        return _error_lines(err)
    return None


class NftBackend:
    """Our ``inet`` tables: added and deleted whole, each in one transaction."""

    def __init__(self) -> None:
        self._nft = Nft()

    def handles(self, item: object) -> bool:
        return isinstance(item, NftTable)

    def add(self, item: Item) -> None:
        """Create the table, or swap our installed one for it, in one transaction.

        A table of that name without our comments is never merged into nor
        deleted: refused.
        """
        assert isinstance(item, NftTable)
        step = f"nft -f - (table inet {item.name}, {item.rules} rules)"
        existing = self._nft.list_json(f"table {FAMILY} {item.name}")
        if existing and read_table(existing, item.name) is None:
            raise StepError(step, f"table {FAMILY} {item.name} exists and is not ours")
        rc, _, err = self._nft.run(batch(item, replace=bool(existing)))
        if rc != 0:
            raise StepError(step, _error_lines(err))

    def remove(self, item: Found) -> bool:
        assert isinstance(item, NftTable)
        if not self._nft.list_json(f"table {FAMILY} {item.name}"):
            return False
        rc, _, err = self._nft.run(delete_script(item.name))
        if rc != 0:
            raise StepError(f"nft delete table {FAMILY} {item.name}", _error_lines(err))
        return True

    def installed(self) -> list[Item]:
        found: list[Item] = []
        for entry in self._nft.list_json("tables"):
            table = entry.get("table")
            if not table or table.get("family") != FAMILY:
                continue
            name = str(table.get("name", ""))
            if not name.startswith(NFT_TABLE_PREFIX):
                continue
            read = read_table(self._nft.list_json(f"table {FAMILY} {name}"), name)
            if read is not None:
                found.append(read)
        return found

    def close(self) -> None:
        pass
