"""Package attributes imported on first use (PEP 562), so that a light part of a package (its contracts, its
config) can be imported without the heavy modules beside it (torch)."""

from __future__ import annotations

import importlib


def lazy_attributes(package: str, where: dict[str, str]):
    """(__getattr__, __dir__) for `package`, whose attribute `name` lives in the submodule where[name]."""

    def __getattr__(name: str):  # noqa: N807
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(where[name], package), name)

    def __dir__():  # noqa: N807
        return sorted(where)

    return __getattr__, __dir__
