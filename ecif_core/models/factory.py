"""Build open_clip models from local files only, and choose theta (the influence parameters).

One entry point, `load_model`, goes through open_clip's own factory and never touches a model
hub: the config (an architecture's bundled JSON, or a local file or dict) is handed to
`create_model_and_transforms` and `get_tokenizer` as a 'local-dir:' folder, and the weights of
a local checkpoint go through `open_clip.load_checkpoint` (its unwrapping of training
checkpoints, conversions of other formats and position-embedding resize), checked first
from the file's header so that a checkpoint that does not fit is refused in our words.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from ecif_core.data.storage import read_json_file
from ecif_core.errors import ConfigError, ModelSourceError
from ecif_core.models.layers import layer_mismatch
from ecif_core.models.theta import (PROJECTIONS, block_theta_patterns, default_theta_patterns,  # noqa: F401 - re-exported
                                    expand_theta_patterns, restrict_grad_to, select_theta)
from ecif_core.data.storage import local_copy, location

HUB_PREFIXES = ("hf-hub:", "hf://", "http://", "https://")
LOCAL_DIR_PREFIX = "local-dir:"   # open_clip's name for a local model folder: a path, given as model.config here


@dataclass
class LoadedModel:
    """An open_clip model with the tokenizer and eval transform that belong to it."""

    model: torch.nn.Module
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    preprocess: Callable[[Any], torch.Tensor]
    config: dict[str, Any]
    arch: str | None = None


def resolve_model_config(arch: str | None = None, config: str | Path | dict | None = None) -> dict[str, Any]:
    """The open_clip model config (embed_dim, vision_cfg, text_cfg) from a name or a JSON file."""
    import open_clip

    if config is not None:
        if isinstance(config, dict):
            cfg = copy.deepcopy(config)
        else:
            cfg = read_json_file(config, "model.config")
            if not isinstance(cfg, dict):
                raise ConfigError("model.config", "must be a JSON object")
        if isinstance(cfg.get("model_cfg"), dict):  # open_clip's open_clip_config.json wraps it
            outer = cfg
            cfg = outer["model_cfg"]
            if isinstance(outer.get("preprocess_cfg"), dict) and outer["preprocess_cfg"]:
                cfg["preprocess_cfg"] = {**outer["preprocess_cfg"], **cfg.get("preprocess_cfg", {})}
    elif arch is not None:
        if arch.startswith(HUB_PREFIXES):
            raise ModelSourceError(
                "model.arch", f"{arch!r} needs a download; give an architecture name or model.config "
                "plus a local model.checkpoint")
        if arch.startswith(LOCAL_DIR_PREFIX):
            raise ConfigError("model.arch", "a local model folder is given as model.config (its "
                              "open_clip_config.json) plus model.checkpoint")
        cfg = open_clip.get_model_config(arch)
        if cfg is None:
            raise ConfigError("model.arch", f"unknown open_clip architecture {arch!r}; "
                              "use model.config for a custom one")
        cfg = copy.deepcopy(cfg)
    else:
        raise ConfigError("model", "give model.arch or model.config")
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in cfg]
    if missing:
        raise ConfigError("model.config", f"missing keys {missing} (open_clip format)")
    _reject_hub_towers(cfg)
    return cfg


def _reject_hub_towers(cfg: dict[str, Any]) -> None:
    """timm / Hugging Face towers and tokenizers would fetch weights or vocabularies."""
    if cfg["vision_cfg"].get("timm_model_name") and cfg["vision_cfg"].get("timm_model_pretrained"):
        raise ModelSourceError("model.config.vision_cfg", "timm_model_pretrained needs a download; "
                               "set it false and give a local model.checkpoint")
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if cfg["text_cfg"].get(key):
            raise ModelSourceError(f"model.config.text_cfg.{key}", "Hugging Face text towers and "
                                   "tokenizers need a hub download; use open_clip's built-in text tower")


@contextlib.contextmanager
def _open_clip_name(cfg: dict[str, Any]) -> Iterator[str]:
    """The name under which open_clip's factory reads `cfg` and nothing else: a 'local-dir:'
    folder holding it as open_clip_config.json (no weights in it: they are loaded apart)."""
    model_cfg = copy.deepcopy(cfg)
    preprocess_cfg = model_cfg.pop("preprocess_cfg", None) or {}
    with tempfile.TemporaryDirectory(prefix="ecif-model-") as folder:
        document = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
        (Path(folder) / "open_clip_config.json").write_text(json.dumps(document), encoding="utf-8")
        with _quiet_open_clip():
            yield LOCAL_DIR_PREFIX + folder


class _FactoryNotices(logging.Filter):
    """open_clip's factory warns that a model built without weights is initialised randomly:
    here that is the intent (the weights are loaded next, the init is seeded for training, or
    only shapes are built on the meta device)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_factory = Path(record.pathname).parent.name == "open_clip" and record.module == "factory"
        return not (from_factory and record.levelno < logging.ERROR)


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """open_clip logs with the module-level `logging.info` / `warning`, which would configure the
    root logger (basicConfig) of a process that has not: a NullHandler held meanwhile leaves an
    application's logging as it was, and the factory's random-init notices are dropped."""
    root, notices = logging.getLogger(), _FactoryNotices()
    placeholder = None if root.handlers else logging.NullHandler()
    root.addFilter(notices)
    if placeholder is not None:
        root.addHandler(placeholder)
    try:
        yield
    finally:
        root.removeFilter(notices)
        if placeholder is not None:
            root.removeHandler(placeholder)


def _create(name: str, seed: int | None, transforms: bool) -> tuple[torch.nn.Module, Callable | None]:
    """open_clip's factory on the current default device (the meta device: shapes only), never
    loading tower weights of its own; random init, seeded when `seed` is given."""
    import open_clip

    if seed is not None:
        torch.manual_seed(seed)
    options = {"device": torch.get_default_device(), "pretrained_image": False, "pretrained_text": False}
    if not transforms:
        return open_clip.create_model(name, **options), None
    model, _, preprocess = open_clip.create_model_and_transforms(name, **options)
    return model, preprocess


def build_model(cfg: dict[str, Any], seed: int | None = None) -> torch.nn.Module:
    """An open_clip model from open_clip's factory with random init (seeded when `seed` is given)."""
    with _open_clip_name(cfg) as name:
        return _create(name, seed, transforms=False)[0]


_TOKENIZERS: dict[str, tuple[Callable[[Sequence[str]], torch.Tensor], dict | None]] = {}  # (parsed, its fresh memo)


def _tokenizer_of(name: str, cfg: dict) -> Callable[[Sequence[str]], torch.Tensor]:
    """open_clip's tokenizer for the config's text tower. Building one parses the BPE vocabulary (about 0.3 s,
    a third of an edit), so the parsed tables are built once per process and shared; each model gets its own
    shallow copy with a fresh word memo (`cache`), which then lives and dies with that model. The key is the
    whole text_cfg: `name` is always a temporary local-dir: folder holding `cfg` (_open_clip_name), and hub
    tokenizers are refused (_reject_hub_towers), so nothing else decides the tokenizer."""
    import open_clip

    key = json.dumps(cfg.get("text_cfg") or {}, sort_keys=True)
    if key not in _TOKENIZERS:
        built = open_clip.get_tokenizer(name)
        memo = getattr(built, "cache", None)  # SimpleTokenizer: its special tokens, as built
        _TOKENIZERS[key] = (built, dict(memo) if isinstance(memo, dict) else None)
    shared, fresh_memo = _TOKENIZERS[key]
    own = copy.copy(shared)
    if fresh_memo is not None:
        own.cache = dict(fresh_memo)
    return own


def load_model(arch: str | None = None, config: str | Path | dict | None = None,
               checkpoint: str | Path | None = None, seed: int | None = None,
               adapter: str | Path | None = None) -> LoadedModel:
    """Model + tokenizer + eval preprocess from local files (the single entry point), all three
    as open_clip's factory makes them; `adapter`: a peft LoRA folder applied on top of the checkpoint."""

    cfg = resolve_model_config(arch, config)
    with _open_clip_name(cfg) as name:
        model, preprocess = _create(name, seed, transforms=True)
        tokenizer = _tokenizer_of(name, cfg)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    if adapter is not None:
        from ecif_core.models.lora import load_adapter

        model = load_adapter(model, adapter)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, preprocess=preprocess, config=cfg, arch=arch)


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """A local checkpoint's weights into `model` through open_clip's own `load_checkpoint`.

    The file is checked first from its header (checkpoint_shapes, check_checkpoint): a file
    that is not a state dict, or whose keys or shapes do not fit even after open_clip's
    conversions, is a ConfigError in our words (torch's own text advises `weights_only=False`,
    which would run the file's pickled code, and is never shown).
    """
    import open_clip

    path = local_copy(location(path, "model.checkpoint"))  # a checkpoint in a bucket: a cached local copy
    check_checkpoint(model, checkpoint_shapes(path))
    try:
        with _quiet_open_clip():
            result = open_clip.load_checkpoint(model, str(path), strict=False, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a file changed since its header was read, or a conversion failing
        raise ConfigError("model.checkpoint", f"{path.name} cannot be loaded into the model "
                          f"({type(exc).__name__})") from None
    missing = [k for k in result.missing_keys if not k.endswith("attn_mask")]
    if missing or result.unexpected_keys:
        raise ConfigError("model.checkpoint", _key_mismatch(model.state_dict(), missing, result.unexpected_keys))


def checkpoint_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of a checkpoint, from its header (safetensors) or a mapped file
    (PyTorch): the weights themselves are not read. Unwrapped as open_clip's `load_state_dict`
    does: a training checkpoint's "state_dict", then a "module." prefix (DistributedDataParallel)."""
    path = location(path, "model.checkpoint")
    if not path.is_file():
        raise ConfigError("model.checkpoint", f"file not found: {path}")
    path = local_copy(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt", device="cpu") as handle:
                state: object = {k: torch.empty(handle.get_slice(k).get_shape(), device="meta") for k in handle.keys()}
        else:
            state = _torch_load_mapped(path)
    except Exception as exc:  # noqa: BLE001 - unpickling, zip and format errors of a corrupt or hostile file
        raise ConfigError("model.checkpoint", f"{path.name} cannot be read as a state dict (a PyTorch "
                          f"checkpoint of tensors, or .safetensors): {type(exc).__name__}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ConfigError("model.checkpoint", f"{path.name} does not hold a state dict")
    if str(next(iter(state))).startswith("module"):
        state = {k[len("module."):]: v for k, v in state.items()}
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _torch_load_mapped(path: Path) -> object:
    """torch.load with weights_only (never arbitrary pickled code), memory-mapped; a file in
    torch's legacy (non-zip) format cannot be mapped and is read instead."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "zipfile" not in str(exc) and "mmap" not in str(exc):
            raise
    return torch.load(path, map_location="cpu", weights_only=True)


def check_checkpoint(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    """The checkpoint's keys and shapes, as open_clip's load_checkpoint would convert them,
    match the model's (the check a strict load makes, without reading a weight)."""
    shapes = _converted_shapes(model, shapes)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in shapes and not k.endswith("attn_mask")]
    unexpected = [k for k in shapes if k not in expected]
    if missing or unexpected:
        raise ConfigError("model.checkpoint", _key_mismatch(expected, missing, unexpected, shapes))
    wrong = [f"{k} {shapes[k]} (model: {expected[k]})" for k in shapes if shapes[k] != expected[k]]
    if wrong:
        raise ConfigError("model.checkpoint", f"does not match the model config: shapes {wrong[:3]}")


def _key_mismatch(expected: Iterable[str], missing: list[str], unexpected: list[str],
                  saved: Iterable[str] | None = None) -> str:
    """One line: the towers' block counts when they differ (another architecture), else a few
    of the missing and unexpected names (never the whole list)."""
    if saved is None:
        saved = (set(expected) - set(missing)) | set(unexpected)
    sentence = layer_mismatch(list(expected), list(saved))
    if sentence is not None:
        return f"does not match the model config: {sentence}"
    return f"does not match the model config: missing {missing[:5]}, unexpected {unexpected[:5]}"


def _converted_shapes(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The shapes open_clip's load_checkpoint would load into `model`: the same conversion
    steps, in its order (other formats' keys, the old text-tower layout, a scalar logit scale
    or bias, the position embeddings resized to the model's grid and context), run on meta
    tensors, so no weight is read. A step that fails (a width that no resize can change)
    leaves its tensors as they were, and the comparison with the model names them."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    def custom_text(state: dict) -> dict:
        if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
            return convert_to_custom_text_state_dict(state)
        return state

    def logit_shapes(state: dict) -> dict:
        for key in ("logit_scale", "logit_bias"):
            own = getattr(model, key, None)
            if key in state and own is not None and own.ndim != state[key].ndim:
                state[key] = state[key].reshape(own.shape)
        if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None:
            state["logit_bias"] = torch.empty_like(state["logit_scale"])  # open_clip adds zeros
        return state

    def in_place(resize: Callable[[dict, torch.nn.Module], None]) -> Callable[[dict], dict]:
        return lambda state: resize(state, model) or state

    state = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    for step in (lambda s: convert_state_dict(model, s), custom_text, logit_shapes,
                 in_place(resize_pos_embed), in_place(resize_text_pos_embed)):
        try:
            with _quiet_open_clip():
                state = step(dict(state))
        except Exception:  # noqa: BLE001 - open_clip's loader fails on it too; reported below by key
            continue
    return {k: tuple(v.shape) for k, v in state.items()}


GRADS_ON = ("theta", "frozen", "all")  # which parameters of a ready model take gradients


@dataclass
class ReadyModel:
    """A model ready for use: loaded, exact float32, on its device, gradients on `theta` only (or
    none, or all). `theta`: the selected (name, parameter) pairs; empty unless grads == "theta"."""

    loaded: LoadedModel
    theta: list[tuple[str, torch.nn.Parameter]]

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model


def default_device() -> str:
    """ECIF_DEVICE (the CLI's `--device`): cpu, cuda, or auto = CUDA when torch sees a GPU."""
    from ecif_core.models.runtime import model_device

    return model_device().type


def ready_model(arch: str | None = None, config: str | Path | dict | None = None,
                checkpoint: str | Path | None = None, *, adapter: str | Path | None = None, seed: int | None = None,
                grads: str = "theta", theta: Sequence[str] | None = None, device: str | None = None) -> ReadyModel:
    """The one way the audit's model, its reference, the edit, the trace and training get a model
    (open_clip's factory.py is the pattern): load_model, then exact_float32 (no TF32 on CUDA: a model
    that skipped it gave other numbers than the audit's), then `device` (default: default_device()),
    then gradients on `theta`'s parameters (fnmatch patterns; None: the default theta), on none
    ("frozen": forward passes only) or on all ("all": training chooses its own)."""
    from ecif_core.models.runtime import exact_float32

    if grads not in GRADS_ON:
        raise ValueError(f"grads must be one of {GRADS_ON}, not {grads!r}")
    loaded = load_model(arch, config, checkpoint, seed=seed, adapter=adapter)
    exact_float32()
    loaded.model.to(device or default_device())
    chosen: list[tuple[str, torch.nn.Parameter]] = []
    if grads == "theta":
        chosen = select_theta(loaded.model, theta)
        restrict_grad_to(loaded.model, chosen)
    elif grads == "frozen":
        restrict_grad_to(loaded.model, [])
    return ReadyModel(loaded, chosen)
