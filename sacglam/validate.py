"""Option domains: what values each option of the typed config accepts, checked once, when the config is built.

Every config dataclass (``sacglam.config``, ``sacglam.replay.config``, ``sacglam.algos.*.config``) declares the
domain of each of its fields in a table beside it (``{field: Domain}``) and checks it in ``__post_init__`` with
:func:`check_domains`; a rule between options (one divides another, one needs another) is checked there too and
refused with :func:`refuse`. Hydra builds the typed config (``OmegaConf.to_object``) before anything else runs, so a
bad value stops the run before a model, an env or a buffer is built; the rest of the code may rely on the domains
below. Hydra itself refuses a value of the wrong type (``batch_size=abc``) when it composes the config.

The error names the option by its key on the command line (``buffer.her.ratio``), its value, the dataclass field
(for code that builds the dataclass directly) and what is allowed::

    buffer.her.ratio=1.5 is out of range: HERConfig.ratio must be in [0, 1]

This module imports only the standard library (it sits in the light layer with the config modules).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

DEVICE_TYPES: tuple[str, ...] = (
    "cpu", "cuda", "ipu", "xpu", "mkldnn", "opengl", "opencl", "ideep", "hip", "ve", "fpga", "maia", "xla", "lazy",
    "vulkan", "mps", "meta", "hpu", "mtia", "privateuseone",
)
"""The device types ``torch.device`` accepts (its own error message lists them), each alone or with ``:<index>``."""
DTYPES: tuple[str, ...] = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
"""Model dtypes ``sacglam.models.resolve_dtype`` accepts (``auto``: float32 on CPU, bfloat16 on an accelerator)."""
SEED_MAX = 2**32 - 1
"""The largest seed numpy accepts (``np.random.seed``): the run's ``seed`` seeds numpy."""


class ConfigError(ValueError):
    """An option outside its domain; the message names the option as written on the command line."""


class Domain(Protocol):
    """The values one option accepts."""

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is in the domain."""
        ...

    def describe(self) -> str:
        """What the domain is, completing "<option> must be ..." (e.g. ``"in [0, 1]"``)."""
        ...


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


@dataclass(frozen=True)
class Range:
    """A number between bounds (``None``: unbounded on that side); NaN never, infinity only with ``finite=False``.

    Attributes:
        low, high: the bounds.
        low_open, high_open: exclude the bound itself.
        integer: the value must be an integer (bool excluded).
        finite: refuse ``inf`` and ``-inf``.
        note: what a special value means, shown after the range (e.g. ``"0 disables checkpoints"``).
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    finite: bool = True
    note: str = ""

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.integer else numbers.Real):
            return False
        v = float(value) if not self.integer else value
        if not self.integer and (math.isnan(v) or (self.finite and math.isinf(v))):
            return False
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return self.high is None or (v < self.high if self.high_open else v <= self.high)

    def describe(self) -> str:
        bounded = self.low is not None and self.high is not None
        kind = "an integer " if self.integer else "" if bounded else "a finite number " if self.finite else "a number "
        if self.low is not None and self.high is not None:
            text = (f"{kind}in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}"
                    f"{')' if self.high_open else ']'}")
        elif self.low is not None:
            text = f"{kind}{'>' if self.low_open else '>='} {_number(self.low)}"
        elif self.high is not None:
            text = f"{kind}{'<' if self.high_open else '<='} {_number(self.high)}"
        else:
            text = kind.strip()
        return f"{text} ({self.note})" if self.note else text


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of values (an enum-like string option)."""

    values: tuple[Any, ...]

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str | int | float) and not isinstance(value, bool) and value in self.values

    def describe(self) -> str:
        return f"one of {list(self.values)}"


@dataclass(frozen=True)
class Text:
    """A non-empty string (a path, a name, a template)."""

    what: str = "a non-empty string"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and bool(value)

    def describe(self) -> str:
        return self.what


@dataclass(frozen=True)
class Device:
    """A torch device string (``cpu``, ``cuda``, ``cuda:1``, ...), or ``auto`` (cuda when available) if allowed."""

    auto: bool = True

    def accepts(self, value: Any) -> bool:
        if not isinstance(value, str):
            return False
        if self.auto and value == "auto":
            return True
        kind, sep, index = value.partition(":")
        return kind in DEVICE_TYPES and (not sep or re.fullmatch(r"[0-9]+", index) is not None)

    def describe(self) -> str:
        return f"{'auto or ' if self.auto else ''}a torch device: cpu, cuda, cuda:<index>, mps, ..."


@dataclass(frozen=True)
class Flag:
    """A boolean."""

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)

    def describe(self) -> str:
        return "true or false"


@dataclass(frozen=True)
class Each:
    """A list whose every item is in ``item`` (and that holds at least one when ``nonempty``)."""

    item: Domain
    nonempty: bool = False

    def accepts(self, value: Any) -> bool:
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            return False
        return (bool(value) or not self.nonempty) and all(self.item.accepts(v) for v in value)

    def describe(self) -> str:
        return f"a {'non-empty ' if self.nonempty else ''}list of items each {self.item.describe()}"


@dataclass(frozen=True)
class Maybe:
    """``None`` (the documented default behaviour) or a value in ``domain``."""

    domain: Domain

    def accepts(self, value: Any) -> bool:
        return value is None or self.domain.accepts(value)

    def describe(self) -> str:
        return f"null or {self.domain.describe()}"


@dataclass(frozen=True)
class Free:
    """Any value of the field's type (Hydra checks the type): the option has no narrower domain, for the reason
    given (listed so that every field of a config states its domain)."""

    why: str

    def accepts(self, value: Any) -> bool:
        return True

    def describe(self) -> str:
        return f"anything ({self.why})"


# The domains most options share.
COUNT = Range(low=1, integer=True)
"""A count where 0 is meaningless: an integer >= 1."""
PROBABILITY = Range(low=0, high=1)
"""A probability or a fraction: in [0, 1]."""
POSITIVE = Range(low=0, low_open=True)
"""A learning rate, a temperature, a scale: a finite number > 0."""
NONNEGATIVE = Range(low=0)
"""A weight or a coefficient: a finite number >= 0."""


def count_or_off(note: str) -> Range:
    """An integer >= 0 where 0 means ``note`` (e.g. ``"0 disables checkpoints"``)."""
    return Range(low=0, integer=True, note=note)


def key(path: str, name: str) -> str:
    """The dotted command-line key of field ``name`` of the config at ``path`` (``""``: the top level)."""
    return f"{path}.{name}" if path else name


def refuse(obj: object, path: str, name: str, rule: str, verb: str = "is out of range") -> ConfigError:
    """The error for field ``name`` of ``obj`` (the config at ``path``), which breaks ``rule``.

    Returns:
        ``ConfigError("<path>.<name>=<value> <verb>: <Class>.<name> must be <rule>")``, to raise.
    """
    value = getattr(obj, name)
    return ConfigError(f"{key(path, name)}={value!r} {verb}: {type(obj).__name__}.{name} must be {rule}")


def check_domains(obj: object, path: str, domains: Mapping[str, Domain]) -> None:
    """Check every field of ``obj`` (a config dataclass at dotted ``path``) named in ``domains``.

    Raises:
        ConfigError: naming the first field outside its domain, its value and the domain.
    """
    for name, domain in domains.items():
        if not domain.accepts(getattr(obj, name)):
            verb = "is out of range" if isinstance(domain, Range) else "is not allowed"
            raise refuse(obj, path, name, domain.describe(), verb)


def check_divides(divisor: tuple[str, int], total: tuple[str, int], why: str) -> None:
    """Refuse ``total`` that ``divisor`` does not divide, naming both options.

    Args:
        divisor, total: ``(key, value)`` of each option (or of a product of options, e.g.
            ``("env.num_envs x algo.rollout_steps", 512)``).
        why: why the rule holds, appended to the message.

    Raises:
        ConfigError: ``"<divisor>=<d> does not divide <total>=<t>: <why>"``.
    """
    (d_key, d), (t_key, t) = divisor, total
    if t % d:
        raise ConfigError(f"{d_key}={d} does not divide {t_key}={t}: {why}")


__all__ = [
    "COUNT",
    "DEVICE_TYPES",
    "DTYPES",
    "NONNEGATIVE",
    "POSITIVE",
    "PROBABILITY",
    "SEED_MAX",
    "ConfigError",
    "Device",
    "Domain",
    "Each",
    "Flag",
    "Free",
    "Maybe",
    "OneOf",
    "Range",
    "Text",
    "check_divides",
    "check_domains",
    "count_or_off",
    "key",
    "refuse",
]
