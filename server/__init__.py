"""fedrec server."""
