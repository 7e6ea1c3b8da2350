"""Threads sharing one DeltaModel: any number of plain calls at once, a routed batch alone.

A routed batch (`delta_ids`, `dm.route`) sets each delta's rows on the delta itself, where its hooks read them.
A second thread's call in the meantime ran with those rows: two server threads each routing a mixed batch through
one model gave another batch's rows (a RoutingError about row counts) or, with equal batch sizes, another batch's
deltas, without an error (tiny BERT, 3 LoRA deltas, 2 threads x 200 calls: 197 errors, 1 wrong output). So a routed
batch waits until the plain calls in flight are done and holds the model until it ends; plain calls wait while
another thread's routed batch runs, and run together otherwise. The routing thread's own calls inside its
`dm.route(...)` block pass. The backbone itself, called past the DeltaModel (`model(...)`, `st.encode`), counts as a
plain call (`Gate`). Calls that switch deltas (`switch`: add, detach, enable, merge, ...) hold the model
the same way, and a waiting router or switch goes before new plain calls. Compiled graphs do not run this Python:
under torch.compile callers serialize routed batches and switches themselves.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn
from transformers import PreTrainedModel

from .claims import check_routes
from .delta import DeltaError
from .routing import RoutingError, RowIds, refuse_recomputation, row_names
from .targeting import held_models

if TYPE_CHECKING:
    from .model import DeltaModel

F = TypeVar("F", bound=Callable[..., Any])


class Traffic:
    """A readers-writer gate: plain calls share it, a routed batch holds it alone (re-entrant in its thread)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._plain: dict[int, int] = {}  # plain calls in flight per thread
        self._calls: dict[int, list[FrameType]] = {}  # per thread, the module calls that entered at a `Gate`
        self._upgrading: set[int] = set()  # threads inside a plain call that wait to route or switch
        self._router: int | None = None
        self._depth = 0
        self._waiting = 0  # routed batches and switches waiting: new plain calls let them in first
        self.batches = 0  # routed batches open (in the router's thread): a switch inside one is refused

    def __deepcopy__(self, memo: dict[int, Any]) -> Traffic:
        return Traffic()  # a copied model is a model of its own: nobody is inside it yet

    @contextlib.contextmanager
    def plain(self) -> Iterator[None]:
        if torch.compiler.is_compiling():
            yield
            return
        self.enter()
        try:
            yield
        finally:
            self.leave()

    def enter(self, call: FrameType | None = None) -> None:
        """Begin a plain call in this thread (`plain`, and the backbone's own gate, `Gate`, which passes the frame
        of the module call it gates: `_held` drops the call once that frame is off the thread's stack)."""
        me = threading.get_ident()
        with self._cv:
            # this thread's own routed batch passes (`with dm.route(...)`), and its nested calls; others queue
            # behind a waiting router, else a steady stream of calls kept it out for good
            while self._router != me and (self._router is not None or (self._waiting and me not in self._plain)):
                self._cv.wait()
            self._plain[me] = self._plain.get(me, 0) + 1
            if call is not None:
                self._calls.setdefault(me, []).append(call)

    def _held(self) -> dict[int, int]:
        """The plain calls in flight, less those that ended without leaving: torch runs a module's always-called
        hooks for an Exception only, so a KeyboardInterrupt (a notebook's stop button) or a SystemExit inside a
        gated call left it counted, and every later router of another thread waited for good (a thread that
        ended inside one, or a call whose frame is no longer on its thread's stack)."""
        stacks = sys._current_frames()
        for t in list(self._plain):
            if t not in stacks:
                self._plain.pop(t)
                self._calls.pop(t, None)
                continue
            calls = self._calls.get(t)
            if not calls:
                continue
            live = set()
            frame: FrameType | None = stacks[t]
            while frame is not None:
                live.add(id(frame))
                frame = frame.f_back
            ended = [c for c in calls if id(c) not in live]
            if ended:
                self._calls[t] = [c for c in calls if id(c) in live]
                if not self._calls[t]:
                    self._calls.pop(t)
                self._plain[t] -= len(ended)
                if self._plain[t] <= 0:
                    self._plain.pop(t)
        return self._plain

    def leave(self, call: FrameType | None = None) -> None:
        """End this thread's innermost plain call (one that never began, or that `_held` dropped, is ignored)."""
        me = threading.get_ident()
        with self._cv:
            if call is not None:
                calls = self._calls.get(me, [])
                if not any(c is call for c in calls):
                    return  # dropped as ended: it is not counted any more
                calls.remove(call)
                if not calls:
                    self._calls.pop(me)
            if me not in self._plain:
                return
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
                if me in self._plain and self._upgrading:  # each would wait for the other's call to end
                    raise DeltaError(
                        "a routed batch or a switch (add, enable, merge, ...) inside a call of this model (a hook, a "
                        "LogitsProcessor, a StoppingCriteria) waits for the other threads' calls, and another thread "
                        "waits the same way for this one; make it outside the model's call, or in one thread only"
                    )
                self._waiting += 1
                if me in self._plain:
                    self._upgrading.add(me)
                try:
                    while self._router is not None or any(t != me for t in self._held()):  # its own plain call passes
                        self._cv.wait(timeout=1.0)  # wakes to drop calls of threads that ended inside one
                finally:
                    self._waiting -= 1
                    self._upgrading.discard(me)
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


def switch(method: F) -> F:
    """A DeltaModel call that changes which deltas act or how (add, detach, enable, disable, set_active, merge,
    unmerge, loading tensors): it waits for other threads' calls in flight and holds the model while it runs.
    A server that hot-loads a delta (`dm.add`) or switches one while another thread computes gave that call some
    layers with the delta and some without, no error."""

    @functools.wraps(method)
    def run(self: DeltaModel, *args: Any, **kwargs: Any) -> Any:
        with self._traffic.routed():
            if self._traffic.batches:  # its rows are set on the deltas: a merge acted on every row, an add broke it
                raise DeltaError(
                    f"cannot {method.__name__} inside a routed batch (`with dm.route(...)`): the rows are set on the "
                    "deltas for this batch; call it before or after the `with` block"
                )
            return method(self, *args, **kwargs)

    return run  # type: ignore[return-value]


@contextlib.contextmanager
def routed_batch(dm: DeltaModel, delta_ids: RowIds, rows: int | None) -> Iterator[None]:
    """`dm.route(...)`: each delta's rows set on it while the batch runs, the model held by this thread."""
    rows = row_names(delta_ids, batch=rows)
    with dm._traffic.routed():  # other threads' calls wait: the rows live on the deltas
        # checked holding the model: a delta added or merged by another thread in between failed on a bare KeyError
        # or ran merged and routed at once
        for n in sorted({n for row in rows for n in row}):
            dm.delta(n)
        refuse_recomputation(dm.backbone)
        routes = check_routes(dm.deltas, rows, dm._device())
        previous = {n: d.route for n, d in dm.deltas.items()}
        dm._traffic.batches += 1
        try:
            for n, delta in dm.deltas.items():
                delta.route = routes[n]
            yield
        finally:
            dm._traffic.batches -= 1
            for n, delta in dm.deltas.items():
                delta.route = previous[n]


GATE = "_deltatune_gate"  # where a gated module keeps its Gate
ROUTING_KEYWORDS = frozenset({"delta_ids", "adapter_names"})  # the DeltaModel's, never the backbone's


class Gate:
    """The backbone's own plain-call gate while deltas act on it: a call of `model` itself (the backbone users keep
    after `dt.attach`), or sentence-transformers' `st.encode`, passes the DeltaModel's forward, so it ran with another
    thread's routed rows (tiny BERT: 100 of 100 raw calls beside routed batches failed; with equal batch sizes they
    take another batch's deltas, no error) and beside a switch. Its first pre-hook enters the gate as a plain call; an
    always-called forward hook, kept last so that the deltas' own output hooks run inside, leaves it."""

    def __init__(self, module: nn.Module, traffic: Traffic) -> None:
        self.traffic = traffic
        self.removed = False
        self.handles = [
            module.register_forward_pre_hook(self._enter, prepend=True, with_kwargs=True),
            module.register_forward_hook(self._leave, always_call=True),
        ]

    def _enter(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if not torch.compiler.is_compiling():  # compiled graphs do not run this Python (see the module's note)
            call = _module_call(sys._getframe(1))
            self.traffic.enter(call)  # first: the always-called hook leaves, also when this call is refused
            if self.removed:  # the last delta went while this call waited: its leaving hook is gone too
                self.traffic.leave(call)
                return
        for key in ROUTING_KEYWORDS & kwargs.keys():
            raise RoutingError(
                f"{key} reaches the deltas through the DeltaModel: call dm(..., {key}=...) (or dm.generate); "
                f"{type(module).__name__} itself takes no {key} (its **kwargs would drop them, and every row would run "
                "with every enabled delta)"
            )

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if not torch.compiler.is_compiling():
            self.traffic.leave(_module_call(sys._getframe(1)))

    def outermost(self, module: nn.Module) -> None:
        """Enter before every other hook of `module` and leave after them (deltas attached later add hooks)."""
        enter, leave = (h.id for h in self.handles)
        if enter in module._forward_pre_hooks:
            module._forward_pre_hooks.move_to_end(enter, last=False)
        if leave in module._forward_hooks:
            module._forward_hooks.move_to_end(leave)

    def remove(self) -> None:
        self.removed = True
        for handle in self.handles:
            handle.remove()


_CALL = nn.Module._call_impl.__code__


def _module_call(frame: FrameType) -> FrameType:
    """torch's `Module._call_impl` frame that runs a hook: on this thread's stack until the module call ends. Hooks
    run inside its nested `inner()`, the always-called hooks of a failed call in `_call_impl` itself."""
    found: FrameType | None = frame
    for _ in range(4):
        if found is None or found.f_code is _CALL:
            break
        found = found.f_back
    return found if found is not None and found.f_code is _CALL else frame


def _gated(backbone: nn.Module) -> list[nn.Module]:
    """The backbone and every transformers model inside it: `generate` calls a T5's encoder past the top model's
    call, and users call `model.model(...)` / `model.bert(...)`; gated only at the top, those ran with another
    thread's rows (raw T5 generate: 222 of 300 outputs wrong beside routed batches)."""
    inner = [m for m in backbone.modules() if m is not backbone and isinstance(m, PreTrainedModel)]
    return [backbone, *inner, *(m for _, m in held_models(backbone) if not isinstance(m, PreTrainedModel))]


def gate(backbone: nn.Module, traffic: Traffic) -> None:
    """Gate `backbone` and the transformers models inside it on `traffic`."""
    for module in _gated(backbone):
        found = vars(module).get(GATE)
        if found is None:
            found = vars(module)[GATE] = Gate(module, traffic)
        found.outermost(module)


def ungate(backbone: nn.Module) -> None:
    for module in _gated(backbone):
        found = vars(module).pop(GATE, None)
        if found is not None:
            found.remove()
