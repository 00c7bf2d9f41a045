"""Runners: the one continual runner, optimisers/schedules, outputs, comparison."""
from runners import continual  # noqa: F401  (registers "continual")
from runners import optim  # noqa: F401  (registers optimisers and schedules)
