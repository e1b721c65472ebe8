"""Topic names, in one place, under a configurable prefix."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topics:
    prefix: str = "dare."

    @property
    def user_events(self) -> str:
        return f"{self.prefix}user-events"

    @property
    def item_events(self) -> str:
        return f"{self.prefix}item-events"

    @property
    def prompts(self) -> str:
        return f"{self.prefix}prompts"

    @property
    def knowledge(self) -> str:
        return f"{self.prefix}knowledge"

    @property
    def pools(self) -> str:
        return f"{self.prefix}pools"

    @property
    def assignments(self) -> str:
        return f"{self.prefix}assignments"

    @property
    def centroids(self) -> str:
        return f"{self.prefix}centroids"

    @property
    def dead_letter(self) -> str:
        return f"{self.prefix}dead-letter"

    def all(self) -> list[str]:
        return [
            self.user_events,
            self.item_events,
            self.prompts,
            self.knowledge,
            self.pools,
            self.assignments,
            self.centroids,
            self.dead_letter,
        ]
