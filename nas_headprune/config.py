"""Run configuration: pydantic models (unknown keys are errors), YAML presets and dotted overrides."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from nas_headprune.errors import ConfigError


def _allowed(model: type[BaseModel] | None, loc: tuple) -> str:
    """The allowed choices / fields at ``loc``, for error messages."""
    if model is None:
        return ""
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return ""
        current = fields[part].annotation
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return ""
    fields = getattr(current, "model_fields", None)
    if fields is None:
        return ""
    last = loc[-1]
    if last not in fields:
        return "; valid keys here: " + ", ".join(sorted(fields))
    return ""


def validation_message(exc: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> str:
    """One readable line per error, each naming the dotted field."""
    lines = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        dotted = ".".join(((prefix,) if prefix else ()) + loc)
        if err["type"] == "extra_forbidden":
            lines.append(f"{dotted}: unknown key{_allowed(model, loc)}")
        else:
            got = err.get("input")
            got_s = f" (got {got!r})" if not isinstance(got, dict) else ""
            lines.append(f"{dotted}: {err['msg']}{got_s}")
    return "invalid configuration: " + "; ".join(lines)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, and so are NaN and infinities."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# ------------------------------------------------------------------------------------- data
#: the image size of the data sets with a fixed native size (``img_size`` only resizes imagefolder data)
NATIVE_IMG_SIZE = {"fashion_mnist": 28, "digits": 8}
DEFAULT_IMG_SIZE = 224


class DataConfig(Section):
    """The ``data`` section of a run config."""

    name: Literal["fashion_mnist", "digits", "imagefolder"] = "fashion_mnist"
    root: str | None = None
    batch_size: int = Field(256, gt=0)
    eval_batch_size: int = Field(512, gt=0)
    num_workers: int = Field(0, ge=0)
    train_subset: int | None = Field(None, gt=0, description="keep N training samples (seeded)")
    test_subset: int | None = Field(None, gt=0, description="keep N test samples (seeded)")
    calib_batches: int = Field(4, gt=0, description="number of calibration batches")
    calib_batch_size: int = Field(64, gt=0)
    img_size: int | None = Field(None, gt=0, description=f"imagefolder only; default {DEFAULT_IMG_SIZE}")
    auto_augment: str | None = Field(
        None,
        description="imagefolder only: timm auto-augment policy of the training split, "
        "e.g. 'rand-m9-mstd0.5-inc1' (RandAugment); None for timm's plain training transform",
    )
    re_prob: float = Field(0.0, ge=0, le=1, description="imagefolder only: random-erasing probability")
    val_split: float | int | None = Field(
        None,
        description="hold out a class-stratified validation split from the training split: a fraction "
        "in (0, 1) or a number of samples; search, calibration and fine-tune never see it",
    )
    val_seed: int = Field(0, ge=0, description="seed of the validation split (the same for every run seed)")
    download: bool = True

    @model_validator(mode="after")
    def _img_size_fits_dataset(self) -> DataConfig:
        native = NATIVE_IMG_SIZE.get(self.name)
        if native is not None and self.img_size is not None and self.img_size != native:
            raise ValueError(
                f"img_size={self.img_size} does not fit {self.name!r}, whose images are {native}x{native}; "
                f"leave img_size unset (it only resizes 'imagefolder' data)"
            )
        if isinstance(self.val_split, float) and not 0 < self.val_split < 1:
            raise ValueError(f"val_split={self.val_split}: a fraction must lie in (0, 1)")
        if isinstance(self.val_split, int) and self.val_split < 1:
            raise ValueError(f"val_split={self.val_split}: a number of samples must be at least 1")
        if self.name != "imagefolder" and (self.auto_augment is not None or self.re_prob > 0):
            raise ValueError(
                f"auto_augment and re_prob only apply to name='imagefolder', not {self.name!r}; leave them unset"
            )
        return self


# -------------------------------------------------------------------------------- fine-tune
class FinetuneConfig(Section):
    """How to fine-tune; every field is validated, unknown fields are rejected."""

    epochs: int = Field(
        1, ge=0, description="epochs to train in total (a resumed run counts the finished ones)"
    )
    lr: float = Field(5e-4, gt=0, description="peak learning rate, reached at the end of the warm-up")
    min_lr: float = Field(1e-6, ge=0, description="learning rate of the last step of the cosine decay")
    weight_decay: float = Field(0.05, ge=0, description="AdamW decoupled weight decay of matrices")
    warmup_epochs: float = Field(
        0.1, ge=0, description="linear warm-up length, in epochs (may be fractional)"
    )
    grad_clip: float | None = Field(
        1.0, gt=0, description="max global gradient norm; None turns clipping off"
    )
    distill: bool = Field(False, description="distil from the teacher passed to finetune()")
    distill_alpha: float = Field(
        0.5, ge=0, le=1, description="weight of the KL term; 1 - alpha weighs cross entropy"
    )
    distill_temperature: float = Field(1.0, gt=0, description="softmax temperature of the KL term")
    amp: bool = Field(
        True, description="mixed precision on CUDA (bf16 where supported, else fp16); ignored on CPU"
    )
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap on optimizer steps per epoch")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the cross entropy")
    mixup: float = Field(0.0, ge=0, description="mixup alpha (timm Mixup); 0 turns mixup off")
    cutmix: float = Field(0.0, ge=0, description="cutmix alpha (timm Mixup); 0 turns cutmix off")
    mixup_prob: float = Field(1.0, ge=0, le=1, description="chance that a batch is mixed at all")
    mixup_switch_prob: float = Field(
        0.5, ge=0, le=1, description="with mixup and cutmix both on, chance of cutmix for a batch"
    )
    log_every: int = Field(50, ge=1, description="steps between two log events")

    @model_validator(mode="after")
    def _min_lr_below_lr(self) -> FinetuneConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        return self


# --------------------------------------------------------------------------------- reweight
class ReweightConfig(Section):
    """Options of the reweighting step (``reweight:`` in a run config)."""

    mode: Literal["none", "lstsq", "scales", "lstsq+scales"] = "lstsq"
    ridge: float = Field(1e-3, ge=0, description="relative damping: lambda = ridge * mean(diag(X^T X))")
    max_tokens: int = Field(200_000, ge=1, description="calibration tokens per layer for lstsq (subsampled)")
    scale_steps: int = Field(100, ge=0, description="Adam steps for the per-channel scales")
    scale_lr: float = Field(1e-2, gt=0, description="Adam learning rate for the scales")


# ------------------------------------------------------------------------------------- runs
#: seeds go to torch, numpy (mod 2**32) and Python; one range every library accepts
MAX_SEED = 2**63 - 1


class ModelConfig(Section):
    name: str = Field("embedded", description="'embedded' (the shipped model) or a timm model name")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="timm.create_model arguments")
    checkpoint: str | None = Field(None, description="weights to load (.safetensors or .pt state dict)")
    checkpoint_format: Literal["timm", "flatten_official"] = Field(
        "timm",
        description="timm: a state dict in the model's own names (what timm saves); flatten_official: "
        "a checkpoint of the official FLatten release (converted on load)",
    )


class SpaceConfig(Section):
    skip_unsupported: bool = False
    prune_heads: bool = Field(
        False,
        description="let attention layers also drop whole heads (a head count per layer next to the "
        "per-head widths; adapters that support it, scoring strategies)",
    )
    drop_sublayers: bool = Field(
        False,
        description="let whole sublayers go: an attention layer may keep 0 heads and an MLP 0 hidden "
        "units (the sublayer becomes its constant output, its norm is removed); needs prune_heads: "
        "true; adapters that support it, scoring strategies (allocation: global drops, uniform never does)",
    )

    @model_validator(mode="after")
    def _drops_need_head_counts(self) -> SpaceConfig:
        if self.drop_sublayers and not self.prune_heads:
            raise ValueError(
                "drop_sublayers=true needs prune_heads=true (an attention layer is dropped by keeping "
                "0 of its heads); set space.prune_heads=true as well, or drop_sublayers=false"
            )
        return self


class LatencyConfig(Section):
    """How the latency table of ``budget_kind: latency`` is measured (``latency:`` in a run config)."""

    batch_size: int = Field(1, ge=1, description="images per forward pass the latency is for")
    device: Literal["cpu", "cuda"] | None = Field(
        None, description="where the latency is measured; default (null): the run's device"
    )
    threads: int | None = Field(
        None, ge=1, description="torch CPU threads while timing; default (null): torch's current setting"
    )
    points: int = Field(5, ge=2, le=33, description="widths timed per dimension (both ends included)")
    rounds: int = Field(15, ge=1, description="interleaved timing rounds per grid point (medians)")
    warmup: int = Field(3, ge=0, description="untimed calls before timing")
    check_rounds: int = Field(
        100, ge=1, description="rounds when the pruned and dense models are timed against the prediction"
    )
    refine_rounds: int = Field(
        3,
        ge=0,
        le=10,
        description="times the search is redone after timing its pruned model whole against the dense "
        "one and calibrating the table again through that measurement (0: the table as measured)",
    )
    refine_tolerance: float = Field(
        0.03,
        gt=0,
        lt=1,
        description="refinement stops once the measured latency is within this fraction of the budget",
    )
    cache_dir: str | None = Field(
        None,
        description="where measured tables are kept; default (null): ~/.cache/nas-headprune/latency "
        "($XDG_CACHE_HOME respected); '' for no cache",
    )


class RunConfig(Section):
    """Everything a ``search`` run needs; ``strategy_options`` is validated by the strategy.

    Every section is typed and validated here, before torch is imported, so a typo or a bad value
    anywhere but in ``strategy_options`` is reported at once.
    """

    strategy: str = "magnitude"
    strategy_options: dict[str, Any] = Field(default_factory=dict)
    budget: float = Field(
        0.5, gt=0, le=1, description="target MACs (or latency) as a fraction of the dense model's, in (0, 1]"
    )
    budget_kind: Literal["macs", "latency"] = Field(
        "macs",
        description="macs: the budget is a fraction of the dense MACs; latency: a fraction of the dense "
        "model's latency measured on this machine (latency: section; scoring strategies only)",
    )
    latency: LatencyConfig = Field(default_factory=LatencyConfig)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelConfig = Field(default_factory=ModelConfig)
    space: SpaceConfig = Field(default_factory=SpaceConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    reweight: ReweightConfig = Field(default_factory=ReweightConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    throughput_batch: int = Field(
        64, ge=1, description="images per forward pass when result.json's throughput is timed"
    )
    throughput_rounds: int = Field(
        10, ge=1, description="interleaved rounds (dense and pruned model, medians) of that timing"
    )
    progress: bool = True


def preset_names(subdir: str = "") -> list[str]:
    folder = resources.files("nas_headprune.configs")
    if subdir:
        folder = folder / subdir
        if not folder.is_dir():
            return []
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} file {str(path)!r} is not a text (UTF-8 YAML) file") from exc
    except OSError as exc:
        raise ConfigError(f"{what} file {str(path)!r} cannot be read: {exc.strerror or exc}") from exc


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def read_yaml(source: str, subdir: str = "", what: str = "config") -> dict[str, Any]:
    """A YAML file path or a preset name from ``nas_headprune.configs`` (``/subdir``); ``yaml.safe_load``
    only. ``what`` names the kind of file in error messages."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{what} file {source!r} does not exist")
        text = _read_text(path, what)
    else:
        folder = resources.files("nas_headprune.configs")
        candidate = (folder / subdir if subdir else folder) / f"{source}.yaml"
        if not candidate.is_file():
            raise ConfigError(
                f"{source!r} is neither {_article(what)} {what} file nor a preset; presets: "
                f"{', '.join(preset_names(subdir))}"
            )
        text = candidate.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {source!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {source!r} must be a mapping at the top level")
    return data


def apply_override(data: dict[str, Any], item: str) -> None:
    """``a.b.c=value``; the value is parsed as YAML (numbers, booleans, lists)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects dotted.key=value, got {item!r}")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    set_dotted(data, key, value)


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``data["a"]["b"]["c"] = value`` for ``key = "a.b.c"``, creating sections as needed."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
        node = nxt
    node[parts[-1]] = value


QUICK = "quick"


def _refuse_other_kind(
    source: str | None, data: dict[str, Any], model: type[Section], other: type[Section], kind: str, run: str
) -> None:
    """Name the command a config file belongs to when it holds sections only ``other`` has and none
    only ``model`` has (``kind``: what such a config is; ``run``: the command that runs it)."""
    own = set(model.model_fields) - set(other.model_fields)
    theirs = data.keys() & (set(other.model_fields) - set(model.model_fields))
    if source and theirs and not data.keys() & own:
        found = ", ".join(map(repr, sorted(theirs)))
        raise ConfigError(f"{source!r} is {kind} (it has {found}); run it with `{run}`")


def load_config(
    source: str | None = None, overrides: list[str] | None = None, *, quick: bool = False
) -> RunConfig:
    """A run config from a YAML file or preset, then ``overrides`` (dotted ``key=value``).

    A file may hold a ``quick:`` section of dotted overrides: a small version of the same run (tiny
    image size, a few steps) that ``quick=True`` (``search --quick``) applies before ``overrides``.
    """
    data: dict[str, Any] = read_yaml(source) if source else {}
    _refuse_other_kind(
        source,
        data,
        RunConfig,
        TrainConfig,
        "a training config",
        f"nas-headprune train --config {source} --out DIR",
    )
    shortcut = data.pop(QUICK, None)
    if quick:
        if not isinstance(shortcut, dict):
            raise ConfigError(f"--quick: config {source!r} has no 'quick' section of dotted overrides")
        for key, value in shortcut.items():
            set_dotted(data, str(key), value)
    for item in overrides or []:
        apply_override(data, item)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, model=RunConfig)) from exc


class TrainConfig(Section):
    """``nas-headprune train``: a dense model trained from scratch on one data set."""

    model: ModelConfig = Field(default_factory=lambda: ModelConfig(name="vit_tiny_patch16_224"))
    data: DataConfig = Field(default_factory=DataConfig)
    train: FinetuneConfig = Field(default_factory=FinetuneConfig)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress: bool = True


def load_train_config(source: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    data: dict[str, Any] = read_yaml(source) if source else {}
    _refuse_other_kind(
        source,
        data,
        TrainConfig,
        RunConfig,
        "a search config",
        f"nas-headprune search --config {source}",
    )
    for item in overrides or []:
        apply_override(data, item)
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, model=TrainConfig)) from exc


class EvaluateConfig(Section):
    """``nas-headprune evaluate``: only the data to evaluate on can be changed."""

    data: DataConfig = Field(default_factory=DataConfig)


def load_evaluate_config(resolved: Path, overrides: list[str] | None = None) -> EvaluateConfig:
    """The data section of a run folder's ``config.resolved.yaml`` (when there is one) plus overrides."""
    data: dict[str, Any] = {"data": {}}
    if resolved.is_file():
        section = read_yaml(str(resolved)).get("data", {})
        if not isinstance(section, dict):
            raise ConfigError(f"{resolved}: 'data' must be a mapping")
        data["data"] = section
    for item in overrides or []:
        apply_override(data, item)
    try:
        return EvaluateConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, model=EvaluateConfig)) from exc
