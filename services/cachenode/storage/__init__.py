"""Cache tiers: one lazy registry by URI scheme (see registry.py), one interface (base.py)."""
