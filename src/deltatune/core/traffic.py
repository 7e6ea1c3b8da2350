"""Threads sharing one DeltaModel: any number of plain calls at once, a routed batch alone.

A routed batch (`delta_ids`, `dm.route`) sets each delta's rows on the delta itself, where its hooks read them.
A second thread's call in the meantime ran with those rows: two server threads each routing a mixed batch through
one model gave another batch's rows (a RoutingError about row counts) or, with equal batch sizes, another batch's
deltas, without an error (tiny BERT, 3 LoRA deltas, 2 threads x 200 calls: 197 errors, 1 wrong output). So a routed
batch waits until the plain calls in flight are done and holds the model until it ends; plain calls wait while
another thread's routed batch runs, and run together otherwise. The routing thread's own calls inside its
`dm.route(...)` block pass. Compiled graphs do not run this Python: under torch.compile callers serialize routed
batches themselves.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch


class Traffic:
    """A readers-writer gate: plain calls share it, a routed batch holds it alone (re-entrant in its thread)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._plain: dict[int, int] = {}  # plain calls in flight per thread
        self._router: int | None = None
        self._depth = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> Traffic:
        return Traffic()  # a copied model is a model of its own: nobody is inside it yet

    @contextlib.contextmanager
    def plain(self) -> Iterator[None]:
        if torch.compiler.is_compiling():
            yield
            return
        me = threading.get_ident()
        with self._cv:
            while self._router not in (None, me):  # this thread's own routed batch passes (`with dm.route(...)`)
                self._cv.wait()
            self._plain[me] = self._plain.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cv:
                self._plain[me] -= 1
                if not self._plain[me]:
                    del self._plain[me]
                    self._cv.notify_all()

    @contextlib.contextmanager
    def routed(self) -> Iterator[None]:
        if torch.compiler.is_compiling():
            yield
            return
        me = threading.get_ident()
        with self._cv:
            if self._router != me:
                while self._router is not None or any(t != me for t in self._plain):  # its own plain call passes
                    self._cv.wait()
                self._router = me
            self._depth += 1
        try:
            yield
        finally:
            with self._cv:
                self._depth -= 1
                if not self._depth:
                    self._router = None
                    self._cv.notify_all()
