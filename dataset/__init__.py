from dataset import task_mat  # noqa: F401
from dataset import demo  # noqa: F401
from dataset import synthetic  # noqa: F401
from dataset import clip_cache  # noqa: F401  (registers "clip_cache")
