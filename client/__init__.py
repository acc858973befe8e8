"""fedrec client."""
