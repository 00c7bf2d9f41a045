"""Hashing models, one module per method; each import registers its model."""
from models import dsph  # noqa: F401  (registers "DSPH")
from models import dcmht  # noqa: F401  (registers "DCMHT")
from models import cagmh  # noqa: F401  (registers "CAGMH")
from models import scahn  # noqa: F401  (registers "SCAHN")
from models import cash  # noqa: F401  (registers "CASH")
from models import pbeh  # noqa: F401  (registers "PBEH")
