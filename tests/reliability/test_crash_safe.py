"""Crash-safe and concurrent saves: a process killed with SIGKILL anywhere in ``save_pretrained`` (or in
``PeftTrainer``'s checkpointing) leaves at that path the previous checkpoint or the new one, whole; two writers of
different adapters to one directory never leave (or let a reader see) the config of one with the weights of the
other. The kills happen in ``crash_worker.py``; every state they left is loaded here through the public API.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import make_model

from peftkit import CheckpointError, PeftModel
from peftkit.core.config import CONFIG_NAME

from .conftest import PROFILE, scaled, tally
from .crash_worker import adapter_model, set_version, version_tensors

WEIGHTS = "adapter_model.safetensors"
PENDING = {f".{CONFIG_NAME}.pending", f".{WEIGHTS}.pending"}
WORKER = Path(__file__).with_name("crash_worker.py")

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills forked children (POSIX only)")


@pytest.fixture(scope="module")
def crashes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the kill driver once for the module: ``<run>/<part>/snapshots/<i>`` and ``summary.json``."""
    run = tmp_path_factory.mktemp("crashes") / "run"
    seed = 0 if PROFILE == "reliability" else random.SystemRandom().randrange(2**32)
    done = subprocess.run([sys.executable, str(WORKER), str(run), str(scaled(40)), str(seed)],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"driver failed (seed {seed}):\n{done.stderr[-4000:]}"
    return run


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _snapshots(part: Path) -> list[Path]:
    return sorted((part / "snapshots").iterdir(), key=lambda p: int(p.name))


@functools.cache
def _reference() -> torch.nn.Module:
    return adapter_model()


def load_version(directory: Path) -> int:
    """Load the checkpoint as a user would and return its version, after checking that its weights are exactly
    those of the version its config names (a mix of two saves fails here)."""
    loaded = PeftModel.from_pretrained(make_model("gpt2"), directory)
    version = int(loaded.peft_config["default"].lora_alpha)
    got = loaded.get_adapter_state_dict("default")
    for key, tensor in version_tensors(_reference(), version).items():
        assert torch.equal(got[key], tensor), f"{directory}: config of version {version}, other weights in {key}"
    return version


def test_kill_during_save_loop_leaves_the_previous_or_the_new_checkpoint(crashes: Path) -> None:
    part = crashes / "save-loop"
    previous = 0
    for snapshot in _snapshots(part):
        child = int(snapshot.name) + 1  # child i saves versions i·10⁶ + 1, + 2, ...; its first save completed
        version = load_version(snapshot)
        assert version >= previous, f"kill {snapshot.name}: back to version {version} after {previous}"
        assert child * 1_000_000 < version < (child + 1) * 1_000_000, f"kill {snapshot.name}: version {version}"
        # Leftovers of a killed save are the fixed pending names, replaced by the next save: they never pile up.
        assert set(os.listdir(snapshot)) <= {CONFIG_NAME, WEIGHTS, *PENDING}
        interrupted = f".{CONFIG_NAME}.pending" in os.listdir(snapshot)
        tally("kills during save_pretrained", "left a pending config" if interrupted else "left a plain pair")
        previous = version
    assert _summary(crashes)["save-loop"]["killed mid-run"] == scaled(40)


def test_kill_at_every_file_system_call_of_a_save_leaves_the_previous_or_the_new_checkpoint(crashes: Path) -> None:
    part = crashes / "crash-points"
    points = _summary(crashes)["crash-points"]["points"]
    previous, interrupted_renames = 1, 0
    for point in points:
        snapshot = part / "snapshots" / str(point["at"])
        version = load_version(snapshot)
        assert version in (previous, point["version"]), f"kill before call {point['at']}: version {version}"
        files = set(os.listdir(snapshot))
        # Killed between the two renames: new weights, old config and the pending config; loading took the new.
        interrupted_renames += f".{CONFIG_NAME}.pending" in files and version == point["version"]
        previous = version
        tally("kill points in one save", "new checkpoint" if version == point["version"] else "previous checkpoint")
    assert not points[-1]["killed"] and previous == points[-1]["version"], "the last point must run through"
    assert len(points) >= 8, "a save makes at least this many file-system calls; were they intercepted?"
    assert interrupted_renames, "no kill point fell between the two renames: the recovery path went untested"


def test_kill_during_trainer_checkpointing_leaves_every_checkpoint_loadable(crashes: Path) -> None:
    checked = 0
    for snapshot in _snapshots(crashes / "trainer"):
        for checkpoint in sorted(snapshot.iterdir()):
            files = set(os.listdir(checkpoint))
            if not files & {WEIGHTS, CONFIG_NAME}:  # killed before this checkpoint's adapter was written
                tally("kills during PeftTrainer checkpointing", "checkpoint not yet written")
                continue
            loaded = PeftModel.from_pretrained(make_model("gpt2"), checkpoint)  # raises on a damaged or mixed pair
            assert all(torch.isfinite(t).all() for t in loaded.get_adapter_state_dict("default").values())
            checked += 1
            tally("kills during PeftTrainer checkpointing", "checkpoint loaded")
    assert checked


def test_two_processes_saving_different_adapters_to_one_directory_never_mix(crashes: Path) -> None:
    reads = _summary(crashes)["concurrent"]["reads"]
    assert reads, "the reader saw no checkpoint while the writers ran"
    assert all(r in ("version 1", "version 2") for r in reads), [r for r in reads if not r.startswith("version")]
    assert load_version(crashes / "concurrent" / "adapter") in (1, 2)
    tally("concurrent saves (processes)", "reads while writing", len(reads))


def test_two_threads_saving_different_adapters_to_one_directory_never_mix(tmp_path: Path, monkeypatch) -> None:
    directory, rounds = tmp_path / "adapter", scaled(15)
    errors: list[BaseException] = []
    replace = os.replace

    def descheduled_after_weights(source: str, target: str) -> None:
        # Threads under the GIL rarely switch between two renames; a writer descheduled right after renaming its
        # weights is what lets another writer interleave (without the lock, a third of the reads see a mix).
        replace(source, target)
        if str(target).endswith(WEIGHTS):
            time.sleep(0.003)

    monkeypatch.setattr(os, "replace", descheduled_after_weights)

    def writer(version: int) -> None:
        try:
            model = adapter_model()
            set_version(model, version)
            for _ in range(rounds):
                model.save_pretrained(directory)
        except BaseException as exc:  # a failure in a thread must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(v,)) for v in (1, 2)]
    for thread in threads:
        thread.start()
    reads = 0
    while any(t.is_alive() for t in threads):
        if (directory / WEIGHTS).exists():
            assert load_version(directory) in (1, 2)
            reads += 1
        time.sleep(0.001)
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert load_version(directory) in (1, 2)
    tally("concurrent saves (threads)", "reads while writing", reads)


def test_config_and_weights_of_two_saves_are_refused_as_a_pair(tmp_path: Path) -> None:
    # What a writer without the lock (or a copy of files from two places) leaves: loading names the mismatch
    # instead of running the weights of one adapter with the other's scale.
    for version in (1, 2):
        model = adapter_model()
        set_version(model, version)
        model.save_pretrained(tmp_path / str(version))
    shutil.copy(tmp_path / "2" / CONFIG_NAME, tmp_path / "1" / CONFIG_NAME)
    base = make_model("gpt2")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"adapter_config.json does not belong to these weights \(lora_alpha: "
                                              r"2.0 in adapter_config.json, 1.0 saved with the weights\)"):
        PeftModel.from_pretrained(base, tmp_path / "1")
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    # Passing the config on purpose is the way to pair them anyway.
    forced = PeftModel.from_pretrained(make_model("gpt2"), tmp_path / "1",
                                       config=PeftModel.from_pretrained(make_model("gpt2"), tmp_path / "2")
                                       .peft_config["default"])
    assert forced.peft_config["default"].lora_alpha == 2.0


def test_bookkeeping_edits_of_the_config_still_load(tmp_path: Path) -> None:
    model = adapter_model()
    set_version(model, 3)
    model.save_pretrained(tmp_path)
    path = tmp_path / CONFIG_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), "base_model_name_or_path": "elsewhere/gpt2",
                                "inference_mode": False}, indent=4))
    assert load_version(tmp_path) == 3
