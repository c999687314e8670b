"""The ablation file: its validated model (:class:`AblationSpec`, with its ``quick`` and ``launcher``
sections) and how a file or a preset is loaded."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from nas_headprune.errors import ConfigError


def _check_dotted(keys: Any) -> Any:
    for key in keys:
        if not key or any(not part for part in str(key).split(".")):
            raise ValueError(f"{key!r} is not a dotted config key such as finetune.lr")
    return keys


class Variant(BaseModel):
    """A named set of dotted overrides."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str = Field(pattern=r"^[A-Za-z0-9_.+=-]+$", description="letters, digits and _ . + = -")
    set: dict[str, Any] = Field(default_factory=dict)

    @field_validator("set")
    @classmethod
    def _dotted(cls, v: dict[str, Any]) -> dict[str, Any]:
        _check_dotted(v)
        return v


class QuickSpec(BaseModel):
    """What ``--quick`` replaces; ``set`` is merged over the file's ``set``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    strategies: list[str] | None = None
    budgets: list[float] | None = None
    seeds: list[int] | None = None
    variants: list[str] | None = Field(None, description="keep only these variant names")
    set: dict[str, Any] = Field(default_factory=dict)
    strategy_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    equal_steps: int | None = Field(None, ge=0)


#: sbatch options that the launcher writes itself: the field to use instead, or None
_SBATCH_SET_BY_LAUNCHER = {
    "partition": "partition",
    "time": "timeout_min",
    "mem": "mem_gb",
    "gpus-per-node": "gpus_per_trial",
    "cpus-per-task": "cpus_per_trial",
    "array": "array_parallelism",
    "output": "log_folder",
    "error": "log_folder",
    "open-mode": None,
    "job-name": None,
    "nodes": None,
    "ntasks-per-node": None,
    "signal": None,
}


class LauncherConfig(BaseModel):
    """The ``launcher`` section: how ``--launcher submitit`` submits the trials (one array task each).

    The local launcher ignores it; ``cluster: local`` runs the array through submitit's local executor
    (processes on this machine), where ``partition``, ``array_parallelism`` and ``sbatch`` do nothing."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    cluster: Literal["slurm", "local"] = "slurm"
    partition: str | None = Field(None, pattern=r"^[^\s]+$", description="default: the cluster's")
    gpus_per_trial: int = Field(1, ge=0)
    cpus_per_trial: int = Field(4, ge=1, description="also the trial's torch thread count")
    timeout_min: int = Field(60, ge=1, description="time limit of one trial, in minutes")
    mem_gb: float | None = Field(None, gt=0, description="memory per trial; default: the partition's")
    array_parallelism: int = Field(256, ge=1, description="at most this many trials run at once")
    sbatch: dict[str, str | int | bool] = Field(
        default_factory=dict, description="extra #SBATCH options, e.g. {account: proj, qos: high}"
    )
    setup: list[str] = Field(default_factory=list, description="shell lines run before the trial")
    log_folder: str | None = Field(None, min_length=1, description="submitit's files; default <out>/submitit")

    @field_validator("sbatch")
    @classmethod
    def _sbatch(cls, v: dict[str, str | int | bool]) -> dict[str, str | int | bool]:
        for key, value in v.items():
            if not key or not all(c.isalnum() or c in "-_" for c in key) or not key[0].isalpha():
                raise ValueError(f"{key!r} is not an sbatch option name such as account or qos")
            name = key.replace("_", "-")  # submitit writes option names with hyphens
            if name in _SBATCH_SET_BY_LAUNCHER:
                own = _SBATCH_SET_BY_LAUNCHER[name]
                raise ValueError(
                    f"--{name} is set by the launcher" + (f"; use launcher.{own}" if own else "")
                )
            if value is False or "\n" in str(value):
                raise ValueError(f"{key}: {value!r} is not a value (true writes a flag without value)")
        return v


class AblationSpec(BaseModel):
    """An ablation file, validated; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    base: str = "default"
    set: dict[str, Any] = Field(default_factory=dict)
    strategies: list[str] = Field(min_length=1)
    budgets: list[float] = Field(default_factory=lambda: [0.5], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    strategy_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    variants: list[Variant] = Field(default_factory=list)
    quick: QuickSpec | None = None
    launcher: LauncherConfig | None = None
    equal_steps: int | None = Field(
        None,
        ge=0,
        description="give every trial this many training steps in all: the fine-tune gets what the "
        "strategy's search does not spend on the weights (one epoch of that many steps, or equal "
        "epochs of at most epoch_steps); a trial whose run trained another number of steps fails",
    )
    epoch_steps: int | None = Field(
        None,
        ge=1,
        description="with equal_steps: the most optimizer steps one fine-tune epoch can take (the "
        "training split's batches per epoch); the fine-tune is split into as few equal epochs as keep "
        "each within it",
    )

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v: list[float]) -> list[float]:
        for b in v:
            if not 0 < b <= 1:
                raise ValueError(f"budget {b} is outside (0, 1]")
        return v

    @field_validator("set")
    @classmethod
    def _set_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        _check_dotted(v)
        return v

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        _check_dotted(v)
        for key, values in v.items():
            if not values:
                raise ValueError(f"grid axis {key!r} has no values")
        return v

    @field_validator("variants")
    @classmethod
    def _unique(cls, v: list[Variant]) -> list[Variant]:
        names = [x.name for x in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(dup)}")
        return v

    def quick_version(self) -> AblationSpec:
        """The spec with the ``quick`` section applied (an error if the file has none)."""
        if self.quick is None:
            raise ConfigError(f"ablation {self.name!r} has no 'quick' section; --quick needs one")
        q = self.quick
        data = self.model_dump()
        data["name"] = f"{self.name}-quick"
        data["quick"] = None
        for key in ("strategies", "budgets", "seeds", "equal_steps"):
            if getattr(q, key) is not None:
                data[key] = getattr(q, key)
        if q.variants is not None:
            known = [v.name for v in self.variants]
            unknown = [n for n in q.variants if n not in known]
            if unknown:
                raise ConfigError(
                    f"quick.variants names unknown variants {unknown}; the file declares {known}"
                )
            data["variants"] = [v for v in data["variants"] if v["name"] in q.variants]
        data["set"] = {**self.set, **q.set}
        opts = {k: dict(v) for k, v in self.strategy_options.items()}
        for name, extra in q.strategy_options.items():
            opts[name] = {**opts.get(name, {}), **extra}
        data["strategy_options"] = opts
        return AblationSpec.model_validate(data)


def preset_names() -> list[str]:
    from nas_headprune.config import preset_names as names

    return names("ablations")


def load_spec(source: str, quick: bool = False) -> AblationSpec:
    """An ablation YAML file, or the name of a preset in ``nas_headprune/configs/ablations``."""
    from nas_headprune.config import read_yaml

    data = read_yaml(source, subdir="ablations", what="ablation")
    try:
        spec = AblationSpec.model_validate(data)
    except ValidationError as exc:
        from nas_headprune.config import validation_message

        raise ConfigError(validation_message(exc, prefix="ablation: ", model=AblationSpec)) from exc
    return spec.quick_version() if quick else spec
