"""How wide each stream point stays: real parameter counts, budgets and the auto layout."""
