"""Which deltas may act together: on one parameter at once, or on one row of a mixed batch.

Two deltas that reparametrize the same parameter may both be attached (to be served on different
rows or switched), but not enabled together, and two that change one module's weights cannot be
recomputed together for a shared row. These rules read what each delta's hooks claimed; a mixed
batch also needs every delta unmerged and, where it gets only some rows, a method that can route.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping

import torch
from torch import nn

from .delta import Delta, DeltaError
from .routing import Route, RoutingError, routes_for


def _overlap(
    deltas: Mapping[str, Delta], names: Iterable[str], key: Callable[[nn.Module, str], Hashable]
) -> tuple | None:
    """The first two of `names` that reparametrize the same `key(module, param)`, or None."""
    owner: dict[Hashable, str] = {}
    for n in names:
        hooks = deltas[n]._hooks
        for module, pname in hooks.claimed() if hooks is not None else []:
            other = owner.setdefault(key(module, pname), n)
            if other != n:
                return other, n, module, pname
    return None


def check_claims(deltas: Mapping[str, Delta], names: set[str]) -> None:
    """Deltas reparametrizing one parameter may be attached together but not enabled together."""
    clash = _overlap(deltas, sorted(names), lambda module, pname: (id(module), pname))
    if clash is not None:
        other, n, module, pname = clash
        raise DeltaError(
            f"deltas {other!r} and {n!r} both reparametrize {pname!r} of a {type(module).__name__} "
            "and cannot be enabled together; enable one at a time or serve them as separate rows"
        )


def check_shared_rows(deltas: Mapping[str, Delta], combos: set[tuple[str, ...]]) -> None:
    """Two deltas that both reparametrize one module cannot be recomputed together for a shared row."""
    for combo in combos:
        clash = _overlap(deltas, combo, lambda module, pname: id(module))
        if clash is not None:
            other, n, module, _ = clash
            raise RoutingError(
                f"deltas {other!r} and {n!r} both change the weights of one {type(module).__name__} "
                "and cannot share a row of a mixed batch; serve that combination unmixed"
            )


def check_routes(deltas: Mapping[str, Delta], rows: list[tuple[str, ...]], device: torch.device) -> dict[str, Route]:
    """Each delta's rows of a mixed batch (row i wants the deltas `rows[i]`), once the deltas can serve it as asked."""
    merged = [n for n, d in deltas.items() if d.merged]
    if merged:
        raise RoutingError(
            f"delta(s) {', '.join(merged)} are merged into the weights and would act on every row; "
            "unmerge them before serving a mixed batch"
        )
    routes = routes_for(rows, list(deltas), device)
    for n, delta in deltas.items():
        route = routes[n]
        if not (route.empty or route.full) and not type(delta.config).routable:
            raise RoutingError(
                f"delta {n!r} ({delta.config.method}) cannot act on only some rows of a batch; "
                "give every row this delta, or serve its rows in a batch of their own"
            )
    check_shared_rows(deltas, {row for row in rows if len(row) > 1})
    for kind in dict.fromkeys(type(d) for d in deltas.values()):  # each class once, in attach order
        kind.check_rows([(d, routes[n]) for n, d in deltas.items() if type(d) is kind])
    return routes
