"""fedrec simulations."""
