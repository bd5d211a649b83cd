"""The ``constraint`` oneof on the wire, for both APIs: ``nanoserve.v1`` and the worker link.

Both ``SamplingParams`` messages spell the oneof the same way (json_schema, regex, grammar,
json_object, choice.choices), so one pair of functions reads and writes either. Torch-free.
"""

from __future__ import annotations

from typing import Any

from protos.sampling_params import Constraint


def constraint_from_pb(msg: Any) -> Constraint | None:
    """The constraint a SamplingParams message carries, or None (unchecked: the compiler is)."""
    kind = msg.WhichOneof("constraint")
    if kind is None:
        return None
    if kind == "choice":
        return Constraint("choice", choices=tuple(msg.choice.choices))
    if kind == "json_object":
        return Constraint("json_object") if msg.json_object else None
    return Constraint(kind, spec=getattr(msg, kind))


def constraint_to_pb(constraint: Constraint | None, msg: Any) -> None:
    """Set ``msg``'s oneof to ``constraint`` (nothing for None)."""
    if constraint is None:
        return
    if constraint.kind == "choice":
        msg.choice.choices.extend(constraint.choices)
    elif constraint.kind == "json_object":
        msg.json_object = True
    else:
        setattr(msg, constraint.kind, constraint.spec)
