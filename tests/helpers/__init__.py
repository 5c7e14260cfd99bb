"""Code shared by test modules of both tiers (test modules import these, never each other)."""
