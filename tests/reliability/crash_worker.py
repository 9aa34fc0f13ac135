"""Driver for the crash-safety tests: saves adapters in forked children and kills them with SIGKILL.

Run as ``python crash_worker.py <workdir> <kills> <seed>``. The driver imports torch and peftkit once and forks a
child per kill, so forty kills cost one import. After each kill it copies the checkpoint directory, hidden files
included, to ``<part>/snapshots/<i>``; the test process then loads every snapshot through the public API. Nothing
is checked here: this process only produces the states a crash can leave.

Parts:
- ``save-loop``: a child saves versions v, v+1, ... of one adapter to one path as fast as it can; it is killed
  after a random delay, so the kills land anywhere inside ``save_pretrained``.
- ``crash-points``: child k is killed just before the k-th file-system call of one save (open, fsync, chmod,
  rename, unlink, the safetensors serialisation): every intermediate state, deterministically.
- ``trainer``: a ``PeftTrainer`` with ``save_steps=1`` re-trains into the same output directory and is killed.
- ``concurrent``: two children save two different adapters to one directory while this process reads it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable

import torch

# Version v of the test adapter: lora_alpha = v and every tensor drawn from a generator seeded with v, so a
# checkpoint's config says which weights it must hold, and a mix of two saves shows.
TARGETS = ["c_attn", "mlp.c_proj"]


def adapter_model(seed: int = 0) -> torch.nn.Module:
    from conftest import make_model

    from peftkit import LoraConfig, get_peft_model

    return get_peft_model(make_model("gpt2", seed=seed), LoraConfig(r=2, lora_alpha=1, target_modules=TARGETS))


def version_tensors(model: torch.nn.Module, version: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(version)
    live = model.get_adapter_state_dict("default")
    return {key: torch.randn(live[key].shape, generator=gen) for key in sorted(live)}


def set_version(model: torch.nn.Module, version: int) -> None:
    with torch.no_grad():
        live = model.get_adapter_state_dict("default", live=True)
        for key, tensor in version_tensors(model, version).items():
            live[key].copy_(tensor)
    model.peft_config["default"].lora_alpha = float(version)


def _fork(child: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:  # the child never returns into the driver's code
        code = 0
        try:
            child()
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    return pid


def _kill(pid: int) -> bool:
    """SIGKILL ``pid`` if it still runs; True when it was killed rather than done."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status)


def _wait_for(marker: str, timeout: float = 60.0) -> None:
    """Wait until a child has created ``marker`` (its first save is done), so kills land in its steady state."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(marker):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the child never wrote {marker}")
        time.sleep(0.002)
    os.unlink(marker)


def _unlink_marker(marker: str) -> None:
    if os.path.exists(marker):
        os.unlink(marker)


def _touch(marker: str) -> None:
    with open(marker, "w"):
        pass


def _snapshot(path: str, snapshots: str, index: int) -> None:
    target = os.path.join(snapshots, str(index))
    if os.path.isdir(path):
        shutil.copytree(path, target)
    else:
        os.makedirs(target)


def save_loop(workdir: str, kills: int, rng: random.Random) -> dict:
    model, path = adapter_model(), os.path.join(workdir, "adapter")
    snapshots, ready = os.path.join(workdir, "snapshots"), os.path.join(workdir, "ready")
    killed = 0
    for i in range(kills):
        def child(first: int = (i + 1) * 1_000_000) -> None:
            version = first
            while True:
                version += 1
                set_version(model, version)
                model.save_pretrained(path)
                if version == first + 1:
                    _touch(ready)

        pid = _fork(child)
        _wait_for(ready)
        time.sleep(rng.uniform(0.0, 0.03))
        killed += _kill(pid)
        _snapshot(path, snapshots, i)
    return {"kills": kills, "killed mid-run": killed}


class _KillAt:
    """Count calls of the wrapped file-system functions; SIGKILL this process just before call number ``at``."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def wrap(self, function: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            self.calls += 1
            if self.calls == self.at:
                os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)
        return wrapped


def crash_points(workdir: str) -> dict:
    from peftkit.core import checkpoint

    model, path = adapter_model(), os.path.join(workdir, "adapter")
    snapshots = os.path.join(workdir, "snapshots")
    set_version(model, 1)
    model.save_pretrained(path)  # version 1; point k then saves version k + 1 over what point k - 1 left
    points, at = [], 1
    while True:
        version = 1 + at

        def child(at: int = at, version: int = version) -> None:
            killer = _KillAt(at)
            for name in ("open", "replace", "fsync", "chmod", "unlink"):
                setattr(os, name, killer.wrap(getattr(os, name)))
            checkpoint.safetensors_bytes = killer.wrap(checkpoint.safetensors_bytes)
            set_version(model, version)
            model.save_pretrained(path)

        _, status = os.waitpid(_fork(child), 0)
        killed = os.WIFSIGNALED(status)
        _snapshot(path, snapshots, at)
        points.append({"at": at, "version": version, "killed": killed})
        if not killed:  # the save ran through: every call before its end has been a kill point
            break
        at += 1
    return {"points": points}


def trainer_kills(workdir: str, kills: int, rng: random.Random) -> dict:
    from conftest import SEQ, VOCAB
    from transformers import TrainerCallback, TrainingArguments

    from peftkit.integrations.trainer import PeftTrainer

    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": ids.clone()}
            for ids in torch.randint(3, VOCAB, (16, SEQ), generator=gen)]
    out = os.path.join(workdir, "out")
    args = TrainingArguments(output_dir=out, use_cpu=True, report_to=[], save_strategy="steps", save_steps=1,
                             max_steps=10_000, per_device_train_batch_size=4, learning_rate=1e-2, disable_tqdm=True,
                             dataloader_num_workers=0, seed=0, logging_strategy="no")
    snapshots, ready = os.path.join(workdir, "snapshots"), os.path.join(workdir, "ready")

    class FirstSave(TrainerCallback):
        def on_save(self, *args: object, **kwargs: object) -> None:
            if not os.path.exists(ready):
                _touch(ready)

    trainer = PeftTrainer(model=adapter_model(), args=args, train_dataset=rows, callbacks=[FirstSave()])
    for i in range(kills):
        pid = _fork(trainer.train)  # each run re-writes checkpoint-1, -2, ... over the previous run's
        _wait_for(ready)
        time.sleep(rng.uniform(0.0, 0.3))
        _kill(pid)
        _unlink_marker(ready)
        _snapshot(out, snapshots, i)
    return {"kills": kills}


def concurrent(workdir: str, rounds: int) -> dict:
    from peftkit import PeftModel

    path = os.path.join(workdir, "adapter")
    writers = []
    for version in (1, 2):
        def child(version: int = version) -> None:
            model = adapter_model()
            set_version(model, version)
            for _ in range(rounds):
                model.save_pretrained(path)

        writers.append(_fork(child))
    from conftest import make_model

    reads: list[str] = []
    reference = adapter_model()
    expected = {v: version_tensors(reference, v) for v in (1, 2)}
    running = set(writers)
    # Reads start once the first save is complete (its config, renamed last, exists; it is only ever replaced): before
    # that the directory is rightly empty, and on a loaded machine or under coverage the writers take seconds to build
    # their models, so a read there would report a missing checkpoint that no save promised yet.
    deadline = time.monotonic() + 120
    while not os.path.exists(os.path.join(path, "adapter_config.json")) and time.monotonic() < deadline:
        if any(os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) for pid in writers):
            break  # a writer ended (or failed) without a save: the reads below report it (WNOWAIT: not reaped yet)
        time.sleep(0.002)
    while running:
        running = {pid for pid in running if os.waitpid(pid, os.WNOHANG) == (0, 0)}
        try:
            loaded = PeftModel.from_pretrained(make_model("gpt2"), path)
        except Exception as exc:  # the test fails on any: report what it was
            reads.append(f"error {type(exc).__name__}: {exc}")
            continue
        version = int(loaded.peft_config["default"].lora_alpha)
        got = loaded.get_adapter_state_dict("default")
        same = version in expected and all(torch.equal(got[k], t) for k, t in expected[version].items())
        reads.append(f"version {version}" if same else f"mix: config of version {version}, other weights")
    return {"reads": reads}


def main(workdir: str, kills: int, seed: int) -> None:
    torch.set_num_threads(1)  # forking a process whose OpenMP pool has started can hang the child
    rng = random.Random(seed)
    summary = {}
    parts = {
        "save-loop": lambda d: save_loop(d, kills, rng),
        "crash-points": crash_points,
        "trainer": lambda d: trainer_kills(d, max(3, kills // 6), rng),
        "concurrent": lambda d: concurrent(d, rounds=kills),
    }
    for name, run in parts.items():
        directory = os.path.join(workdir, name)
        os.makedirs(directory)
        start = time.perf_counter()
        summary[name] = {**run(directory), "seconds": round(time.perf_counter() - start, 2)}
    with open(os.path.join(workdir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for conftest
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
