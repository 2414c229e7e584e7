"""What this host lets routing do: privileges, and the xtables plugins python-iptables loads.

Plain checks with no opinion on what follows: the installer refuses to
start without them (:mod:`.installer`), ``tproxy doctor`` reports them with
a fix (:mod:`.doctor`). Nothing here loads libxtables or python-iptables.
"""

from __future__ import annotations

import os

CAP_NET_ADMIN = 12
#: Where distributions put the xtables extension plugins (``$XTABLES_LIBDIR`` first).
XTABLES_DIRS = (
    "/usr/lib/x86_64-linux-gnu/xtables",
    "/usr/lib/aarch64-linux-gnu/xtables",
    "/usr/lib/xtables",
    "/usr/lib64/xtables",
    "/usr/libexec/xtables",
    "/lib/xtables",
)
#: The plugins our iptables rules use (targets TPROXY and MARK, matches socket and comment).
PLUGINS = ("libxt_TPROXY.so", "libxt_socket.so", "libxt_MARK.so", "libxt_comment.so")


def has_net_admin() -> bool:
    """Root, or CAP_NET_ADMIN in the effective set."""
    if os.geteuid() == 0:
        return True
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except OSError:
        pass
    return False


def xtables_dirs() -> list[str]:
    """The xtables extension directories to search: ``$XTABLES_LIBDIR``, then those that exist."""
    dirs = [os.environ["XTABLES_LIBDIR"]] if os.environ.get("XTABLES_LIBDIR") else []
    return dirs + [d for d in XTABLES_DIRS if os.path.isdir(d)]


def plugins_problem(dirs: list[str]) -> str | None:
    """None if every plugin of :data:`PLUGINS` is in one of ``dirs``, else what is missing."""
    if not dirs:
        return "no xtables extension directory found"
    missing = [p for p in PLUGINS if not any(os.path.exists(os.path.join(d, p)) for d in dirs)]
    if missing:
        return f"missing {', '.join(missing)} in {dirs[0]}"
    return None
