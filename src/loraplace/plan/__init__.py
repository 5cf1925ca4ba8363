"""Planning, pure: roles, strategies, placement, budgets, parameter accounting on the meta device. No weights are loaded here."""
