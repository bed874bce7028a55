"""Name -> builder tables, as timm's: what a user types in config (`backbone=resnet18`,
`dataset=simpsons`) finds the function that builds it, and new entries need no other edit."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

Builder = TypeVar("Builder", bound=Callable)


class Registry(dict[str, Builder]):
    def register(self, name: str) -> Callable[[Builder], Builder]:
        def add(builder: Builder) -> Builder:
            self[name] = builder
            return builder

        return add
