"""Named things a user can ask for by string (rewards, critic encoders, pretraining datasets), and the plugins that
add more.

A plugin is a module named by an entry point of the group `tdpo_trl.plugins`; importing it registers its names. The
embedded digits demo is one (`tdpo_trl.digits`, declared in pyproject.toml): the core never imports it, and its
names (`digit_ink`, `pretrain_dataset="digits"`, `critic_encoder="digit_classifier"`) resolve the first time a name is
looked up that the core does not know.
"""

import importlib.metadata
from collections.abc import Iterator, Mapping
from typing import Any, Optional


PLUGIN_GROUP = "tdpo_trl.plugins"
_plugins_loaded = False


def load_plugins():
    """Import every module registered under the entry-point group `tdpo_trl.plugins` (once)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry_point in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        entry_point.load()


class Registry(Mapping):
    """A read-only mapping `name -> object` that plugins fill through `register`; a missing name loads the plugins
    first. `kind` names what it holds in error messages (e.g. "reward")."""

    def __init__(self, kind: str, entries: Optional[dict[str, Any]] = None):
        self.kind = kind
        self._entries: dict[str, Any] = dict(entries or {})

    def register(self, name: str, value: Any = None) -> Any:
        """`registry.register(name, value)`, or `@registry.register(name)` on a class or function."""
        if value is None:
            return lambda decorated: self.register(name, decorated)
        if name in self._entries and self._entries[name] is not value:
            raise ValueError(f"the {self.kind} name {name!r} is already registered to {self._entries[name]!r}")
        self._entries[name] = value
        return value

    def __getitem__(self, name: str) -> Any:
        if name not in self._entries:
            load_plugins()
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        if name not in self._entries:
            load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        load_plugins()
        return iter(list(self._entries))

    def __len__(self) -> int:
        load_plugins()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._entries)})"
