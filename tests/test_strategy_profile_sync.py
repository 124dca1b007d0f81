"""benchmarks/gpu/strategy_profile.py's SyncSites: the warnings of torch's sync debug mode, counted by
the innermost kvscope frame that raised them (the GPU run itself is not testable on the CPU)."""
from __future__ import annotations

import inspect
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks" / "gpu"))

from strategy_profile import PACKAGE, SyncSites  # noqa: E402

SYNC = "called a synchronizing CUDA operation"


def _warn_from(path: str, message: str, line: int) -> None:
    # Code compiled under a package path stands in for a kvscope frame that makes a synchronizing call.
    exec(compile("\n" * (line - 1) + f"warnings.warn({message!r})", path, "exec"), {"warnings": warnings})


def test_sync_warnings_are_counted_by_their_kvscope_call_site():
    with SyncSites() as found:
        for _ in range(3):
            _warn_from(PACKAGE + "kv/eviction.py", SYNC, 7)
        _warn_from(PACKAGE + "engine/engine.py", SYNC, 42)
        _warn_from(PACKAGE + "engine/engine.py", "some other warning", 43)
    assert dict(found.sites) == {"kv/eviction.py:7": 3, "engine/engine.py:42": 1}


def test_outside_the_package_the_warning_names_its_own_place_and_the_filter_is_restored():
    before = warnings.showwarning
    with SyncSites() as found:
        line = inspect.currentframe().f_lineno + 1
        warnings.warn(SYNC)
    assert dict(found.sites) == {f"{__file__}:{line}": 1}
    assert warnings.showwarning is before
