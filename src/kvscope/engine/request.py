"""Re-export: :class:`Request` lives in :mod:`kvscope.request` (shared by kv/ and engine/)."""
from kvscope.request import Request, RequestStatus

__all__ = ["Request", "RequestStatus"]
