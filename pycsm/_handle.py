"""Ownership of a native handle by a Python object: no native call ever gets a freed handle.

libcsm counts references itself (native/src/csm_ref.h): a free during a call is carried out when
the call returns, and contexts and codecs keep their model alive. What C cannot see is a Python
thread that has read the pointer but not yet entered the call when another thread frees it. Every
wrapper therefore lends its pointer to native calls through NativeHandle.use(), and close() frees it
only when no such call is running.
"""

from __future__ import annotations

import contextlib
import threading

from .errors import CSMError


class NativeHandle:
    """A native pointer and the function that frees it.

    use() lends the pointer to native calls for the length of a `with` block; close() frees it at
    once when nothing uses it, else when the last user returns (a close from another thread, or
    from a callback of the running call). After close(), use() raises CSMError("the <what> is
    closed").
    """

    def __init__(self, ptr: int, free, what: str):
        self._ptr = ptr
        self._free = free
        self._what = what
        self._users = 0
        self._closing = False
        self._lock = threading.Lock()

    @property
    def closed(self) -> bool:
        return self._ptr is None or self._closing

    def get(self) -> int:
        """The pointer, for a caller that keeps the owning object alive itself."""
        with self._lock:
            if self._ptr is None or self._closing:
                raise CSMError(f"the {self._what} is closed")
            return self._ptr

    @contextlib.contextmanager
    def use(self):
        with self._lock:
            if self._ptr is None or self._closing:
                raise CSMError(f"the {self._what} is closed")
            self._users += 1
            ptr = self._ptr
        try:
            yield ptr
        finally:
            with self._lock:
                self._users -= 1
                ptr = None
                if self._closing and self._users == 0 and self._ptr is not None:
                    ptr, self._ptr = self._ptr, None
            if ptr is not None:
                self._free(ptr)

    def close(self) -> None:
        with self._lock:
            if self._ptr is None or self._closing:
                return
            self._closing = True
            ptr = None
            if self._users == 0:
                ptr, self._ptr = self._ptr, None
        if ptr is not None:
            self._free(ptr)


class NativeOwner:
    """The life cycle of a wrapper that owns one NativeHandle in `self._native` (Model, Generator,
    Batch, MimiStreamDecoder): `closed`, `close()`, a context manager, and a finaliser.

    close() frees the native object; a call running meanwhile (in another thread, or the call whose
    callback closes it) finishes first. Every later use raises CSMError("the <what> is closed")."""

    _native: NativeHandle | None = None  # set by the subclass's __init__ once the handle exists

    @property
    def closed(self) -> bool:
        return self._native is None or self._native.closed

    def close(self) -> None:
        if self._native is not None:
            self._native.close()

    def __enter__(self):
        if self._native is None:
            raise CSMError("this object was never opened")
        self._native.get()  # closed: say so at the `with`
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()
