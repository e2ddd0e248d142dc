"""Models that many of are held at once: an envelope and a result per task.

pydantic gives every instance a set of the names of the fields it was given
(``model_fields_set``). That set is up to half of an instance's memory (2,264 bytes of an
envelope's 4,365; a result holds nine such sets), and across a run's tasks it is nearly
always one of a few sets. A :class:`SharedFieldNames` model holds one shared set per
class and content instead of a set of its own.

``model_fields_set`` is still the names of the fields given, and ``exclude_unset`` dumps
are as before. pydantic adds to the set on an assignment (a field, or an extra attribute of
a subclass with ``extra="allow"``) and in ``model_copy``; neither reaches a shared set:
assigning a name the set lacks first gives the instance a set of its own
(:meth:`SharedFieldNames.__setattr__`), and ``model_copy`` copies the set before it adds the
updated names, then shares the copy's. What pydantic never does, a caller must not do
either: change ``model_fields_set`` in place (copy it first), or every model sharing it
would see the change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self

from pydantic import BaseModel

__all__ = ["SharedFieldNames"]

#: The shared sets, by class and content. Bounded, whatever a report read in holds: past
#: the bound an instance keeps its own set, as any pydantic model does.
_SHARED: dict[tuple[type[BaseModel], frozenset[str]], set[str]] = {}
_MAX_SHARED = 4096


def _share(model: BaseModel) -> None:
    """Give *model* the shared set equal to its own."""
    given = model.__pydantic_fields_set__
    key = (type(model), frozenset(given))
    shared = _SHARED.get(key)
    if shared is None:
        if len(_SHARED) < _MAX_SHARED:
            _SHARED[key] = set(given)
            object.__setattr__(model, "__pydantic_fields_set__", _SHARED[key])
    elif shared is not given:
        object.__setattr__(model, "__pydantic_fields_set__", shared)


class SharedFieldNames(BaseModel):
    """A model whose instances share their ``model_fields_set`` with others like them."""

    def model_post_init(self, context: Any, /) -> None:
        _share(self)

    def __setattr__(self, name: str, value: Any) -> None:
        given = self.__pydantic_fields_set__
        if name not in given:
            # pydantic may add *name* to the set (a field, an extra attribute): to a set of
            # this instance's own.
            object.__setattr__(self, "__pydantic_fields_set__", set(given))
        super().__setattr__(name, value)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        copied = super().model_copy(update=update, deep=deep)
        _share(copied)
        return copied
