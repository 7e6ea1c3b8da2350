"""What is wrong while a delta is merged, and malformed delta_ids or state dicts: refused before anything
changes. docs/errors.md lists them (the hardening suite: state).
"""

from __future__ import annotations

import pytest
import torch
from errors_helpers import _no_trace, _perturbed
from tiny import make_inputs, make_model, same_state, state

import deltatune as dt
from deltatune.core.routing import RoutingError


def _two(method: str = "lora") -> dt.DeltaModel:
    dm = dt.DeltaModel(make_model("bert"))
    dm.add("a", dt.METHODS[method]())
    dm.add("b", dt.METHODS[method](targets=("attn.k",)))
    _perturbed(dm, "a")
    _perturbed(dm, "b", seed=1)
    return dm


def test_training_while_merged_is_refused() -> None:
    dm = _two()
    dm.merge("a")
    dm.train()
    inputs = make_inputs(dm.backbone)
    with pytest.raises(dt.DeltaError, match=r"merged into the weights, so training would not reach them; unmerge"):
        dm(**inputs).loss.backward()
    dm.eval()
    with torch.no_grad():
        dm(**inputs)  # inference on the merged model is fine


def test_loading_tensors_into_a_merged_delta_is_refused() -> None:
    dm = _two()
    dm.merge("a")
    before = state(dm)
    new = {k: torch.zeros_like(v) for k, v in dm.delta_state_dict("a").items()}
    with pytest.raises(dt.DeltaError, match=r"cannot load tensors into 'a'.*unmerge them first \(dm\.unmerge\('a'\)\)"):
        dm.load_delta_state_dict("a", new)
    with pytest.raises(dt.DeltaError, match="unmerge it before loading other tensors"):
        dm.delta("a").load_state_dict(new)
    assert same_state(before, state(dm))


def test_disabling_or_switching_off_a_merged_delta_is_refused() -> None:
    dm = _two()
    dm.merge("a")
    with pytest.raises(dt.DeltaError, match=r"cannot disable 'a'.*unmerge them first"):
        dm.disable("a")
    with pytest.raises(dt.DeltaError, match="cannot switch deltas"):
        dm.set_active(["b"])
    assert dm.delta("a").enabled and dm.delta("b").enabled


@pytest.mark.parametrize("name", ["a", "b", None])
def test_detach_with_a_merged_delta_is_all_or_nothing(name: str | None) -> None:
    dm = _two()
    dm.merge("a")
    before = state(dm.backbone)
    fix = "unmerge this delta before removing it" if name != "b" else "unmerge a before removing any delta"
    with pytest.raises(dt.DeltaError, match=rf"delta\(s\) a are merged into the weights; {fix}"):
        dm.detach(name)
    assert list(dm.deltas) == ["a", "b"] and same_state(before, state(dm.backbone))
    dm.unmerge("a")
    assert _no_trace(dm.detach())


def test_a_head_key_naming_a_backbone_weight_cannot_be_loaded_through_the_api() -> None:
    dm = _two()
    before = state(dm.backbone)
    bad = {**dm.delta_state_dict("a"), "__head__.bert.pooler.dense.weight": torch.zeros(32, 32)}
    with pytest.raises(dt.DeltaError, match="is not a task head parameter of this model"):
        dm.load_delta_state_dict("a", bad)
    assert same_state(before, state(dm.backbone))


@pytest.mark.parametrize(
    "ids,error,match",
    [
        ("ab", RoutingError, r"delta_ids must be a list with one entry per row .* got str 'ab'"),
        (["a", "b"], RoutingError, "delta_ids has 2 entries for a batch of 4 rows; pass one delta id per row"),
        (["a", "b", "a", None, "b"], RoutingError, "5 entries for a batch of 4 rows"),
        (["a", ["b", "b"], None, None], RoutingError, r"delta_ids\[1\] names a delta twice"),
        (["a", 3, None, None], RoutingError, r"delta_ids\[1\] must be a delta name"),
        ({"a": 0}, RoutingError, "must be a list with one entry per row"),
        (torch.zeros(4), RoutingError, "must be a list with one entry per row"),
        (["a", "zz", None, None], KeyError, "no delta named 'zz'; attached deltas: a, b"),
        ([], RoutingError, "delta_ids is empty"),
    ],
    ids=lambda v: str(v)[:20],
)
def test_bad_delta_ids_are_refused(ids, error: type, match: str) -> None:  # noqa: ANN001
    dm = _two()
    dm.set_active([])
    inputs = {k: v for k, v in make_inputs(dm.backbone, batch=4).items() if k != "labels"}
    with pytest.raises(error, match=match), torch.no_grad():
        dm(**inputs, delta_ids=ids)
    assert all(d.route is None for d in dm.deltas.values())


# -- found by the session-6 probe ----------------------------------------------------------------
# An independent probe (/work/probe14 in the session that wrote these) tried 200+ bad inputs; each case
# below is one it found accepted silently, crashing, or unclear, now refused in one line.


def test_load_delta_state_dict_names_stray_keys_and_shapes_in_one_line() -> None:
    dm = dt.attach(make_model("bert"), dt.METHODS["lora"]())
    own = dict(dm.delta_state_dict())
    before = {k: v.clone() for k, v in own.items()}
    with pytest.raises(dt.DeltaError, match=r"unexpected keys \['bert\.embeddings\.word_embeddings\.weight'\]"):
        dm.load_delta_state_dict("default", {**own, "bert.embeddings.word_embeddings.weight": torch.zeros(100, 32)})
    with pytest.raises(dt.DeltaError, match=r"shape \(3, 3\) for .*, here \(8, 32\)"):
        dm.load_delta_state_dict("default", {k: torch.zeros(3, 3) for k in own})
    assert all(torch.equal(before[k], v) for k, v in dm.delta_state_dict().items())
