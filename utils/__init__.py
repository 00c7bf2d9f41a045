"""Config loading and overrides, logging, seeding, atomic output, user-facing errors."""
