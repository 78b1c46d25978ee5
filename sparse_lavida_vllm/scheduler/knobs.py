"""One request knob read: the error that names a bad one, and the readers both request kinds share."""

from __future__ import annotations

from typing import Any


class DiffusionParamError(ValueError):
    """A bad request knob; `field` names it (the API server answers 400 with it)."""

    def __init__(self, field: str, message: str, value: Any = None) -> None:
        super().__init__(message)
        self.field = field
        self.value = value


def read_int(extra: dict, name: str, default: int | None) -> int | None:
    """An integer knob: ints, integral floats and numeric strings; booleans, NaN and infinities are refused."""
    value = extra.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise DiffusionParamError(name, f"{name} must be an integer, got {value!r}", value)
    try:
        as_int = int(value)
    except (ValueError, OverflowError):  # int('x'), int(nan): ValueError; int(inf): OverflowError
        raise DiffusionParamError(name, f"{name} must be an integer, got {value!r}", value) from None
    if isinstance(value, float) and value != as_int:
        raise DiffusionParamError(name, f"{name} must be an integer, got {value!r}", value)
    if not -(2**63) <= as_int < 2**63:  # no knob is meaningful out here; keeps messages short
        raise DiffusionParamError(name, f"{name} is out of range, got {str(value)[:24]}...", value)
    return as_int


def read_bool(extra: dict, name: str, default: bool) -> bool:
    """A boolean knob: true / false, 0 / 1 and their strings."""
    value = extra.get(name, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):  # the OpenAI server's vllm_xargs turns false into 0
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise DiffusionParamError(name, f"{name} must be true or false, got {value!r}", value)


def check_registers(sparse: bool, num_registers: int, has_register_token: bool) -> None:
    """Registers need a register token the checkpoint declares (both request kinds)."""
    if sparse and num_registers and not has_register_token:
        raise DiffusionParamError("num_registers", f"num_registers ({num_registers}) needs a register token, and this "
                                  "checkpoint's config.json names none (register_token_id): use 0", num_registers)
