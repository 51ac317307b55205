"""Running means of per-point figures between two Trainer log lines (alignment cosines)."""


class RunningMeans:
    """Sums per-point values until `pop`, which returns their means under `prefix/<point>` plus
    `prefix/mean` (the mean over points), and starts again."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, values: dict[str, float]) -> None:
        """One observation: point name -> value."""
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.count += 1

    def pop(self) -> dict[str, float]:
        """The means since the last `pop` (empty if nothing was added)."""
        if not self.count:
            return {}
        means = {f"{self.prefix}/{name}": total / self.count for name, total in self.sums.items()}
        means[f"{self.prefix}/mean"] = sum(means.values()) / len(means)
        self.sums.clear()
        self.count = 0
        return means
