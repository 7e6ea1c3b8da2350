"""Deltas under FSDP (2 CPU processes, gloo): sharded training equals one process's, the saved delta reloads.

One torchrun launch of tests/fsdp_train.py runs every case (FSDP2 `fully_shard` per block then the root, and
FSDP1 with use_orig_params=True); each process feeds its half of the batch, so the sharded run equals the
one-process run on the whole batch only if the deltas' gradients are averaged across the processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def _fsdp_missing() -> str | None:
    if sys.platform != "linux":
        return "gloo on CPU is tested on Linux"
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        return "this torch has no gloo backend"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return "this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)"
    return None


pytestmark = pytest.mark.skipif(_fsdp_missing() is not None, reason=str(_fsdp_missing()))


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("fsdp") / "results.json"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent / "src")}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        str(HERE / "fsdp_train.py"),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert not data["errors"], "\n".join(data["errors"])
    return data


def test_sharded_training_equals_one_process(results: dict) -> None:
    cases = {r["case"]: r for r in results["train"]}
    assert len(cases) == 18  # 14 FSDP2 (LoRA, DoRA, adapter, prefix, prompt, BitFit, IA3, LoRA+prompt), 4 FSDP1
    for case, r in cases.items():
        assert r["missing"] == [], case  # the gathered state dict holds every delta (and head) tensor
        assert r["loss"] < 1e-5, case
        assert r["state"] < 5e-5, case  # measured <= 5.1e-6, prefix 2.1e-5 (its MLP), after 3 AdamW steps
        assert r["moved"] > 1e-5, case  # every tensor trained...
        assert r["own_half"] > 1e-2, case  # ...on both halves: the gradients were averaged across processes


def test_bitfit_added_biases_train_under_fsdp2(results: dict) -> None:
    """Llama has no biases, so BitFit adds them; their hook held the first Parameter object, which FSDP2 swaps
    for its shards: they never trained (state 3.0e-2 off, loss 3.4e-2) until the hook read them at each call."""
    r = next(r for r in results["train"] if r["case"] == "fsdp2 llama bitfit")
    assert r["state"] < 1e-5 and r["loss"] < 1e-5


def test_saving_gathers_and_reloads_unsharded(results: dict) -> None:
    saves = {r["case"]: r for r in results["save"]}
    assert set(saves) == {"fsdp2 bert lora+prompt", "fsdp2 llama bitfit", "fsdp1 bert lora"}
    assert saves["fsdp2 bert lora+prompt"]["saved"] == ["default", "deltatune_model.json", "prompt"]
    for case, r in saves.items():
        assert r["reloaded"] < 1e-5, case  # a fresh unsharded model with the saved delta: the trained outputs
        assert r["sharded_eval"] < 1e-5, case


def test_calls_that_need_whole_tensors_are_refused_while_sharded(results: dict) -> None:
    for r in results["save"]:
        refused = r["refused"]
        assert all(v.startswith("DeltaError: ") and "\n" not in v for v in refused.values()), refused
        assert "sharded by FSDP" in refused["merge"] and "merge after training" in refused["merge"]
        if r["case"].startswith("fsdp2"):
            for call in ("save_delta", "save_pretrained"):
                assert "is_main_process=<rank == 0>) on every process" in refused[call]
        else:
            assert "summon_full_params" in refused["save_delta"] and "summon_full_params" in refused["save_pretrained"]


def test_deltas_left_outside_fsdp_or_ddp_are_refused(results: dict) -> None:
    """DDP around the backbone (`accelerator.prepare(model)` with the model deltas were attached to) averaged the
    head's gradients and none of the deltas'. `fully_shard(dm.backbone)` (or FSDP1 around the backbone) leaves the deltas as plain tensors on each
    process: nothing averaged their gradients and each process trained its own delta, without an error."""
    ddp = results["outside"].pop("ddp")
    assert ddp.startswith("DeltaError: DistributedDataParallel wraps the backbone, not the DeltaModel"), ddp
    assert "accelerator.prepare(dm)" in ddp
    for variant, refused in results["outside"].items():
        assert refused.startswith("DeltaError: delta 'default' is outside FSDP"), (variant, refused)
        assert "fully_shard(dm)" in refused and "\n" not in refused


def test_a_delta_added_after_sharding_or_ddp_is_refused(results: dict) -> None:
    """FSDP registers the tensors when it wraps the model: LoRA added after `fully_shard(dm)` trained per process,
    without an error (prompt tuning failed in torch's DTensor dispatch); the same after DistributedDataParallel."""
    ddp = results["added_after"].pop("ddp")
    assert ddp.startswith("DeltaError: delta 'late' was added after DistributedDataParallel wrapped the model"), ddp
    for variant, refused in results["added_after"].items():
        assert refused.startswith("DeltaError: cannot add 'late': the model is already sharded by FSDP"), variant
        assert "attach every delta first, then shard" in refused
