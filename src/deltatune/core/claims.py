"""Which deltas may act together: on one parameter at once, or on one row of a mixed batch.

Two deltas that reparametrize the same parameter may both be attached (to be served on different
rows or switched), but not enabled together, and two that change one module's weights cannot be
recomputed together for a shared row. These rules read only what each delta's hooks claimed.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping

from torch import nn

from .delta import Delta, DeltaError
from .routing import RoutingError


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
