"""AdapterPool: every row of a mixed batch equals its adapter alone (forward, KV cache, greedy, beams, sampling),
slot LRU and pinning, the host cache's count and byte budget, bad adapters refused with the pool unchanged, Hub
ids through an offline cache, and no recompilation under ``torch.compile`` when adapters come and go.

References are ``PeftModel.from_pretrained(fresh base, directory)`` run on the whole batch (so padding and
positions are identical), rows picked afterwards; ``__base__`` rows against the plain base model.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import VOCAB, make_model
from huggingface_hub import constants
from integrations.test_hub import _commit, _put
from safetensors.torch import load_file, save_file

from peftkit import (
    AdapterNotFoundError,
    CheckpointError,
    IA3Config,
    LoraConfig,
    PeftConfigError,
    PeftModel,
    TargetModuleError,
    get_peft_model,
)
from peftkit.serving import BASE, AdapterInUseError, AdapterPool, LoraSlotLinear, PoolFullError

ATOL = 1e-5
GPT2_ALL = ["c_attn", "c_proj", "c_fc"]  # c_proj: attn.c_proj and mlp.c_proj


def _save(directory: Path, kind: str, seed: int, config) -> Path:
    model = get_peft_model(make_model(kind), config)  # make_model seeds itself: seed the adapter after it
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "ia3_" in name:
                param.normal_(0, 0.3)  # large enough that each adapter visibly changes the logits
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("pool")

    def lora(**kw) -> LoraConfig:
        return LoraConfig(task_type="CAUSAL_LM", **{"lora_alpha": 8, **kw})

    return SimpleNamespace(
        a=_save(root / "a", "gpt2", 1, lora(r=4, target_modules=GPT2_ALL)),
        b=_save(root / "b", "gpt2", 2, lora(r=2, use_rslora=True, target_modules=["c_attn"])),
        c=_save(root / "c", "gpt2", 3, lora(r=8, target_modules=["c_attn", "c_fc"], rank_pattern={"c_fc": 3},
                                            alpha_pattern={"c_attn": 4})),
        d=_save(root / "d", "gpt2", 4, lora(r=6, target_modules=["c_proj"], layers_to_transform=[1])),
        big=_save(root / "big", "gpt2", 5, lora(r=32, target_modules=["c_attn"])),
        ia3=_save(root / "ia3", "gpt2", 6, IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"])),
        llama=_save(root / "llama", "llama", 7, lora(r=4, target_modules=["q_proj", "v_proj"])),
        llama2=_save(root / "llama2", "llama", 8, lora(r=2, target_modules=["q_proj", "o_proj", "down_proj"])),
        root=root,
    )


def _pool(dirs: SimpleNamespace, names: str = "abc", kind: str = "gpt2", **kw) -> AdapterPool:
    pool = AdapterPool(make_model(kind), **{"max_lora_rank": 8, **kw})
    for name in names:
        pool.load_adapter(name, str(getattr(dirs, name)))
    return pool


def _batch(rows: int, seq: int = 7, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # one left-padded row: padding must route like any other row
    return ids, mask


def _reference(dirs: SimpleNamespace, name: str, kind: str = "gpt2") -> torch.nn.Module:
    return make_model(kind) if name == BASE else PeftModel.from_pretrained(make_model(kind), getattr(dirs, name))


def _rows(names: list[str], name: str) -> list[int]:
    return [i for i, n in enumerate(names) if n == name]


# ---- equality with each adapter alone --------------------------------------------------------------------------
@pytest.mark.parametrize("kind, names", [
    ("gpt2", ["a", BASE, "b", "c", "a", "b"]),  # Conv1D layers (fan_in_fan_out), rsLoRA, rank/alpha patterns
    ("llama", ["llama", BASE, "llama2", "llama"]),  # nn.Linear layers; adapters target different modules
])
def test_mixed_batch_rows_equal_each_adapter_alone(dirs, kind, names) -> None:
    pool = _pool(dirs, names=[n for n in dict.fromkeys(names) if n != BASE], kind=kind)
    ids, mask = _batch(len(names))
    out = pool.forward(input_ids=ids, attention_mask=mask, adapter_names=names)
    for name in dict.fromkeys(names):
        with torch.no_grad():
            ref = _reference(dirs, name, kind)(input_ids=ids, attention_mask=mask).logits
        rows = _rows(names, name)
        torch.testing.assert_close(out.logits[rows], ref[rows], rtol=ATOL, atol=ATOL, msg=name)
    torch.testing.assert_close(pool.forward(input_ids=ids, attention_mask=mask).logits,
                               _reference(dirs, BASE, kind)(input_ids=ids, attention_mask=mask).logits.detach(),
                               rtol=0, atol=0)  # no adapter_names: the base model, exactly


def test_forward_with_kv_cache_equals_the_full_sequence(dirs) -> None:
    pool, names = _pool(dirs), ["c", BASE, "a"]
    ids, mask = _batch(3, seq=9)
    full = pool.forward(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    first = pool.forward(input_ids=ids[:, :6], attention_mask=mask[:, :6], adapter_names=names, use_cache=True)
    rest = pool.forward(input_ids=ids[:, 6:], attention_mask=mask, adapter_names=names,
                        past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, rtol=ATOL, atol=ATOL)


@pytest.mark.parametrize("mode", [
    {"do_sample": False},
    {"do_sample": False, "num_beams": 2, "num_return_sequences": 2},  # generate repeats rows: each keeps its adapter
    {"do_sample": True, "top_k": 0, "temperature": 1.5},  # CPU multinomial draws each row from its own numbers
])
def test_generate_rows_equal_each_adapter_alone(dirs, mode) -> None:
    pool, names = _pool(dirs, names="ab"), ["b", "a", BASE, "a"]
    ids, mask = _batch(len(names), seq=5)
    kw = {"max_new_tokens": 6, "pad_token_id": 2, "eos_token_id": None, **mode}
    torch.manual_seed(0)
    out = pool.generate(ids, attention_mask=mask, adapter_names=names, **kw)
    per_row = mode.get("num_return_sequences", 1)
    for name in dict.fromkeys(names):
        model = _reference(dirs, name)  # building it draws random numbers: seed after
        torch.manual_seed(0)
        ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
        rows = [i * per_row + j for i in _rows(names, name) for j in range(per_row)]
        assert torch.equal(out[rows], ref[rows]), name
    assert len({tuple(r) for r in out[:, 5:].tolist()}) > 2  # the adapters really generate different text


# ---- slots: LRU, pinning, limits ---------------------------------------------------------------------------
def test_full_slots_evict_the_least_recently_used_adapter(dirs) -> None:
    pool = _pool(dirs, names="abc", max_loras=2)
    assert pool.resident_adapters == ["a", "b"]  # c is loaded (host cache) but has no slot yet
    ids, mask = _batch(2)
    with pool.rows(["b", BASE]):
        pass
    logits = pool.forward(input_ids=ids, attention_mask=mask, adapter_names=["c", "b"]).logits  # evicts a
    assert set(pool.resident_adapters) == {"b", "c"} and pool.stats()["slot_evictions"] == 1
    assert pool.stats()["loads_warm"] == 1  # c came from the host cache
    with torch.no_grad():
        ref = _reference(dirs, "c")(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits[0], ref[0], rtol=ATOL, atol=ATOL)
    with pool.rows(["b"]):
        pass
    pool.forward(input_ids=ids, attention_mask=mask, adapter_names=["a", "a"])  # evicts c, the least recent
    assert pool.resident_adapters == ["b", "a"] and pool.stats()["slot_evictions"] == 2


def test_pinned_adapters_stay_and_a_full_pool_raises(dirs) -> None:
    pool = _pool(dirs, names="abc", max_loras=2)
    ids, mask = _batch(2)
    with pool.rows(["a", "b"]):
        with pytest.raises(PoolFullError, match="running batches"):
            pool.forward(input_ids=ids, attention_mask=mask, adapter_names=["c", BASE])
        with pytest.raises(AdapterInUseError):
            pool.unload_adapter("a")
        with pytest.raises(AdapterInUseError):
            pool.load_adapter("b", str(dirs.c), replace=True)
        assert pool.resident_adapters == ["a", "b"] and pool.stats()["slots_pinned"] == 2
        loader = threading.Thread(target=pool.load_adapter, args=("d", str(dirs.d)))  # loads do not wait for batches
        loader.start()
        loader.join(timeout=30)
        assert "d" in pool and pool.resident_adapters == ["a", "b"]
    assert pool.stats()["slots_pinned"] == 0
    pool.forward(input_ids=ids, attention_mask=mask, adapter_names=["c", "d"])
    with pytest.raises(PoolFullError, match="max_loras=2"):
        pool.forward(input_ids=_batch(3)[0], adapter_names=["a", "b", "c"])


def test_host_cache_respects_its_count_and_byte_budget(dirs) -> None:
    sizes = {n: _pool(dirs, names=n).stats()["cpu_bytes"] for n in "abcd"}
    budget = sizes["a"] + sizes["c"]
    pool = AdapterPool(make_model("gpt2"), max_loras=1, max_lora_rank=8, max_cpu_loras=3, max_cpu_bytes=budget)
    ids, mask = _batch(2)
    seen = []
    for step, names in enumerate([["a"], ["b"], ["c"], ["d"], ["a"], ["c"], ["b"], ["d"]]):
        if names[0] not in pool:
            pool.load_adapter(names[0], str(getattr(dirs, names[0])))
        out = pool.forward(input_ids=ids, attention_mask=mask, adapter_names=names * 2).logits
        stats = pool.stats()
        assert stats["cpu_bytes"] <= budget and stats["cpu_entries"] <= 3, (step, stats)
        seen.append(stats["cpu_bytes"])
        with torch.no_grad():
            ref = _reference(dirs, names[0])(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(out, ref, rtol=ATOL, atol=ATOL)
    stats = pool.stats()
    assert stats["cpu_evictions"] > 0 and stats["loads_cold"] > 4  # evicted adapters came back from their files
    assert max(seen) > budget // 2  # the budget was used, not just respected


# ---- bad adapters ------------------------------------------------------------------------------------------
def _corrupt(dirs: SimpleNamespace) -> Path:
    bad = dirs.root / "corrupt"
    bad.mkdir(exist_ok=True)
    (bad / "adapter_config.json").write_text((dirs.a / "adapter_config.json").read_text())
    tensors = load_file(dirs.a / "adapter_model.safetensors")
    tensors[next(k for k in tensors if "lora_B" in k)] = torch.zeros(3, 3)
    save_file(tensors, bad / "adapter_model.safetensors")
    return bad


def _truncated(dirs: SimpleNamespace) -> Path:
    """Adapter a without the pair of one module its config targets."""
    bad = dirs.root / "truncated"
    bad.mkdir(exist_ok=True)
    (bad / "adapter_config.json").write_text((dirs.a / "adapter_config.json").read_text())
    tensors = load_file(dirs.a / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".h.1.mlp.c_fc." not in k}, bad / "adapter_model.safetensors")
    return bad


def _other_width(dirs: SimpleNamespace) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=48, n_head=2, vocab_size=VOCAB, n_positions=64))
    directory = dirs.root / "other-width"
    get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"])).save_pretrained(directory)
    return directory


def _dora(dirs: SimpleNamespace) -> Path:
    """A DoRA adapter: its magnitude vector rescales whole output rows, which no slot pair can hold."""
    return _save(dirs.root / "dora", "gpt2", 9, LoraConfig(r=4, target_modules=["c_attn"], use_dora=True))


@pytest.mark.parametrize("case, error, match", [
    ("other_width", CheckpointError, "need"),  # same module names, other shapes
    ("llama", CheckpointError, "no such module"),  # another architecture
    ("ia3", PeftConfigError, "LoRA adapters only"),
    ("big", PeftConfigError, "max_lora_rank=8"),
    ("corrupt", CheckpointError, "lora_B"),
    ("truncated", CheckpointError, r"have no weights: transformer\.h\.1\.mlp\.c_fc"),
    ("missing", PeftConfigError, "adapter_config.json"),
    ("dora", PeftConfigError, "use_dora=True: DoRA"),
])
def test_bad_adapter_raises_and_leaves_the_pool_unchanged(dirs, case, error, match) -> None:
    source = {"other_width": _other_width, "corrupt": _corrupt, "truncated": _truncated, "dora": _dora}.get(case)
    path = source(dirs) if source else getattr(dirs, case, dirs.root / "does-not-exist")
    pool = _pool(dirs, names="ab", max_loras=2)
    ids, mask = _batch(2)
    before = (pool.adapters, pool.resident_adapters, pool.stats(), [n for n, _ in pool.base_model.named_modules()])
    logits = pool.forward(input_ids=ids, attention_mask=mask, adapter_names=["a", "b"]).logits
    for name, replace in (("new", False), ("a", True)):
        with pytest.raises(error, match=match):
            pool.load_adapter(name, str(path), replace=replace)
    after = (pool.adapters, pool.resident_adapters, pool.stats(), [n for n, _ in pool.base_model.named_modules()])
    assert after == before
    torch.testing.assert_close(pool.forward(input_ids=ids, attention_mask=mask, adapter_names=["a", "b"]).logits,
                               logits, rtol=0, atol=0)


def test_names_errors_and_replace(dirs) -> None:
    pool = _pool(dirs, names="ab")
    ids, mask = _batch(2)
    with pytest.raises(AdapterNotFoundError, match=r"'zzz'.*\['a', 'b'\]"):
        pool.forward(input_ids=ids, adapter_names=["a", "zzz"])
    with pytest.raises(ValueError, match="already loaded"):
        pool.load_adapter("a", str(dirs.c))
    with pytest.raises(ValueError, match="one name per row"):
        pool.forward(input_ids=ids, adapter_names=["a"])
    with pytest.raises(TypeError, match="does not accept the keyword argument 'use_auth_token'"):
        pool.load_adapter("x", str(dirs.c), use_auth_token="t")
    pool.load_adapter("a", str(dirs.c), replace=True)  # c's weights, in a's slot
    with torch.no_grad():
        ref = _reference(dirs, "c")(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(pool.forward(input_ids=ids, attention_mask=mask, adapter_names=["a", "a"]).logits, ref,
                               rtol=ATOL, atol=ATOL)
    pool.unload_adapter("b")
    assert pool.adapters == ["a"] and "b" not in pool and pool.stats()["slots_free"] == 7


def test_half_precision_base_keeps_its_dtype(dirs) -> None:
    pool = _pool(dirs, names=["llama"], kind="llama")
    ids, mask = _batch(2)
    ref = pool.forward(input_ids=ids, attention_mask=mask, adapter_names=["llama", BASE]).logits
    half = AdapterPool(make_model("llama").to(torch.bfloat16), max_lora_rank=8)
    half.load_adapter("llama", str(dirs.llama))
    assert next(m for m in half.base_model.modules() if isinstance(m, LoraSlotLinear)).lora_B.dtype == torch.bfloat16
    out = half.forward(input_ids=ids, attention_mask=mask, adapter_names=["llama", BASE]).logits
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


def test_constructor_checks(dirs) -> None:
    with pytest.raises(ValueError, match="already holds adapter layers"):
        AdapterPool(PeftModel.from_pretrained(make_model("gpt2"), dirs.a))
    with pytest.raises(TargetModuleError, match="nn.Linear and Conv1D"):
        AdapterPool(make_model("gpt2"), target_modules=["wte"])
    with pytest.raises(ValueError, match="max_loras"):
        AdapterPool(make_model("gpt2"), max_loras=0)


def test_unload_puts_the_original_modules_back(dirs) -> None:
    model = make_model("gpt2")
    modules, keys = dict(model.named_modules()), list(model.state_dict())
    pool = AdapterPool(model, max_lora_rank=8, target_modules=GPT2_ALL)
    pool.load_adapter("a", str(dirs.a))
    assert sum(isinstance(m, LoraSlotLinear) for m in model.modules()) == 8
    assert list(model.state_dict()) != keys  # wrapped: the base weights sit under base_layer
    restored = pool.unload()
    assert restored is model and dict(model.named_modules()) == modules and list(model.state_dict()) == keys
    ids, mask = _batch(2)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, make_model("gpt2")(input_ids=ids).logits,
                                   rtol=0, atol=0)
    assert pool.adapters == [] and pool.stats()["slots_free"] == pool.max_loras


# ---- Hub ids ---------------------------------------------------------------------------------------------------
def test_load_adapter_from_a_hub_id_offline(dirs, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    _put(cache, "user/pool-adapter", dirs.a, _commit("pool-a"), ["main"])
    _put(cache, "user/pool-adapter", dirs.c, _commit("pool-c"), ["v2"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    pool = AdapterPool(make_model("gpt2"), max_lora_rank=8)
    pool.load_adapter("main", "user/pool-adapter")
    pool.load_adapter("v2", "user/pool-adapter", revision="v2")
    ids, mask = _batch(2)
    out = pool.forward(input_ids=ids, attention_mask=mask, adapter_names=["main", "v2"]).logits
    for row, name in enumerate("ac"):
        with torch.no_grad():
            ref = _reference(dirs, name)(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(out[row], ref[row], rtol=ATOL, atol=ATOL)
    with pytest.raises(PeftConfigError, match="downloading is off"):
        pool.load_adapter("absent", "user/not-cached")
    assert pool.adapters == ["main", "v2"]


# ---- torch.compile ---------------------------------------------------------------------------------------------
class _CountingBackend:
    """Counts the graphs Dynamo compiles and runs them eagerly (fast: no code generation)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        self.graphs += 1
        return gm.forward


def test_load_unload_replace_do_not_recompile(dirs) -> None:
    torch._dynamo.reset()
    try:
        pool = AdapterPool(make_model("gpt2"), max_loras=2, max_lora_rank=8, target_modules=GPT2_ALL)
        backend = _CountingBackend()
        compiled = torch.compile(pool.base_model, backend=backend)
        ids, mask = _batch(3)

        def check(names: list[str], expected: dict[str, str]) -> None:
            with torch.no_grad(), pool.rows(names):
                out = compiled(input_ids=ids, attention_mask=mask).logits
            for name, source in expected.items():
                with torch.no_grad():
                    ref = _reference(dirs, source)(input_ids=ids, attention_mask=mask).logits
                rows = _rows(names, name)
                torch.testing.assert_close(out[rows], ref[rows], rtol=ATOL, atol=ATOL, msg=name)

        pool.load_adapter("x", str(dirs.a))
        check(["x", BASE, "x"], {"x": "a", BASE: BASE})
        assert backend.graphs == 1
        pool.load_adapter("y", str(dirs.b))  # into the free slot
        check(["y", "x", BASE], {"x": "a", "y": "b", BASE: BASE})
        pool.load_adapter("x", str(dirs.c), replace=True)  # new weights and rank, same slot
        check(["x", "y", "x"], {"x": "c", "y": "b"})
        pool.unload_adapter("y")
        pool.load_adapter("z", str(dirs.d))
        pool.load_adapter("w", str(dirs.a))  # no free slot: evicts on use
        check(["w", "z", "w"], {"w": "a", "z": "d"})
        assert pool.stats()["slot_evictions"] == 1
        assert backend.graphs == 1, f"{backend.graphs} graphs: loading adapters recompiled the model"
    finally:
        torch._dynamo.reset()
