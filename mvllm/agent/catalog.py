"""The agent's model table at run time: agent.toml's entries, ad-hoc entries added and removed, and
entries replaced by an assignment. The one owner of it: nothing else edits the table.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from mvllm.agent.config import ModelSpec, model_for
from mvllm.agent.errors import Conflict


class Catalog:
    """Catalog entries by name; starts as a copy of the loaded config's, which stays as it was."""

    def __init__(self, models: Mapping[str, ModelSpec]) -> None:
        self._specs: dict[str, ModelSpec] = dict(models)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def get(self, name: str) -> ModelSpec | None:
        return self._specs.get(name)

    def specs(self) -> dict[str, ModelSpec]:
        """A copy of the table (name -> entry), for checks that need every entry."""
        return dict(self._specs)

    def model_for(self, requested: str) -> tuple[ModelSpec, str | None] | None:
        """The entry serving `requested` (a served name or a catalog LoRA), and the adapter if it is one."""
        return model_for(self._specs.values(), requested)

    def add(self, spec: ModelSpec) -> None:
        """A new entry (an ad-hoc instance); its name must be free."""
        if spec.name in self._specs:
            raise Conflict(f"the name {spec.name!r} is taken on this agent (a catalog model or another instance)")
        self._specs[spec.name] = spec

    def replace(self, spec: ModelSpec) -> None:
        """An existing entry changed (an assignment)."""
        if spec.name not in self._specs:
            raise KeyError(spec.name)
        self._specs[spec.name] = spec

    def remove(self, spec: ModelSpec) -> bool:
        """Drop the entry `spec`, only while the table still holds that very entry; whether it did."""
        if self._specs.get(spec.name) is not spec:
            return False
        del self._specs[spec.name]
        return True
