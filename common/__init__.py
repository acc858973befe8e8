"""fedrec common."""
