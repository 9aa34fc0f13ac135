"""Default ``target_modules`` when a config names none: Hugging Face peft's tables, then the module tree.

The tables are facts about architectures, keyed on transformers' ``config.model_type``. They hold every entry of
HF peft's ``utils/constants.py`` (0.21) for the methods peftkit shares with it, so a config without targets wraps
the same modules in both libraries, plus a few model types peftkit knew before HF did. Stale or foreign names in a
list are harmless: a target list only needs one entry to match (see :func:`peftkit.core.targets.match_targets`).

For a model type no table knows (a custom model, an architecture released after the table) the defaults are
derived from the module tree, so ``LoraConfig(task_type=...)`` alone works on it:

1. attention blocks: the innermost modules whose class or attribute name says attention (``LlamaAttention``,
   ``self_attn``, ``SelfAttention``, ``linear_attn``, ...) and that hold linear layers;
2. the role of each of their linears: by name first (``q_proj``/``query``/``q``/``Wq``/``q_lin``/``to_q``; fused
   ``c_attn``/``qkv_proj``/``query_key_value``/``Wqkv``; ``kv``), else by shape and position: the output projection
   writes the width the block reads (the last such linear); of three input projections the query is the one whose
   width differs from the other two (grouped-query attention), else the first, and the value the last;
3. each layer's feed-forward down projection: a linear outside attention that writes that width from the width
   an earlier one (the up projection) writes; of such pairs the widest, which is the FFN and not a side projection.

Derived names are written as dotted suffixes (``["q_proj", "v_proj"]``) when those select exactly the derived
modules, else as one regex over the full names (layer indices as ``\\d+``), else as the full names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from peftkit.core.layer import base_layer_of
from peftkit.core.targets import ALL_LINEAR, candidate_modules, is_linear_like
from peftkit.integrations.transformers import model_type

__all__ = [
    "ADALORA_TARGETS", "IA3_FEEDFORWARD", "IA3_TARGETS", "LORA_TARGETS", "AttentionBlock", "attention_blocks",
    "default_targets", "derive_key_value_feedforward", "derive_placements", "derive_query_value",
    "describe_candidates", "feedforward_entries", "table_entry",
]

Targets = list[str] | str

# ---- tables (HF peft's TRANSFORMERS_MODELS_TO_*_TARGET_MODULES_MAPPING) -------------------------------------------
_QV, _QUERY_VALUE = ["q_proj", "v_proj"], ["query", "value"]
_GEMMA4 = r".*language_model\..*\.(q_proj|v_proj)"  # Gemma 4 is multimodal; HF adapts its language model only
_NEMOTRON_H = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Query and value projections: the LoRA paper (Sec. 7.1) finds Wq+Wv as good as all four projections.
LORA_TARGETS: dict[str, Targets] = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": _QV, "gpt2": ["c_attn"], "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"], "opt": _QV, "gptj": _QV, "gpt_neox": ["query_key_value"],
    "gpt_neo": _QV, "bert": _QUERY_VALUE, "roberta": _QUERY_VALUE, "xlm-roberta": _QUERY_VALUE,
    "electra": _QUERY_VALUE, "deberta-v2": ["query_proj", "value_proj"], "deberta": ["in_proj"],
    "layoutlm": _QUERY_VALUE, "llama": _QV, "llama4": _QV, "chatglm": ["query_key_value"], "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"], "RefinedWebModel": ["query_key_value"], "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"], "btlm": ["c_proj", "c_attn"], "codegen": ["qkv_proj"], "mistral": _QV,
    "mixtral": _QV, "stablelm": _QV, "phi": ["q_proj", "v_proj", "fc1", "fc2"], "gemma": _QV, "gemma2": _QV,
    "gemma3_text": _QV, "gemma4": _GEMMA4, "qwen2": _QV, "qwen3": _QV, "nemotron_h": _NEMOTRON_H,
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
    # peftkit's own entries (HF derives nothing for these; the module tree would give the same names). ViT's
    # projections are q_proj/v_proj from transformers 5 on, query/value before.
    "albert": _QUERY_VALUE, "distilbert": ["q_lin", "v_lin"], "vit": ["query", "value", "q_proj", "v_proj"],
    "phi3": ["qkv_proj"], "whisper": _QV,
}
# Keys (or the fused projection), values and the FFN down projection, whose input (the FFN activation) is scaled.
IA3_TARGETS: dict[str, Targets] = {
    "t5": ["k", "v", "wo"], "mt5": ["k", "v", "wi_1"], "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"], "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"], "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"], "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"], "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"], "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"], "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"], "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"], "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"], "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"], "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"], "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"], "qwen3": ["q_proj", "v_proj", "down_proj"],
}
IA3_FEEDFORWARD: dict[str, Targets] = {
    "t5": ["wo"], "mt5": [], "gpt2": ["mlp.c_proj"], "bloom": ["mlp.dense_4h_to_h"], "roberta": ["output.dense"],
    "opt": ["fc2"], "gptj": ["fc_out"], "gpt_neox": ["dense_4h_to_h"], "gpt_neo": ["c_proj"], "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"], "llama": ["down_proj"], "llama4": ["down_proj"], "mistral": ["down_proj"],
    "mixtral": ["w2"], "bert": ["output.dense"], "deberta-v2": ["output.dense"], "deberta": ["output.dense"],
    "RefinedWeb": ["dense_4h_to_h"], "RefinedWebModel": ["dense_4h_to_h"], "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"], "gemma": ["down_proj"], "gemma2": ["down_proj"], "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"], "qwen3": ["down_proj"],
}
# Every attention and MLP projection where HF lists them; LORA_TARGETS, then the module tree, elsewhere.
_ALL_PROJ = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
ADALORA_TARGETS: dict[str, Targets] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"], "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"], "bart": _ALL_PROJ,
    "gpt2": ["c_attn"], "bloom": ["query_key_value"], "opt": _ALL_PROJ, "gptj": _QV, "gpt_neox": ["query_key_value"],
    "gpt_neo": _QV, "llama": _QV, "llama4": _QV, "bert": _QUERY_VALUE, "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"], "gpt_bigcode": ["c_attn"], "deberta": ["in_proj"],
    "gemma": _QV, "gemma2": _QV, "gemma3_text": _QV, "gemma4": _GEMMA4, "qwen2": _QV, "qwen3": _QV,
    "nemotron_h": _NEMOTRON_H,
}


def table_entry(table: dict[str, Targets], model: nn.Module) -> Targets | None:
    """``table``'s entry for the model's ``model_type`` (a fresh list), or None."""
    entry = table.get(model_type(model) or "")
    return list(entry) if isinstance(entry, list) else entry


def default_targets(model: nn.Module, *tables: dict[str, Targets]) -> Targets | None:
    """The first table's entry for the model, else the attention query/value projections derived from the module
    tree (:func:`derive_query_value`), else None."""
    for table in tables:
        entry = table_entry(table, model)
        if entry is not None:
            return entry
    return derive_query_value(model)


# ---- the module tree -----------------------------------------------------------------------------------------------
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
_ATTENTION_NAMES = {"attn", "attention", "self_attn", "self_attention", "selfattention", "cross_attn",
                    "cross_attention", "crossattention", "encoder_attn", "encdecattention", "linear_attn", "mha"}
_CONTAINERS = (nn.ModuleList, nn.ModuleDict)
_CROSS = re.compile(r"cross|encdec|enc_dec|encoder_attn", re.IGNORECASE)
_FUSED = re.compile(r"qkv|query_key_value|^c_attn$|^w_?pack$|^in_proj$", re.IGNORECASE)
_TOKENS = {"query": {"q", "query", "queries", "wq"}, "key": {"k", "key", "keys", "wk"},
           "value": {"v", "value", "values", "wv"}, "kv": {"kv", "wkv"}}
_OUTPUT_TOKENS = {"o", "out", "output", "wo"}
_OUTPUT_NAMES = {"proj", "c_proj", "dense"}
# Linears near attention that are not its q/k/v: relative-position and gate projections.
_NOT_QKV = {"pos", "rel", "relative", "position", "gate", "norm", "bias"}


@dataclass
class AttentionBlock:
    """One attention module and its linears by role (full module names).

    Roles: ``query``, ``key``, ``value``, ``qkv`` (a fused projection), ``kv`` (fused key and value) and
    ``output``; ``width`` is the width the block reads and writes, ``layer`` the transformer layer holding it
    (the nearest enclosing module that also holds linears outside attention), ``top`` the outermost
    attention-named module around it (``BertAttention`` around ``BertSelfAttention``).
    """

    name: str
    roles: dict[str, list[str]] = field(default_factory=dict)
    width: int | None = None
    layer: str | None = None
    top: str = ""

    def picks(self, *roles: str) -> list[str]:
        return [n for role in roles for n in self.roles.get(role, [])]


def _sizes(module: nn.Module) -> tuple[int, int]:
    base = base_layer_of(module)
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    return tuple(base.weight.shape)  # transformers' Conv1D stores (in, out)


def _ancestors(name: str) -> list[str]:
    """Names of the modules enclosing ``name``, outermost first (the root, ``""``, excluded)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _attention_evidence(name: str, module: nn.Module, modules: dict[str, nn.Module]) -> int:
    """2: the class says attention (``LlamaAttention``), or the attribute is a usual attention name (``self_attn``),
    or the module is an element of such a list; 1: only the attribute name mentions it (``attn_gate_mixer``); 0: no
    attention, or a norm (``attn_norm``) or a container."""
    base = base_layer_of(module)
    if isinstance(base, _CONTAINERS) or is_linear_like(base):
        return 0
    cls, leaf = type(base).__name__, name.rsplit(".", 1)[-1]
    if cls.lower().endswith("norm") or "norm" in leaf.lower():
        return 0
    parent = name.rsplit(".", 1)[0] if "." in name else None
    in_list = parent is not None and isinstance(base_layer_of(modules[parent]), _CONTAINERS) and bool(
        _ATTENTION.search(parent.rsplit(".", 1)[-1]))
    if _ATTENTION.search(cls) or leaf.lower() in _ATTENTION_NAMES or in_list:
        return 2
    return 1 if _ATTENTION.search(leaf) else 0


def _tokens(name: str) -> set[str]:
    return set(re.split(r"[_\-]", name.rsplit(".", 1)[-1].lower()))


def _named_output(name: str) -> bool:
    return bool(_tokens(name) & _OUTPUT_TOKENS) or name.rsplit(".", 1)[-1].lower() in _OUTPUT_NAMES


def _role_by_name(name: str) -> str | None:
    if _FUSED.search(name.rsplit(".", 1)[-1]):
        return "qkv"
    tokens = _tokens(name)
    if tokens & _NOT_QKV:
        return None
    return next((role for role, words in _TOKENS.items() if tokens & words), None)


def _roles_by_name(linears: list[str]) -> dict[str, list[str]]:
    """Roles from names, or {} unless they name a query and a value (or kv), or a fused projection."""
    roles: dict[str, list[str]] = {}
    for name in linears:
        role = _role_by_name(name)
        if role is not None:
            roles.setdefault(role, []).append(name)
    complete = ("query" in roles and ("value" in roles or "kv" in roles)) or "qkv" in roles
    return roles if complete else {}


def _roles_by_shape(inputs: list[str], sizes: dict[str, tuple[int, int]]) -> dict[str, list[str]]:
    if len(inputs) == 1:
        return {"qkv": inputs}
    if len(inputs) == 2:
        return {"query": inputs[:1], "kv": inputs[1:]}
    if len(inputs) != 3:  # four or more input projections: no way to tell q from v, adapt them all
        return {"qkv": inputs} if inputs else {}
    # Grouped-query attention: keys and values share a width the query does not have.
    outs = [sizes[n][1] for n in inputs]
    odd = next((i for i in range(3) if outs[i] != outs[(i + 1) % 3] == outs[(i + 2) % 3]), 0)
    k, v = [n for i, n in enumerate(inputs) if i != odd]
    return {"query": [inputs[odd]], "key": [k], "value": [v]}


def _block_roles(
    own: list[str], inner: list[str], outer: list[str], sizes: dict[str, tuple[int, int]], by_shape: bool
) -> dict[str, list[str]]:
    """Roles of the linears of one attention module: ``own`` are its direct projections, ``inner`` every linear
    inside it (helpers such as a sparse-attention indexer too, and projections grouped in a sub-module), ``outer``
    the linears of attention-named modules around it (BERT's output projection sits beside the q/k/v module).
    Names decide where they can, on ``own`` first; shapes only when ``by_shape`` (the module is surely attention)."""
    width = _width(own or inner, sizes)
    roles = _roles_by_name(own) or _roles_by_name(inner)
    used = {n for n in inner if _role_by_name(n)}  # named q/k/v even where the names alone are not enough
    inner_writers = [n for n in inner if n not in used and sizes[n][1] == width]
    outer_writers = [n for n in outer if sizes[n][1] == width]
    named = [n for n in inner_writers if _named_output(n)]
    if named or not outer_writers:  # the last writer; a lone linear is an input projection unless named otherwise
        output = (named or inner_writers)[-1:] if named or len(inner) > 1 else []
    else:
        output = ([n for n in outer_writers if _named_output(n)] or outer_writers)[-1:]
    for pool in (own, inner) if by_shape and not roles else ():
        roles = _roles_by_shape([n for n in pool if n not in output and sizes[n][0] == width
                                 and not _named_output(n)], sizes)
        if roles:
            break
    return {**roles, "output": output}


def _width(names: list[str], sizes: dict[str, tuple[int, int]]) -> int:
    """The most common input width among ``names`` (ties: the earliest), i.e. the hidden size the block reads."""
    widths = [sizes[n][0] for n in names]
    return max(widths, key=lambda w: (widths.count(w), -widths.index(w)))


def attention_blocks(model: nn.Module) -> list[AttentionBlock]:
    """The attention blocks of ``model`` with the roles of their linears, in model order (see the module docstring)."""
    modules = dict(candidate_modules(model))
    linears = [n for n, m in modules.items() if is_linear_like(m)]
    sizes = {n: _sizes(modules[n]) for n in linears}
    evidence = {n: _attention_evidence(n, m, modules) for n, m in modules.items()}
    attention = {n for n, e in evidence.items() if e}
    # A module named like attention that holds an MLP is a whole layer (``...CrossAttentionDecoderLayer``) or a
    # pooling head, not an attention block.
    attention -= {a for a in attention for child, _ in base_layer_of(modules[a]).named_children()
                  if f"{a}.{child}" not in attention
                  and _ffn_pairs([n for n in linears if n.startswith(f"{a}.{child}.")], sizes)}
    groups: dict[str, list[str]] = {}  # innermost attention module -> the linears inside it
    for name in linears:
        owners = [a for a in _ancestors(name) if a in attention]
        if owners:
            groups.setdefault(owners[-1], []).append(name)
    owned = {n for names in groups.values() for n in names}
    blocks = []
    for name, inner in groups.items():
        if any(other.startswith(name + ".") for other in groups):
            continue  # holds an inner block's output projection (BertAttention around BertSelfAttention)
        outer = [n for a in _ancestors(name) if a in groups for n in groups[a]]
        tops = [a for a in _ancestors(name) if a in attention]
        top = tops[0] if tops else name
        # The layer is the nearest module around the attention that holds other linears (the FFN), but never
        # above the nearest indexed one: a layer of attention alone (hybrid models) has no FFN of its own.
        around = list(reversed(_ancestors(top)))
        numbered = next((i for i, a in enumerate(around) if a.rsplit(".", 1)[-1].isdigit()), len(around) - 1)
        indexed = around[numbered] if around and around[numbered].rsplit(".", 1)[-1].isdigit() else None
        layer = next((a for a in around[: numbered + 1]
                      if any(n.startswith(a + ".") and n not in owned for n in linears)), indexed)
        own = [n for n in inner if _own(name, n, modules)]
        roles = _block_roles(own, inner, outer, sizes, by_shape=evidence[name] == 2)
        blocks.append(AttentionBlock(name, roles, _width(own or inner, sizes), layer, top))
    return blocks


def _own(attention: str, name: str, modules: dict[str, nn.Module]) -> bool:
    """Whether linear ``name`` is a projection of ``attention`` itself: its child, or inside plain containers
    (not inside a helper module of its own, such as a sparse-attention indexer)."""
    between = _ancestors(name)[len(_ancestors(attention)) + 1:]
    return all(isinstance(base_layer_of(modules[a]), (*_CONTAINERS, nn.Sequential)) for a in between)


def _ffn_pairs(
    linears: list[str], sizes: dict[str, tuple[int, int]], width: int | None = None
) -> list[tuple[str, str]]:
    """``(up, down)`` pairs among ``linears`` (in order): ``down`` writes the width ``up`` reads (``width`` if given)
    from the width ``up`` writes, or from half of it (a fused gate and up projection)."""
    return [(r, w) for j, w in enumerate(linears) for r in linears[:j]
            if sizes[w][1] == sizes[r][0] == (width or sizes[r][0]) and sizes[r][1] in (sizes[w][0], 2 * sizes[w][0])]


def _in_layer(name: str | None) -> bool:
    """Whether ``name`` is one of a stack of layers or inside one (a module reached through an index)."""
    return name is not None and any(part.isdigit() for part in name.split("."))


def _feedforward(model: nn.Module, blocks: list[AttentionBlock]) -> list[tuple[str, str, str]]:
    """``(layer, up, down)`` per FFN of each transformer layer. The down projection is a linear outside attention
    that writes the block width from the width an earlier one (``up``) writes (or half of it: a fused gate and up
    projection); of such pairs the widest (not a small per-layer side projection or a shared expert). Without any
    pair: the last linear that writes the block width."""
    modules = dict(candidate_modules(model))
    tops = {b.top for b in blocks}
    found: dict[str, list[tuple[str, str, str]]] = {}
    for block in blocks:
        if not _in_layer(block.layer) or block.layer in found or block.width is None:
            continue
        # Linears inside a norm (a gated norm's small MLP) are no FFN.
        inside = [n for n, m in modules.items() if n.startswith(block.layer + ".") and is_linear_like(m)
                  and not any(a in tops or _is_norm(modules[a]) for a in _ancestors(n))]
        sizes = {n: _sizes(modules[n]) for n in inside}
        readers = [n for n in inside if sizes[n][0] == block.width]
        writers = [n for n in inside if sizes[n][1] == block.width]
        pairs = _ffn_pairs(inside, sizes, block.width)
        # A down projection reads a width other than the block's; where every projection is square, shapes tell
        # nothing and the last one is the down projection.
        strict = [(u, d) for u, d in pairs if sizes[d][0] != block.width]
        pairs = strict or pairs[-1:]
        widest = max((sizes[up][1] for up, _ in pairs), default=0)
        downs = {down: up for up, down in reversed(pairs) if sizes[up][1] == widest}  # up: the first reader
        if downs:
            found[block.layer] = [(block.layer, downs[d], d) for d in sorted(downs, key=inside.index)]
        elif readers and writers:
            narrowing = [n for n in writers if sizes[n][0] != block.width]
            found[block.layer] = [(block.layer, readers[0], (narrowing or writers)[-1])]
    return [triple for triples in found.values() for triple in triples]


# ---- writing names down --------------------------------------------------------------------------------------------
def _suffixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[-k:]) for k in range(1, len(parts) + 1)]


def _selects(pattern: Targets, name: str) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == key or name.endswith("." + key) for key in pattern)


def _regex(chosen: list[str]) -> str:
    """One regex for ``chosen``: an index that differs between the names becomes ``\\d+``, one they share stays."""
    groups: dict[tuple[str, ...], list[list[str]]] = {}
    for name in chosen:
        parts = name.split(".")
        groups.setdefault(tuple("#" if p.isdigit() else p for p in parts), []).append(parts)
    patterns = []
    for shape, members in groups.items():
        varies = [part == "#" and len({m[i] for m in members}) > 1 for i, part in enumerate(shape)]
        patterns.append(r"\.".join(r"\d+" if v else re.escape(p) for v, p in zip(varies, members[0])))
    return patterns[0] if len(patterns) == 1 else "(?:" + "|".join(patterns) + ")"


def _compact(model: nn.Module, chosen: list[str], allow_list: bool = True) -> Targets:
    """``chosen`` written as short dotted suffixes, a regex or the full names, whichever selects exactly them."""
    names = [n for n, _ in candidate_modules(model)]
    wanted = set(chosen)
    taken = {s for n in names if n not in wanted for s in _suffixes(n)}
    # None: even the full name is the suffix of another module's name ("layers.0" of "encoder.layers.0").
    keys = [next((s for s in _suffixes(n) if s not in taken), None) for n in chosen]
    if allow_list and None not in keys and not any(part.isdigit() for key in keys for part in key.split(".")):
        return list(dict.fromkeys(keys))
    regex = _regex(chosen)
    if {n for n in names if _selects(regex, n)} == wanted:
        return regex
    return list(chosen)


# ---- derived defaults ----------------------------------------------------------------------------------------------
def derive_query_value(model: nn.Module) -> Targets | None:
    """The attention blocks' query and value projections, or fused qkv projections, or None without attention."""
    chosen = [n for b in attention_blocks(model) for n in b.picks("query", "value", "qkv", "kv")]
    return _compact(model, sorted(set(chosen), key=chosen.index)) if chosen else None


def derive_key_value_feedforward(model: nn.Module) -> tuple[Targets, Targets] | None:
    """``(target_modules, feedforward_modules)`` for output-side key/value (or fused) scaling and input-side FFN
    down-projection scaling, or None without attention. The two are written alike, so that HF peft's plain
    ``str.endswith`` test on a ``feedforward_modules`` list marks exactly the derived down projections."""
    blocks = attention_blocks(model)
    attention = [n for b in blocks for n in b.picks("key", "value", "qkv", "kv")]
    if not attention:
        return None
    downs = [down for _, _, down in _feedforward(model, blocks)]
    chosen = list(dict.fromkeys(attention + downs))
    targets = _compact(model, chosen)
    feedforward = _compact(model, downs, allow_list=isinstance(targets, list)) if downs else []
    if isinstance(targets, list) and isinstance(feedforward, list):
        marked = [n for n in chosen if any(n.endswith(key) for key in feedforward)]
        if marked == downs and set(feedforward) <= set(targets):
            return targets, feedforward
        targets = _compact(model, chosen, allow_list=False)
        feedforward = _compact(model, downs, allow_list=False) if downs else []
    return targets, feedforward


def feedforward_entries(model: nn.Module, target_modules: Targets) -> Targets | None:
    """The part of a user's ``target_modules`` that is FFN down projections, as ``feedforward_modules``: the list
    entries all of whose modules are down projections, or a regex of the down projections a regex selects. None
    when the model has no attention block to tell the feed-forward part by."""
    blocks = attention_blocks(model)
    if not blocks:
        return None
    downs = {down for _, _, down in _feedforward(model, blocks)}
    names = [n for n, _ in candidate_modules(model)]
    if isinstance(target_modules, str):
        every = target_modules == ALL_LINEAR  # the down projections are linears, never the output head
        chosen = [n for n in names if n in downs and (every or _selects(target_modules, n))]
        return _compact(model, chosen, allow_list=False) if chosen else []
    entries = []
    for key in target_modules:
        selected = {n for n in names if _selects([key], n)}
        if selected and selected <= downs:
            entries.append(key)
    return entries


def derive_placements(model: nn.Module) -> dict[str, Targets]:
    """Bottleneck adapter placements for an architecture no table knows (keys as in ``PLACEMENTS``):
    ``houlsby``: the self-attention output projections and FFN down projections; ``pfeiffer``: each layer (pre-LN),
    or the norm after its FFN down projection when one sits beside it (post-LN, BERT-style); ``attn``: the
    self-attention modules; ``ffn``: the FFN modules, or each layer with ``ffn_span`` = [up, down] where the FFN is no
    module of its own. Placements that cannot be found are left out."""
    modules = dict(candidate_modules(model))
    every = attention_blocks(model)
    ffn = _feedforward(model, every)
    blocks = [b for b in every if not _CROSS.search(b.name)]  # AdapterHub places none after cross-attention
    out: dict[str, Targets] = {}
    outputs = [n for b in blocks for n in b.roles["output"]]
    if outputs and ffn:  # Houlsby needs both; an MoE of fused expert tensors has no linear FFN to follow
        out["houlsby"] = _compact(model, outputs + [down for _, _, down in ffn])
    if blocks:
        out["attn"] = _compact(model, list(dict.fromkeys(_attention_sublayer(b) for b in blocks)))
    # Pfeiffer on a pre-LN layer wraps the whole layer; layers whose FFN was found may show a post-LN norm instead.
    with_ffn = {layer for layer, _, _ in ffn}
    pfeiffer = [_numbered(b.layer) for b in blocks if _in_layer(b.layer) and b.layer not in with_ffn]
    ffn_modules, spans = [], []
    for layer, up, down in ffn:
        parent, leaf = down.rsplit(".", 1)
        norms = _norms_after(modules[parent], leaf) if parent != layer else []
        pfeiffer.append(f"{parent}.{norms[0]}" if norms else _numbered(layer))
        common = ".".join(_common_prefix(up.split("."), down.split(".")))
        if common != layer and common.startswith(layer + "."):
            ffn_modules.append(_widen(modules, common, layer))
        else:
            ffn_modules.append(layer)
            spans.append([up[len(layer) + 1:], down[len(layer) + 1:]])
    if pfeiffer:
        out["pfeiffer"] = _compact(model, sorted(set(pfeiffer), key=list(modules).index), allow_list=False)
    # One config holds one span for all its targets: FFN modules everywhere, or the same span in every layer.
    if ffn_modules and (not spans or (len(spans) == len(ffn_modules) and all(sp == spans[0] for sp in spans))):
        out["ffn"] = _compact(model, list(dict.fromkeys(ffn_modules)), allow_list=not spans)
        if spans:
            out["ffn_span"] = spans[0]
    return out


def _attention_sublayer(block: AttentionBlock) -> str:
    """The module a parallel adapter runs beside: the attention module, or on BERT-style models the output module
    that adds the residual (``attention.output``, called as ``(hidden_states, input_tensor)``)."""
    output = block.roles["output"]
    if output and not output[0].startswith(block.name + "."):
        return output[0].rsplit(".", 1)[0]
    return block.top


def _norms_after(parent: nn.Module, leaf: str) -> list[str]:
    """Norm modules registered after ``leaf`` in ``parent``: a post-LN model's norm of ``x + FFN(x)``."""
    children = list(base_layer_of(parent).named_children())
    index = [n for n, _ in children].index(leaf)
    return [n for n, m in children[index + 1:] if _is_norm(m)]


def _is_norm(module: nn.Module) -> bool:
    base = base_layer_of(module)
    return isinstance(base, (nn.LayerNorm, nn.RMSNorm)) or type(base).__name__.endswith(("LayerNorm", "RMSNorm"))


def _widen(modules: dict[str, nn.Module], ffn: str, layer: str) -> str:
    """The FFN module: from the module holding the up and down projections, up to the layer's child, as long as
    the step adds no norm (a sub-layer with its own norm and residual, T5's ``layer.2``): an MoE block holds its
    shared expert's projections, and the adapter belongs beside the whole block."""
    while True:
        parent = ffn.rsplit(".", 1)[0]
        if parent == layer or parent.rsplit(".", 1)[-1].isdigit():
            return ffn
        if any(_is_norm(m) for _, m in base_layer_of(modules[parent]).named_children()):
            return ffn
        ffn = parent


def _numbered(name: str) -> str:
    """The innermost module of ``name``'s path reached through an index: its transformer layer."""
    parts = name.split(".")
    last = max(i for i, part in enumerate(parts) if part.isdigit())
    return ".".join(parts[: last + 1])


def _common_prefix(a: list[str], b: list[str]) -> list[str]:
    out = []
    for x, y in zip(a[:-1], b[:-1]):
        if x != y:
            break
        out.append(x)
    return out


def describe_candidates(model: nn.Module, limit: int = 16) -> str:
    """The model's linear layers, named as within one transformer layer (``self_attn.q_proj``), for error messages
    that ask the user to pick ``target_modules``."""
    seen: dict[str, None] = {}
    for name, module in candidate_modules(model):
        if is_linear_like(module):
            parts = name.split(".")
            digits = [i for i, part in enumerate(parts[:-1]) if part.isdigit()]
            seen.setdefault(".".join(parts[digits[-1] + 1:]) if digits else name)
    names = list(seen)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{names[:limit]}{more}" if names else "none (no nn.Linear or Conv1D)"
