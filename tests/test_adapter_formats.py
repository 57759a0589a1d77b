"""Adapters as current PEFT saves them with the options users set: each is either served with PEFT's
own delta per module, or refused naming what is wrong and what to do. Archives and configs that are
broken in the ways real files are broken are refused as InvalidAdapter, never as a stray exception."""

import gzip
import io
import json
import tarfile
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load, save
from transformers import AutoModelForCausalLM

from loraplex.registry import adapter_source
from loraplex.registry.adapter_config import InvalidAdapter
from loraplex.registry.adapter_source import read_metadata
from loraplex.registry.adapter_weights import ModelFit
from loraplex.shard.lora import load_adapter

from peft_fixtures import PROJECTIONS, pack_adapter

FILES = ("adapter_config.json", "adapter_model.safetensors")


def _save_peft(model_dir, out_dir, dtype=torch.float32, save_embedding_layers="auto", **options):
    """A real PEFT adapter for model_dir, its A and B random (PEFT zero-initialises B: no delta)."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. PEFT's note that embedding layers are saved
        model = get_peft_model(base, LoraConfig(**options))
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        model.to(dtype).save_pretrained(out_dir, save_embedding_layers=save_embedding_layers)
    return out_dir


def _targets(model_dir) -> dict[str, tuple[int, int]]:
    config = json.loads((model_dir / "config.json").read_text())
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv_dim = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    groups = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
    features = {
        f"{groups.get(name, 'mlp')}.{name}": shape(hidden, inter, kv_dim)
        for name, shape in PROJECTIONS.items()
    }
    return ModelFit.per_layer(features, layers).targets


def _our_deltas(adapter) -> dict[str, torch.Tensor]:
    """Module path -> scaling * B @ A, as the shard applies it."""
    deltas = {}
    for layer, modules in enumerate(adapter.layers):
        for name, (a, b) in modules.items():
            group = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            deltas[f"model.layers.{layer}.{group}.{name}"] = adapter.scaling * (b.float() @ a.float())
    return deltas


def _peft_deltas(model_dir, source) -> dict[str, torch.Tensor]:
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, source)
    return {
        name.removeprefix("base_model.model."): module.get_delta_weight("default").float()
        for name, module in model.named_modules()
        if "default" in getattr(module, "lora_A", {})
    }


ACCEPTED = {  # PEFT options -> the module names the adapter should report
    # PEFT expands all-linear and writes every module path (or, past 20 modules, the shortest suffixes)
    "all-linear": (dict(target_modules="all-linear"), tuple(PROJECTIONS)),
    "regex": (dict(target_modules=r".*\.(q_proj|down_proj)"), ("q_proj", "down_proj")),
    "path-suffix-entries": (dict(target_modules=["self_attn.q_proj", "mlp.up_proj"]), ("q_proj", "up_proj")),
    "layers-to-transform": (
        dict(target_modules=["k_proj"], layers_to_transform=[1], layers_pattern="layers"),
        ("k_proj",),
    ),
    "rank-and-alpha-patterns": (
        dict(
            target_modules=["q_proj", "v_proj", "o_proj"],
            rank_pattern={"v_proj": 8, r"layers\.1\.self_attn\.q_proj": 2},
            alpha_pattern={"o_proj": 3},
            use_rslora=True,
        ),
        ("q_proj", "v_proj", "o_proj"),
    ),
}


@pytest.mark.parametrize("case", ACCEPTED)
def test_peft_adapters_with_user_options_apply_peft_s_delta(tiny_model_dir, tmp_path, case):
    options, names = ACCEPTED[case]
    source = _save_peft(tiny_model_dir, tmp_path / case, r=4, lora_alpha=8, **options)
    assert read_metadata(str(source)).target_modules == names
    adapter = load_adapter(str(source), case, 1, _targets(tiny_model_dir), 2, max_rank=16)
    ours, expected = _our_deltas(adapter), _peft_deltas(tiny_model_dir, source)
    assert sorted(ours) == sorted(expected)
    for path, delta in expected.items():
        torch.testing.assert_close(ours[path], delta, atol=1e-6, rtol=1e-5, msg=path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            dict(modules_to_save=["lm_head"]),
            r"modules_to_save \['lm_head'\] .* train without modules_to_save",
        ),
        (dict(use_dora=True), "DoRA .* use_dora=False"),
        (dict(lora_bias=True), "lora_bias .* lora_bias=False"),
        (dict(trainable_token_indices=[1, 2]), "trainable_token_indices"),
        (
            dict(init_lora_weights="pissa"),
            "'pissa' changed the base weights .* path_initial_model_for_weight",
        ),
        (dict(init_lora_weights="olora"), "'olora' changed the base weights"),
        (dict(save_embedding_layers=True), "lm_head.weight.* save_embedding_layers=False"),
    ],
    ids=["modules-to-save", "dora", "lora-bias", "trainable-tokens", "pissa", "olora", "saved-embeddings"],
)
def test_peft_adapters_that_are_more_than_plain_lora_are_refused_saying_what_to_do(
    tiny_model_dir, tmp_path, options, message
):
    """Each of these was accepted silently (PiSSA/OLoRA fit base weights their training changed) or
    refused as a bare 'unexpected tensor'."""
    source = _save_peft(
        tiny_model_dir, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"], **options
    )
    archive = pack_adapter(source, tmp_path / "a.tar.gz")
    for where in (str(source), str(archive)):
        with pytest.raises(InvalidAdapter, match=message):
            read_metadata(where)


@pytest.fixture(scope="module")
def adapter_files(tiny_model_dir, tmp_path_factory) -> dict[str, bytes]:
    source = _save_peft(tiny_model_dir, tmp_path_factory.mktemp("plain"), r=4, target_modules=["q_proj"])
    return {name: (source / name).read_bytes() for name in FILES}


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return raw.getvalue()


def _member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, size: int | None = None):
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data) if size is None else size
    if kind == tarfile.LNKTYPE:
        info.linkname = FILES[0]
    return info, data if kind == tarfile.REGTYPE else None


def pack_adapter_files(files: dict[str, bytes], archive):
    archive.write_bytes(gzip.compress(_tar([_member(name, data) for name, data in files.items()])))
    return archive


def _lying_tar(files: dict[str, bytes]) -> bytes:
    """The weights' member header declares 1 MiB more than the data that follows it."""
    config, weights = (files[name] for name in FILES)
    config_header, _ = _member(FILES[0], config)
    weights_header, _ = _member(FILES[1], size=len(weights) + (1 << 20))
    padding = b"\0" * (-len(config) % tarfile.BLOCKSIZE)
    return config_header.tobuf() + config + padding + weights_header.tobuf() + weights


BROKEN_ARCHIVES = {  # case -> (archive bytes from the adapter's files, expected message)
    "not-gzip": (lambda f: b"plain text, not gzip", "not a readable .tar.gz archive"),
    "truncated": (
        lambda f: gzip.compress(_tar([_member(n, d) for n, d in f.items()]))[:-200],
        "not a readable",
    ),
    "declared-larger-than-data": (lambda f: gzip.compress(_lying_tar(f)), "not a readable .tar.gz archive"),
    "in-a-folder": (
        lambda f: gzip.compress(_tar([_member(f"adapter/{n}", d) for n, d in f.items()])),
        r"found 'adapter/adapter_config.json': the files must not sit in a folder\); pack it with: tar -czf",
    ),
    "duplicate-member": (
        lambda f: gzip.compress(
            _tar([*(_member(n, d) for n, d in f.items()), _member("./" + FILES[0], b"{}")])
        ),
        "holds 'adapter_config.json' twice",
    ),
    "hard-link": (
        lambda f: gzip.compress(
            _tar([*(_member(n, d) for n, d in f.items()), _member("x", kind=tarfile.LNKTYPE)])
        ),
        "unsafe member 'x'",
    ),
    "fifo": (
        lambda f: gzip.compress(
            _tar([*(_member(n, d) for n, d in f.items()), _member("p", kind=tarfile.FIFOTYPE)])
        ),
        "unsafe member 'p'",
    ),
}


@pytest.mark.parametrize("case", BROKEN_ARCHIVES)
def test_broken_archives_are_invalid_adapters_naming_how_to_pack(adapter_files, tmp_path, case):
    """Before, gzip and tar errors escaped as ReadError/EOFError (a gRPC UNKNOWN, not INVALID_ARGUMENT)."""
    build, message = BROKEN_ARCHIVES[case]
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(build(adapter_files))
    with pytest.raises(InvalidAdapter, match=message) as refused:
        read_metadata(str(archive))
    assert "tar -czf" in str(refused.value)
    with pytest.raises(InvalidAdapter, match=message):
        adapter_source.read_adapter(str(archive))


def test_archive_members_past_the_size_cap_are_refused_before_being_inflated(
    adapter_files, tmp_path, monkeypatch
):
    """A README of zeros inflates to whatever its header declares; tarfile inflated it to skip it."""
    archive = tmp_path / "a.tar.gz"
    members = [*(_member(n, d) for n, d in adapter_files.items()), _member("README", b"\0" * 100_000)]
    archive.write_bytes(gzip.compress(_tar(members)))
    monkeypatch.setattr(adapter_source, "MAX_WEIGHTS_BYTES", len(adapter_files[FILES[1]]) + 1000)
    monkeypatch.setattr(adapter_source, "MAX_CONFIG_BYTES", 4096)
    read_metadata(str(pack_adapter_files(adapter_files, tmp_path / "ok.tar.gz")))  # within the caps
    with pytest.raises(InvalidAdapter, match="holds more than 64 members or"):
        read_metadata(str(archive))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (b"[]", "must hold a JSON object"),
        (b'{"r": 4, "note": "\xff"}', "is not valid JSON"),
        ({"lora_alpha": "16"}, "needs a positive number 'lora_alpha', got '16'"),
        ({"lora_alpha": None}, "needs a positive number 'lora_alpha', got None"),
        ({"lora_alpha": float("nan")}, "needs a positive number 'lora_alpha', got nan"),
        ({"lora_alpha": -8}, "needs a positive number 'lora_alpha', got -8"),
        ({"r": True}, "needs a positive integer 'r', got True"),
        ({"target_modules": [1]}, "target_modules must be a non-empty list of module names or a regex"),
        ({"target_modules": "q_proj("}, "is not a valid regular expression"),
    ],
    ids=["not-an-object", "not-utf8", "alpha-string", "alpha-null", "alpha-nan", "alpha-negative", "r-bool",
         "target-not-a-name", "target-bad-regex"],
)  # fmt: skip
def test_bad_configs_are_invalid_adapters_naming_the_field(adapter_files, tmp_path, config, message):
    """Before, these raised AttributeError/UnicodeDecodeError/ValueError/TypeError, or were accepted
    (a NaN alpha makes every output NaN)."""
    (tmp_path / FILES[1]).write_bytes(adapter_files[FILES[1]])
    if isinstance(config, dict):
        config = json.dumps({**json.loads(adapter_files[FILES[0]]), **config}).encode()
    (tmp_path / FILES[0]).write_bytes(config)
    with pytest.raises(InvalidAdapter, match=message):
        read_metadata(str(tmp_path))


def test_lora_weights_without_peft_s_prefix_are_refused_as_such(adapter_files, tmp_path):
    """PEFT itself loads no weight from such a file (it reports every adapter key missing)."""
    tensors = {
        key.removeprefix("base_model.model."): value for key, value in load(adapter_files[FILES[1]]).items()
    }
    (tmp_path / FILES[0]).write_bytes(adapter_files[FILES[0]])
    (tmp_path / FILES[1]).write_bytes(save(tensors))
    with pytest.raises(InvalidAdapter, match=r"lacks PEFT's 'base_model\.model\.' prefix"):
        read_metadata(str(tmp_path))
